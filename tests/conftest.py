"""Shared fixtures: tiny models built in memory from a config, no network."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub; set before transformers loads
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The shell drivers run `python`: this interpreter's, also when pytest is run from a shell without the venv activated.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

import pytest
import torch
from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, LlamaConfig, LlamaForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[1]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEBERTA_TARGETS = ["query_proj", "key_proj", "value_proj", "dense"]


def tiny_llama(seed: int = 0, vocab_size: int = 128, initializer_range: float = 0.02) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=initializer_range,
    )
    return LlamaForCausalLM(config).eval()


def tiny_deberta(seed: int = 0, num_labels: int = 3, v3: bool = False) -> DebertaV2ForSequenceClassification:
    """A 2-layer DeBERTa-v2; ``v3``: DeBERTaV3-base's attention (share_att_key: the query and key layers also project
    the relative embeddings, log position buckets, layer-normed relative embeddings)."""
    torch.manual_seed(seed)
    v3_attention = {"share_att_key": True, "position_buckets": 16, "norm_rel_ebd": "layer_norm"} if v3 else {}
    config = DebertaV2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=128, relative_attention=True, pos_att_type=["p2c", "c2p"], num_labels=num_labels,
        pooler_hidden_size=64, **v3_attention,
    )
    return DebertaV2ForSequenceClassification(config).eval()


def tiny_tokenizer(texts=("the quick brown fox jumps over the lazy dog",), vocab_size: int = 128):
    """An offline word-level tokenizer over ``texts`` (ids < vocab_size), with pad/unk/bos/eos tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    words = sorted({w for text in texts for w in text.lower().split()})[: vocab_size - len(specials)]
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
    yield


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped on machines without it (CI has none)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
