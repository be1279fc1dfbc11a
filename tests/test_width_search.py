"""The causal-LM width search at the paper's precision (NF4 backbone, bfloat16 compute): its nll(0), the mean
network, is the run's held-out eval_loss, computed as the Trainer computes it (its bf16 autocast, its batches,
per target token), and its record recomputes both rules' m."""

import json

import pytest
from conftest import REPO_ROOT
from test_llama_scripts import save_tiny_llama

from scripts import quantize_model, train_gsm8k

DATA = REPO_ROOT / "tests" / "data"


@pytest.fixture(scope="module")
def bf16_init_dir(tmp_path_factory):
    """bash _init.sh as the paper's runs use it: LoftQ NF4 (rank 16 here), the backbone Q saved in bfloat16."""
    root = tmp_path_factory.mktemp("bf16")
    return quantize_model.main([
        "--model", str(save_tiny_llama(root / "tiny-llama")), "--save_dir", str(root / "quantized"), "--rank", "16",
        "--bits", "4", "--K", "2", "--loftq_iter", "1", "--lora_alpha", "16", "--dtype", "bfloat16"])


def test_nf4_bf16_search_starts_from_the_runs_eval_loss(bf16_init_dir, tmp_path):
    """Before, the search computed outside the Trainer's bf16 autocast: nll(0) was 9e-5 (relative) off eval_loss
    here (now 3e-8: each batch's float32 mean), 0.33 % on a real run, more than the tfb tolerance it is compared
    with. train_nlg runs the same recipe (llmm.run.causal_lm)."""
    run = tmp_path / "tfb"
    results = train_gsm8k.main([
        "--model_name_or_path", str(bf16_init_dir), "--rank", "16", "--data", str(DATA / "gsm8k.jsonl"),
        "--eval_split", "heldout", "--eval_size", "3", "--per_device_eval_batch_size", "2",
        "--learning_rate", "0.05", "--llmmscale", "4", "--max_steps", "2", "--logging_steps", "1",
        "--load_in_4bit", "true", "--dtype", "bfloat16", "--noise_width_search", "tfb", "--mc_samples", "2",
        "--output_dir", str(run)])
    assert json.loads((run / "settings.json").read_text())["dtype"] == "bfloat16"
    record = results["noise_width_search"]
    nll = dict(record["evaluations"])
    assert record["nll_0"] == nll[0.0] == pytest.approx(results["eval_loss"], rel=1e-6, abs=0)
    assert len(set(nll.values())) > 1  # the width matters
    assert record["tfb_threshold"] == pytest.approx(record["nll_0"] * (1 + record["tolerance"]), rel=1e-15)
    assert record["tfb"] == record["chosen"] == results["noise_width"] == max(
        m for m, value in nll.items() if value is not None and value <= record["tfb_threshold"])
    assert record["nll_min"] == min((m for m in nll if nll[m] is not None), key=lambda m: (nll[m], m))
