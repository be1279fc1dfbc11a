"""Core benchmark: Llmm (K=2) vs plain PEFT LoRA training steps, and LoftQ time for one 4096 x 4096 weight.

    python -m benchmarks.bench_core                  # CPU (1 thread) or CUDA if available; writes JSON
    python -m benchmarks.bench_core --quick          # smaller shapes, for a smoke run

Training steps: a Llama of hidden size 1024, 2 layers (vocab 8192), batch 8 x 256 tokens, rank 16 on all seven
projections, AdamW. Both models are built from the same weights and timed interleaved in one process (median
over steps, after warm-up), so the ratio is robust to machine noise. Peak memory: each method runs alone in a
child process (CPU: its max RSS; CUDA: torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import add_out, record
from llmm import LlmmConfig, get_llmm_model
from llmm.quant import loftq_init

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HERE = Path(__file__).resolve().parent


def build(method: str, quick: bool, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    hidden = 256 if quick else 1024
    config = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=2,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
    base = LlamaForCausalLM(config)
    if method == "lora":
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS))
    else:
        model = get_llmm_model(base, LlmmConfig(r=16, lora_alpha=16, target_modules=TARGETS, k=2))
    return model.to(device).train()


def step(model, optimizer, batch) -> None:
    model(batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(quick: bool, device: str, steps: int) -> dict:
    batch = torch.randint(0, 8192, (8, 64 if quick else 256), device=device)
    models = {m: build(m, quick, device) for m in ("lora", "llmm")}
    optimizers = {m: torch.optim.AdamW([p for p in models[m].parameters() if p.requires_grad], lr=1e-4)
                  for m in models}
    times = {m: [] for m in models}
    for i in range(steps + 2):  # two warm-up rounds
        for method, model in models.items():
            sync(device)
            start = time.perf_counter()
            step(model, optimizers[method], batch)
            sync(device)
            if i >= 2:
                times[method].append(time.perf_counter() - start)
    medians = {m: statistics.median(t) for m, t in times.items()}
    return {"median_step_s": medians, "ratio_llmm_over_lora": medians["llmm"] / medians["lora"],
            "steps": steps, "trainable_params": {m: sum(p.numel() for p in models[m].parameters()
                                                         if p.requires_grad) for m in models}}


def peak_memory(method: str, quick: bool, device: str) -> float:
    """Peak memory in MiB of a few training steps of ``method`` alone (run in a child process)."""
    batch = torch.randint(0, 8192, (8, 64 if quick else 256), device=device)
    model = build(method, quick, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step(model, optimizer, batch)
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loftq_times(quick: bool, device: str) -> dict:
    size = 1024 if quick else 4096
    weight = torch.randn(size, size, device=device) * 0.02
    results = {}
    for bits in (4, 2):
        sync(device)
        start = time.perf_counter()
        loftq_init(weight, bits=bits, rank=16, num_iter=5, method="nf")
        sync(device)
        results[f"nf{bits}_{size}x{size}_5iter_s"] = time.perf_counter() - start
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--memory_of", choices=["lora", "llmm"], help=argparse.SUPPRESS)  # child-process mode
    add_out(parser, "core_<device>.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(1)
    if args.memory_of:
        print(peak_memory(args.memory_of, args.quick, device))
        return
    memory = {}
    for method in ("lora", "llmm"):
        command = [sys.executable, "-m", "benchmarks.bench_core", "--memory_of", method] + (["--quick"] * args.quick)
        memory[method] = float(subprocess.run(command, capture_output=True, text=True, check=True,
                                              cwd=HERE.parent).stdout.split()[-1])
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({platform.processor() or 'x86_64'}), "
                                                                       "1 thread",
        "quick": args.quick,
        "train_step": time_steps(args.quick, device, args.steps),
        "peak_memory_mib": memory,
        "loftq": loftq_times(args.quick, device),
    }
    record(result, args.out, f"core_{device}.json")


if __name__ == "__main__":
    main()
