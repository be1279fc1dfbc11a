"""Several processes: scripts/train_glue.py and scripts/train_gsm8k.py under `torchrun --nproc_per_node 2` on CPU
(DDP over gloo) on tiny models; each process draws its own noise and only the main process writes."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import torch
from conftest import DEBERTA_TARGETS, tiny_deberta
from test_glue import DATA as GLUE_DATA
from test_glue import model_dir  # noqa: F401  (the tiny DeBERTa fixture)
from test_resume import llama_dir  # noqa: F401  (the tiny Llama fixture)

from conftest import REPO_ROOT
from llmm import LlmmConfig, get_llmm_model, noise_source
from llmm.run import trainer as training

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_each_process_draws_its_own_noise():
    """PerProcessNoise seeds the model's noise generator with (seed, process index): the processes' eps differ, a
    process's are seeded; torch's global generator (dropout) gets seed + process index."""
    model = get_llmm_model(tiny_deberta(0), LlmmConfig(r=4, lora_alpha=4, target_modules=DEBERTA_TARGETS, k=2))

    def draws(process_index):
        args = SimpleNamespace(seed=17, process_index=process_index)
        training.PerProcessNoise().on_train_begin(args, None, None, model=model)
        return torch.randn(4, generator=noise_source(model).generator(torch.device("cpu"))), torch.randn(4)

    (noise_0, dropout_0), (noise_1, dropout_1) = draws(0), draws(1)
    assert not torch.equal(noise_0, noise_1) and not torch.equal(dropout_0, dropout_1)
    assert all(torch.equal(a, b) for a, b in zip(draws(1), (noise_1, dropout_1)))


def test_torchrun_two_processes_write_one_adapter(model_dir, llama_dir, tmp_path):  # noqa: F811
    glue, gsm8k = tmp_path / "glue", tmp_path / "gsm8k"
    commands = {
        glue: [*TORCHRUN, "-m", "scripts.train_glue", "--task", "cola", "--quant", "nf", "--rank", "16", "--bits",
               "4", "--model", model_dir, "--data_dir", str(GLUE_DATA), "--max_steps", "2", "--per_device_train_batch_size", "2",
               "--gradient_accumulation_steps", "1", "--per_device_eval_batch_size", "2", "--noise_width_search", "nll",
               "--mc_samples", "2", "--output_dir", str(glue)],
        gsm8k: [*TORCHRUN, "-m", "scripts.train_gsm8k", "--model", "llama-2-7b", "--rank", "64",
                "--model_name_or_path", str(llama_dir), "--init", "loftq", "--loftq_iter", "1", "--data",
                str(REPO_ROOT / "tests" / "data" / "gsm8k.jsonl"), "--eval_split", "heldout", "--eval_size", "2",
                "--load_in_4bit", "false", "--dtype", "float32", "--max_steps", "2", "--logging_steps", "1",
                "--per_device_train_batch_size", "1", "--gradient_accumulation_steps", "1", "--output_dir",
                str(gsm8k)],
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    runs = {out: subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for out, command in commands.items()}  # both at once: CI time
    logs = {out: run.communicate(timeout=300)[0] for out, run in runs.items()}
    for out, run in runs.items():
        assert run.returncode == 0, logs[out][-3000:]
        seed = json.loads((out / "settings.json").read_text())["seed"]
        for rank in (0, 1):
            assert f"process {rank} draws its noise from seed ({seed}, {rank}), dropout from seed {seed + rank}" in logs[out]
        names = {path.name for path in out.iterdir()}
        assert not any(name.startswith(".") and name != ".llmm-run" for name in names), names  # no temporary dir
        assert {"adapter", "mean_adapter", "results.json", "settings.json"} <= names
        for adapter in ("adapter", "mean_adapter"):
            assert {p.name for p in (out / adapter).iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
        checkpoint = next((out / "checkpoints").glob("checkpoint-*") if out == gsm8k else out.glob("checkpoint-*"))
        assert {"rng_state_0.pth", "rng_state_1.pth", "llmm_noise_rng_0.pt", "llmm_noise_rng_1.pt"} <= {
            p.name for p in checkpoint.iterdir()}  # one per process
    results = json.loads((glue / "results.json").read_text())
    assert results["complete"]
    # the width search ran on the whole dev split in every process (not on each one's shard): nll(0) is the mean
    # network's dev NLL over the whole split (predictions.json, written by the main process alone)
    nll_at_zero = dict(map(tuple, results["noise_width_search"]["evaluations"]))[0.0]
    whole = json.loads((glue / "predictions.json").read_text())["validation"]["metrics"]["nll"]
    assert abs(nll_at_zero - whole) <= 1e-6 * whole, (nll_at_zero, whole)
    assert json.loads((gsm8k / "results.json").read_text())["global_step"] == 2
    assert sorted(p.name for p in gsm8k.iterdir() if p.is_dir()) == ["adapter", "backbone", "checkpoints",
                                                                    "mean_adapter"]
