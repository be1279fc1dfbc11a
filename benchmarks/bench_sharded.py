"""Memory per process and step time of DDP vs FSDP2 for an Llmm model on CPU, 2 processes over gloo.

    python -m benchmarks.bench_sharded             # writes benchmarks/results/sharded_cpu.json

A Llama-architecture model (hidden 512, 4 layers, intermediate 1376, vocab 4096, random float32 weights), Llmm
adapters (K = 2, rank 16) on all seven projections, AdamW, batch 2 x 128 tokens per process. Each mode runs in its
own ``torch.distributed.run`` with 2 processes, 1 thread each: DDP (every process holds the whole model, adapter
and optimizer state) and FSDP2 (``llmm.sharding.shard_fsdp2``: each decoder layer and the root sharded). Per
process: MiB of frozen weights, trainable tensors and optimizer state it holds (local shards; exact), resident
memory after building the model, after training and at peak (these include the Python / torch runtime; every
process builds the whole model before sharding here, as accelerate does without cpu_ram_efficient_loading, so the
peak is not where sharding saves), and the median step time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, add_out, record

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEPS, WARMUP = 8, 2


def rss_mib() -> float:
    """This process's resident memory now."""
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def sharded_state_bytes(model, optimizer=None) -> dict[str, int]:
    """Bytes this process holds of the frozen and trainable parameters and the optimizer state (local shards)."""
    from llmm.sharding import local_shard

    def local(tensor):
        tensor = local_shard(tensor)
        return tensor.numel() * tensor.element_size()

    sizes = {"frozen": 0, "trainable": 0, "optimizer": 0}
    for parameter in model.parameters():
        sizes["trainable" if parameter.requires_grad else "frozen"] += local(parameter)
    for state in (optimizer.state.values() if optimizer is not None else ()):
        sizes["optimizer"] += sum(local(value) for value in state.values() if isinstance(value, torch.Tensor))
    return sizes


def worker(mode: str, out: Path) -> None:
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmm import LlmmConfig, get_llmm_model, seed_noise
    from llmm.sharding import shard_fsdp2

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    model = get_llmm_model(LlamaForCausalLM(config), LlmmConfig(r=16, lora_alpha=16, target_modules=TARGETS, k=2))
    seed_noise(model, 0, rank)
    built = rss_mib()
    if mode == "fsdp2":
        shard_fsdp2(model)
        wrapped = model
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 4096, (2, 128), generator=torch.Generator().manual_seed(rank))
    times = []
    for step in range(STEPS):
        dist.barrier()
        start = time.perf_counter()
        wrapped(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        dist.barrier()
        if step >= WARMUP:
            times.append(time.perf_counter() - start)
    figures = {"rank": rank, "step_s": statistics.median(times), **sharded_state_bytes(model, optimizer),
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "rss_after_build_mib": built, "rss_after_training_mib": rss_mib()}
    (out / f"{mode}_{rank}.json").write_text(json.dumps(figures))
    dist.destroy_process_group()


def measure(out: str | None) -> None:
    import tempfile

    results = {"model": "Llama hidden 512, 4 layers, intermediate 1376, vocab 4096, float32; Llmm K=2 rank 16 on "
                        "all 7 projections; AdamW; batch 2 x 128 tokens per process; 2 processes, gloo, 1 thread each",
               "device": "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "modes": {}}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("ddp", "fsdp2"):
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            "--module", "benchmarks.bench_sharded", "--worker", mode, "--worker_dir", tmp],
                           check=True, env=env, cwd=RESULTS.parent.parent)
            results["modes"][mode] = [json.loads((Path(tmp) / f"{mode}_{rank}.json").read_text()) for rank in (0, 1)]
    mib = 2 ** 20
    summary = {}
    for mode, ranks in results["modes"].items():
        summary[mode] = {key: max(r[key] for r in ranks) / (1 if key.endswith("_mib") else mib) for key in (
            "frozen", "trainable", "optimizer", "peak_rss_mib", "rss_after_build_mib", "rss_after_training_mib")}
        summary[mode]["step_s"] = statistics.mean(r["step_s"] for r in ranks)
    summary["fsdp2_over_ddp"] = {key: summary["fsdp2"][key] / summary["ddp"][key] for key in summary["ddp"]}
    results["summary_mib_per_process"] = summary
    print(json.dumps(summary, indent=2))
    record(results, out, "sharded_cpu.json", show=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=("ddp", "fsdp2"), default=None)
    parser.add_argument("--worker_dir", help=argparse.SUPPRESS)  # where a worker writes its record
    add_out(parser, "sharded_cpu.json")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, Path(args.worker_dir))
    else:
        measure(args.out)


if __name__ == "__main__":
    main()
