"""The cost of the calibration protocol: Llmm (K=2) vs plain PEFT LoRA training steps with the answer-letter loss,
peak memory, and test time per number of sampled networks N (BLoB reports 1.02-1.06x training time, 1.07-1.17x
memory and about 10x test time at N = 10).

    python -m benchmarks.bench_mcq                  # CPU (1 thread) or CUDA if available; writes JSON
    python -m benchmarks.bench_mcq --quick          # smaller shapes, for a smoke run

A Llama of hidden size 1024, 2 layers (vocab 8192; --quick: 256), batch 4 x 128 tokens (BLoB's batch 4), rank 8
on q_proj / v_proj / lm_head (BLoB's targets), AdamW. Training steps of both models are timed interleaved in one
process (median after warm-up). Peak memory: each method alone in a child process (CPU: max RSS, which includes
the Python runtime; CUDA: max_memory_allocated). Test: llmm.tasks.calibration.predict over 8 batches of 8
questions in mean mode and in mc mode with N = 1, 2, 5, 10, timed as a ratio to mean mode.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from llmm import LlmmConfig, get_llmm_model
from llmm.tasks import calibration as C

TARGETS = ["q_proj", "v_proj", "lm_head"]
LETTERS = [5, 6, 7, 8, 9]
HERE = Path(__file__).resolve().parent


def build(method: str, quick: bool, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    hidden = 256 if quick else 1024
    config = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=2,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
    base = LlamaForCausalLM(config)
    if method == "lora":
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    else:
        model = get_llmm_model(base, LlmmConfig(r=8, lora_alpha=16, target_modules=TARGETS, k=2))
    return model.to(device).train()


def question_batch(device: str, batch: int = 4, length: int = 128) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(10, 8192, (batch, length), generator=generator).to(device),
            "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device),
            "n_choices": torch.full((batch,), 5, device=device), "labels": torch.arange(batch, device=device) % 5}


def step(model, optimizer, batch, letters) -> None:
    logits = C.letter_logits(model, batch["input_ids"], batch["attention_mask"], batch["n_choices"], letters)
    F.cross_entropy(logits, batch["labels"]).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(quick: bool, device: str, steps: int) -> dict:
    batch, letters = question_batch(device), torch.tensor(LETTERS)
    models = {m: build(m, quick, device) for m in ("lora", "llmm")}
    optimizers = {m: torch.optim.AdamW([p for p in models[m].parameters() if p.requires_grad], lr=1e-4)
                  for m in models}
    times = {m: [] for m in models}
    for i in range(steps + 2):  # two warm-up rounds
        for method, model in models.items():
            sync(device)
            start = time.perf_counter()
            step(model, optimizers[method], batch, letters)
            sync(device)
            if i >= 2:
                times[method].append(time.perf_counter() - start)
    medians = {m: statistics.median(t) for m, t in times.items()}
    return {"median_step_s": medians, "ratio_llmm_over_lora": medians["llmm"] / medians["lora"], "steps": steps,
            "trainable_params": {m: sum(p.numel() for p in models[m].parameters() if p.requires_grad)
                                 for m in models}}


def test_times(quick: bool, device: str, rounds: int) -> dict:
    """Seconds to predict 8 batches of 8 questions, mean mode and mc with N networks (median over rounds)."""
    model = build("llmm", quick, device).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_llmm" in name:
                parameter.normal_(0, 0.1)
    head = C.LetterHead(model, LETTERS)
    batches = [question_batch(device, batch=8) for _ in range(8)]
    modes = [("mean", 1), ("mc", 1), ("mc", 2), ("mc", 5), ("mc", 10)]
    times = {f"{mode} N={n}": [] for mode, n in modes}
    for _ in range(rounds + 1):  # one warm-up round
        for mode, n in modes:
            sync(device)
            start = time.perf_counter()
            C.predict(head, batches, mode, n)
            sync(device)
            times[f"{mode} N={n}"].append(time.perf_counter() - start)
    medians = {key: statistics.median(values[1:]) for key, values in times.items()}
    return {"median_s": medians, "ratio_to_mean": {key: value / medians["mean N=1"] for key, value in medians.items()},
            "questions": 64, "rounds": rounds}


def peak_memory(method: str, quick: bool, device: str) -> float:
    """Peak memory in MiB of a few training steps of ``method`` alone (run in a child process)."""
    batch, letters = question_batch(device), torch.tensor(LETTERS)
    model = build(method, quick, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step(model, optimizer, batch, letters)
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--memory_of", choices=["lora", "llmm"], help=argparse.SUPPRESS)  # child-process mode
    parser.add_argument("--out", default=str(HERE / "results" / "mcq.json"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(1)
    if args.memory_of:
        print(peak_memory(args.memory_of, args.quick, device))
        return
    memory = {}
    for method in ("lora", "llmm"):
        command = [sys.executable, "-m", "benchmarks.bench_mcq", "--memory_of", method] + (["--quick"] * args.quick)
        memory[method] = float(subprocess.run(command, capture_output=True, text=True, check=True,
                                              cwd=HERE.parent).stdout.split()[-1])
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or 'x86_64'}), "
                                                                       "1 thread",
        "quick": args.quick,
        "train_step": time_steps(args.quick, device, args.steps),
        "peak_memory_mib": memory, "peak_memory_ratio": memory["llmm"] / memory["lora"],
        "test": test_times(args.quick, device, args.rounds),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
