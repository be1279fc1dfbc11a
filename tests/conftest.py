"""Shared fixtures: tiny models built in memory from a config, no network."""

import pytest
import torch
from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, LlamaConfig, LlamaForCausalLM

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEBERTA_TARGETS = ["query_proj", "key_proj", "value_proj", "dense"]


def tiny_llama(seed: int = 0, vocab_size: int = 128, initializer_range: float = 0.02) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        initializer_range=initializer_range, vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def tiny_deberta(seed: int = 0, num_labels: int = 3) -> DebertaV2ForSequenceClassification:
    torch.manual_seed(seed)
    config = DebertaV2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, relative_attention=True, pos_att_type=["p2c", "c2p"], num_labels=num_labels,
        pooler_hidden_size=64,
    )
    return DebertaV2ForSequenceClassification(config).eval()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield
