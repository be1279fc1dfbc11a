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

    python -m benchmarks.bench_mcq --options        # the method's options (writes results/mcq_options_cpu.json)

The options: training-step time of Llmm as published, with per-example noise and with the entropy term (lambda 5e-4)
against PEFT LoRA (MAP), interleaved as above; test time of mc at N = 10 sequential and batched (mc_batched: one
forward over the batch repeated 10 times; both draw network n from stream n of the seed) and batched with per-example
noise, as a ratio to mean mode; the width search's cost in validation passes of mc (one per multiplier evaluated).
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
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks.common import add_out, record
from llmm import LlmmConfig, choose_noise_width, entropy, get_llmm_model
from llmm.tasks import calibration as C

TARGETS = ["q_proj", "v_proj", "lm_head"]
LETTERS = [5, 6, 7, 8, 9]
HERE = Path(__file__).resolve().parent


def build(method: str, quick: bool, device: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    hidden = 256 if quick else 1024
    config = LlamaConfig(vocab_size=8192, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=2,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
    base = LlamaForCausalLM(config)
    if method == "lora":
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    else:
        model = get_llmm_model(base, LlmmConfig(r=8, lora_alpha=16, target_modules=TARGETS, k=2, **options))
    return model.to(device).train()


def question_batch(device: str, batch: int = 4, length: int = 128) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(10, 8192, (batch, length), generator=generator).to(device),
            "attention_mask": torch.ones(batch, length, dtype=torch.long, device=device),
            "n_choices": torch.full((batch,), 5, device=device), "labels": torch.arange(batch, device=device) % 5}


def step(model, optimizer, batch, letters, entropy_weight: float = 0.0) -> None:
    logits = C.letter_logits(model, batch["input_ids"], batch["attention_mask"], batch["n_choices"], letters)
    loss = F.cross_entropy(logits, batch["labels"])
    if entropy_weight > 0:  # as llmm.run.trainer.LlmmTrainer.compute_loss
        loss = loss - entropy_weight * entropy(model)
    loss.backward()
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


OPTIONS = {"lora (MAP)": ("lora", {}, 0.0), "llmm": ("llmm", {}, 0.0),
           "llmm per-example noise": ("llmm", {"noise_per_example": True}, 0.0),
           "llmm entropy term": ("llmm", {}, 5e-4)}


def option_steps(quick: bool, device: str, steps: int) -> dict:
    """Median training-step seconds of each option, interleaved, and its ratio to LoRA's."""
    batch, letters = question_batch(device), torch.tensor(LETTERS)
    models = {name: build(method, quick, device, **options) for name, (method, options, _) in OPTIONS.items()}
    optimizers = {name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                  for name, model in models.items()}
    times = {name: [] for name in models}
    for i in range(steps + 2):  # two warm-up rounds
        for name, model in models.items():
            sync(device)
            start = time.perf_counter()
            step(model, optimizers[name], batch, letters, OPTIONS[name][2])
            sync(device)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"median_step_s": medians, "ratio_to_lora": {n: t / medians["lora (MAP)"] for n, t in medians.items()},
            "steps": steps}


def option_test_times(quick: bool, device: str, rounds: int, n: int = 10) -> dict:
    """Seconds to predict 8 batches of 8 questions: mean, mc N sequential, batched, batched with per-example noise;
    and the width search's passes (choose_noise_width's evaluations, each one mc prediction of the validation set)."""
    models = {per_example: build("llmm", quick, device, noise_per_example=per_example).eval()
              for per_example in (False, True)}
    for model in models.values():
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_llmm" in name:
                    parameter.normal_(0, 0.1)
    heads = {key: C.LetterHead(model, LETTERS) for key, model in models.items()}
    batches = [question_batch(device, batch=8) for _ in range(8)]
    runs = {"mean": lambda: C.predict(heads[False], batches, "mean"),
            f"mc N={n} sequential": lambda: C.predict(heads[False], batches, "mc", n, seed=0),
            f"mc N={n} batched": lambda: C.predict(heads[False], batches, "mc", n, seed=0, batched=True),
            f"mc N={n} batched, per-example noise": lambda: C.predict(heads[True], batches, "mc", n, seed=0,
                                                                      batched=True)}
    times = {key: [] for key in runs}
    for _ in range(rounds + 1):  # one warm-up round
        for key, run in runs.items():
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            times[key].append(time.perf_counter() - start)
    medians = {key: statistics.median(values[1:]) for key, values in times.items()}
    passes = len(choose_noise_width(lambda m: 1.0 + 0.01 * m)["evaluations"])  # NLL rising with m (the usual case)
    return {"median_s": medians, "ratio_to_mean": {key: value / medians["mean"] for key, value in medians.items()},
            "questions": 64, "rounds": rounds,
            "width_search_passes": passes, "width_search_cost_in_mc_passes_of_the_validation_set": passes}


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
    parser.add_argument("--options", action="store_true", help="the method's options (per-example noise, entropy term, "
                        "batched mc, width search)")
    add_out(parser, "mcq_<device>[_quick].json; --options: mcq_options_<device>[_quick].json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(1)
    if args.options:
        result = {"device": torch.cuda.get_device_name() if device == "cuda" else
                  f"CPU ({platform.processor() or 'x86_64'}), 1 thread", "quick": args.quick,
                  "train_step": option_steps(args.quick, device, args.steps),
                  "test": option_test_times(args.quick, device, args.rounds)}
        record(result, args.out, f"mcq_options_{device}{'_quick' * args.quick}.json")
        return
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
    record(result, args.out, f"mcq_{device}{'_quick' * args.quick}.json")


if __name__ == "__main__":
    main()
