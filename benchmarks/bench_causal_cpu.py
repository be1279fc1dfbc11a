"""The paper's precision on CPU: NF4 backbone + bfloat16 compute vs a float32 backbone, and bitsandbytes' CPU kernels.

    python -m benchmarks.bench_causal_cpu          # writes benchmarks/results/causal_cpu.json (--out: elsewhere)

1. Training step time (median of interleaved steps) of an Llmm (K=2, rank 16) adapter on a Llama-architecture
   model (hidden 512, 4 layers, random weights), batch 4 x 128 tokens, AdamW: (a) the float32 backbone, float32
   compute; (b) the NF4 backbone, bfloat16 compute, norms/embeddings/lm_head in float32 (PEFT's
   prepare_model_for_kbit_training), float32 adapters under bf16 autocast — what the tables run. Also the eval
   forward (mean adapter) of both, on the plain NF4 path that training uses.
2. How close bitsandbytes' two CPU NF4 paths are to the float32 product over the dequantized weights, for
   bfloat16 and float32 compute: the plain path (dequantize, then matmul; what training uses) and the packed
   AVX512-BF16 kernel (what a model loaded for evaluation uses, in llmm, plain PEFT and lm-eval alike).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import bitsandbytes as bnb
import torch
from peft import prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from benchmarks.common import add_out, record
from llmm import LlmmConfig, get_llmm_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def models(path: Path):
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    fp32 = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    nf4 = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16), device_map={"": "cpu"})
    nf4 = prepare_model_for_kbit_training(nf4, use_gradient_checkpointing=False)
    adapter = LlmmConfig(r=16, lora_alpha=16, target_modules=TARGETS, k=2)
    return {"fp32": get_llmm_model(fp32, adapter), "nf4_bf16": get_llmm_model(nf4, copy.deepcopy(adapter))}


def step_times(runs: dict, rounds: int = 6) -> dict:
    inputs = torch.randint(0, 4096, (4, 128))
    optimizers = {name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                  for name, model in runs.items()}
    autocast = {"fp32": False, "nf4_bf16": True}
    train, evaluate = {n: [] for n in runs}, {n: [] for n in runs}
    for round_ in range(rounds + 1):
        for name, model in runs.items():
            model.train()
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast[name]):
                model(input_ids=inputs, labels=inputs).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()
            elapsed = time.perf_counter() - start
            model.eval()
            start = time.perf_counter()
            with torch.no_grad():
                model(input_ids=inputs)
            if round_:  # the first round warms up
                train[name].append(elapsed)
                evaluate[name].append(time.perf_counter() - start)
    result = {f"{kind}_s": {n: statistics.median(t[n]) for n in runs} for kind, t in (("train", train),
                                                                                     ("eval", evaluate))}
    for kind in ("train_s", "eval_s"):
        result[kind.replace("_s", "_ratio_fp32_over_nf4_bf16")] = result[kind]["fp32"] / result[kind]["nf4_bf16"]
    return result


def kernel_errors() -> dict:
    torch.manual_seed(0)
    weight, x = torch.randn(1024, 2048) * 0.02, torch.randn(64, 2048)
    errors = {}
    for name, dtype in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        layer = bnb.nn.Linear4bit(2048, 1024, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
        layer = layer.to("cpu")
        dequantized = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        reference = x.to(dtype).float() @ dequantized.T
        plain, packed = copy.deepcopy(layer).eval(), copy.deepcopy(layer).eval()
        plain.support_avx512bf16_for_cpu = False
        with torch.no_grad():
            outputs = {"plain": plain(x.to(dtype)).float(), "packed": packed(x.to(dtype)).float()}
        errors[name] = {path: {"max_abs": (y - reference).abs().max().item(), "mean_abs": (y - reference).abs().mean()
                               .item()} for path, y in outputs.items()}
        errors[name]["packed_kernel_used"] = bool(getattr(packed.weight.quant_state, "packing_format_for_cpu", False))
        errors[name]["output_mean_abs"] = reference.abs().mean().item()
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_out(parser, "causal_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        results = {"device": "cpu", "threads": 1, "steps": step_times(models(Path(tmp))), "kernels": kernel_errors(),
                   "date": time.strftime("%Y-%m-%d")}
    record(results, args.out, "causal_cpu.json")


if __name__ == "__main__":
    main()
