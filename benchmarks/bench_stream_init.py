"""Streaming `_init.sh` (llmm.streaming): peak memory and LoftQ time per matrix on Llama checkpoints of growing size.

    python -m benchmarks.bench_stream_init                          # 0.1 B, 0.5 B, 2 B and one 7B-shaped layer
    python -m benchmarks.bench_stream_init --sizes 0.1b --loftq_iter 5

Each size is a synthetic Llama-architecture bfloat16 checkpoint (random N(0, 0.02) weights; shards of 1 GB written
tensor by tensor with llmm.streaming.SafetensorsWriter, so the model is never held) in a temporary directory. Each is then
quantized by `python -m scripts.quantize_model` (NF4, rank 64, bf16 storage) in a child process on one thread, and
its peak resident memory is the child's own VmHWM (see ``child``); the same child importing its library module
(llmm.run.quantize) and exiting gives the runtime's own share ("baseline"). --whole_model sizes (0.1 B, 0.5 B) run a
second time with the whole model loaded (the path before streaming: make_init_dir(whole_model=True)), for contrast,
and every size has a reference: a child that imports llmm.run.quantize and LoftQs one random matrix of the size's
largest target shape, alone ("one_matrix_peak_rss_gib").
LoftQ time per matrix comes from the child's quantize_report.json. To keep the run short the sizes run --loftq_iter
iterations (default 1; memory does not depend on it) and only "llama7b_layer" (one decoder layer at Llama-2-7B's
shapes) runs 5, the setting of bench_loftq: its per-matrix times compare with results/loftq_cpu.json's. The 70B
estimate is derived, not measured: the 7B layer's seconds per weight element, times Llama-2-70B's target weight
elements. The checkpoints and outputs are deleted after each size.
Writes benchmarks/results/stream_init_cpu.json (--out: elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, add_out
from llmm.run import fileio, tables
from llmm.streaming import SafetensorsWriter, shard_layout, shard_names

SIZES = {  # name -> LlamaConfig fields (hidden, intermediate, layers, heads, kv heads, vocab)
    "0.1b": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000),
    "0.5b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=32000),
    "2b": dict(hidden_size=2560, intermediate_size=6912, num_hidden_layers=24, num_attention_heads=20,
               num_key_value_heads=20, vocab_size=32000),
    "llama7b_layer": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=1024),
}
LLAMA_2_70B = {"layers": 80, "shapes": [(8192, 8192)] * 2 + [(1024, 8192)] * 2 + [(28672, 8192)] * 2
               + [(8192, 28672)]}  # q, o; k, v (grouped-query); gate, up; down
RANK, SHARD_BYTES = 64, 10**9


def write_checkpoint(folder: Path, fields: dict) -> int:
    """A random bf16 Llama checkpoint with config and tokenizer, tensor by tensor; returns its parameter count."""
    from accelerate import init_empty_weights
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(**fields, max_position_embeddings=2048, dtype="bfloat16", tie_word_embeddings=False)
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    entries = {name: (torch.bfloat16, list(p.shape)) for name, p in skeleton.state_dict().items()}
    shards = shard_layout(entries, SHARD_BYTES)
    files = shard_names(len(shards))
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    for file, shard in zip(files, shards):
        writer = SafetensorsWriter(folder / file, shard)
        for name, (dtype, shape) in shard.items():
            value = (torch.ones(shape) if name.endswith("norm.weight")
                     else torch.randn(shape, generator=generator) * 0.02)
            writer.put(name, value.to(dtype))
        writer.close()
    if len(files) > 1:
        weight_map = {name: file for file, shard in zip(files, shards) for name in shard}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>")),
                            pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return sum(torch.Size(shape).numel() for _, shape in entries.values())


HIGH_WATER = """
import atexit, runpy, sys
report = sys.argv.pop(1)
def write():
    with open("/proc/self/status") as status, open(report, "w") as out:
        out.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
atexit.register(write)
if sys.argv[1] == "-m":
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    code = sys.argv.pop(2)
    sys.argv = sys.argv[1:]
    exec(compile(code, "<bench>", "exec"), {"__name__": "__main__"})
"""


def child(command: list[str]) -> tuple[float, float, float]:
    """Run ``python *command`` (``-m module ...`` or ``-c code ...``) on one thread; its peak RSS (GiB), wall and CPU
    seconds. The peak is the child's own VmHWM, written by the child as it exits: ru_maxrss is not, as Linux carries
    the parent's high-water mark over into a child started by vfork + exec (which subprocess uses)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(tables.REPO_ROOT / "src"), str(tables.REPO_ROOT)])}
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log, tempfile.NamedTemporaryFile("r") as peak:
        process = subprocess.Popen([sys.executable, "-c", HIGH_WATER, peak.name, *command], cwd=tables.REPO_ROOT,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)  # a file: nothing blocks
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        if process.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{command} failed: {log.read()[-2000:]}")
        high_water_kib = int(peak.read())
    return high_water_kib / 2**20, wall, usage.ru_utime + usage.ru_stime


WHOLE_MODEL = ("import sys; from llmm.run import quantize; "
               "quantize.make_init_dir(quantize.resolve(sys.argv[1:]), whole_model=True)")


def run_size(name: str, work_dir: Path, loftq_iter: int, whole_model: bool = False) -> dict:
    folder, out = work_dir / f"llama-{name}", work_dir / "out"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    parameters = write_checkpoint(folder, SIZES[name])
    written = time.perf_counter() - started
    flags = ["--model", str(folder), "--save_dir", str(out), "--rank", str(RANK), "--bits", "4", "--quant", "nf",
             "--dtype", "bfloat16", "--task_type", "causal_lm", "--loftq_iter", str(loftq_iter)]
    whole = {}
    try:
        rss, wall, cpu = child(["-m", "scripts.quantize_model", *flags])
        report = json.loads(next(out.glob("*/quantize_report.json")).read_text())
        if whole_model:  # the same run with the whole model loaded (the path before streaming), for contrast
            whole["whole_model_peak_rss_gib"], whole["whole_model_wall_s"], _ = child(
                ["-c", WHOLE_MODEL, *flags, "--overwrite"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    layers = report["layers"]
    largest_shape = max((layer["shape"] for layer in layers.values()), key=lambda shape: shape[0] * shape[1])
    by_shape = {}
    for layer in layers.values():
        by_shape.setdefault("x".join(map(str, layer["shape"])), []).append(layer["loftq_time_s"])
    largest = max(torch.Size(layer["shape"]).numel() for layer in layers.values())
    loftq = sum(layer["loftq_time_s"] for layer in layers.values())
    return {
        "parameters": parameters, "checkpoint_gib": parameters * 2 / 2**30, "loftq_iter": loftq_iter,
        "matrices": len(layers), "largest_matrix_elements": largest, "largest_matrix_shape": largest_shape,
        "one_matrix_peak_rss_gib": one_matrix_rss(largest_shape, loftq_iter), "peak_rss_gib": rss, "wall_s": wall,
        "cpu_s": cpu,
        "loftq_s": loftq, "write_checkpoint_s": written, "mean_rel_error_loftq": report["mean_rel_error_loftq"],
        "loftq_s_per_matrix_by_shape": {shape: sum(times) / len(times) for shape, times in by_shape.items()},
        "seconds_per_million_elements": loftq / sum(torch.Size(l["shape"]).numel() for l in layers.values()) * 1e6,
        **whole,
    }


ONE_MATRIX = ("import sys, torch, llmm.run.quantize; from llmm.quant import loftq_init; "
              "rows, cols, iters = map(int, sys.argv[1:]); w = (torch.randn(rows, cols) * 0.02).bfloat16(); "
              "loftq_init(w.float(), 4, 64, iters, absmax_dtype=torch.bfloat16)")


def one_matrix_rss(shape: list[int], loftq_iter: int) -> float:
    """Peak RSS (GiB) of a child that imports llmm.run.quantize and LoftQs one random bf16 matrix of ``shape``."""
    return child(["-c", ONE_MATRIX, *map(str, shape), str(loftq_iter)])[0]


def estimate_70b(layer_7b: dict, baseline_gib: float) -> dict:
    """Llama-2-70B's LoftQ time, derived (not measured) from seconds per weight element at 5 iterations, NF4, rank 64,
    1 thread: this run's 7B-shaped layer, and bench_loftq's 7B shapes (results/loftq_cpu.json, CPU seconds)."""
    elements = LLAMA_2_70B["layers"] * sum(rows * cols for rows, cols in LLAMA_2_70B["shapes"])
    rates = {"this_run_wall": layer_7b["seconds_per_million_elements"] / 1e6}
    loftq = RESULTS / "loftq_cpu.json"
    if loftq.is_file():  # one 7B layer: 4 x q_proj's shape, down_proj, 2 x gate_proj's shape (gate, up)
        weights = json.loads(loftq.read_text())["weights"]
        layer = [("llama_q_proj", 4), ("llama_down_proj", 1), ("llama_gate_proj", 2)]
        seconds = sum(weights[name]["nf4"]["truncated"]["cpu_s"] * count for name, count in layer)
        size = sum(torch.Size(weights[name]["nf4"]["shape"]).numel() * count for name, count in layer)
        rates["bench_loftq_cpu"] = seconds / size
    hours = {basis: elements * rate / 3600 for basis, rate in rates.items()}
    # Memory: LoftQ's bytes per element of the largest matrix (the one-matrix reference above the runtime's
    # baseline) x 70B's largest matrix (28672 x 8192), plus the baseline.
    per_element = ((layer_7b["one_matrix_peak_rss_gib"] - baseline_gib) * 2**30
                   / layer_7b["largest_matrix_elements"])
    largest = max(rows * cols for rows, cols in LLAMA_2_70B["shapes"])
    return {"derived_not_measured": True, "target_elements": elements,
            "loftq_bytes_per_element": per_element,
            "peak_rss_gib_one_matrix": baseline_gib + per_element * largest / 2**30,
            "one_thread_hours": hours, "sixteen_threads_hours_ideal": {k: v / 16 for k, v in hours.items()},
            "basis": "seconds per weight element (5 iterations, NF4, rank 64, 1 thread) x Llama-2-70B's target "
                     "elements (80 layers: q, o 8192^2; k, v 1024 x 8192; gate, up, down 8192 x 28672). this_run_wall: "
                     "the llama7b_layer run here (wall clock on the shared machine, slowed by other jobs); "
                     "bench_loftq_cpu: CPU seconds of the same shapes in results/loftq_cpu.json. 16 threads = 1 "
                     "thread / 16, perfect scaling: a lower bound (on this shared 2-core machine 2 threads were "
                     "slower than 1, see loftq_cpu.json); reading and writing 2 x 129 GiB comes on top. Memory: "
                     "peak_rss_gib_one_matrix = the runtime's baseline + LoftQ's bytes per element (llama7b_layer's "
                     "one-matrix reference) x 28672 x 8192; the streamed runs held up to 0.4 GiB more than their "
                     "one-matrix reference."}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["0.1b", "0.5b", "2b", "llama7b_layer"], choices=list(SIZES))
    parser.add_argument("--loftq_iter", type=int, default=1, help="iterations for the sizes (llama7b_layer: 5)")
    parser.add_argument("--whole_model", nargs="*", default=["0.1b", "0.5b"],
                        help="sizes also run with the whole model loaded, for contrast")
    parser.add_argument("--one_matrix_only", action="store_true", help="only the one-matrix reference, for "
                        "sizes already in --out (needs their largest_matrix_shape)")
    parser.add_argument("--work_dir", default=None, help="where the checkpoints are written, in a temporary directory "
                        "of their own (default: the system's temporary directory)")
    add_out(parser, "stream_init_cpu.json; sizes already there are kept")
    args = parser.parse_args()
    torch.set_num_threads(1)
    output = Path(args.out) if args.out else RESULTS / "stream_init_cpu.json"
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    results = json.loads(output.read_text()) if output.is_file() else {}
    results.update({"device": f"CPU {platform.machine()}, 1 thread (2-core shared VM)",
                    "date": time.strftime("%Y-%m-%d"), "versions": fileio.versions(),
                    "settings": {"rank": RANK, "bits": 4, "quant": "nf", "dtype": "bfloat16",
                                 "output_shard_bytes": "llmm.streaming.SHARD_BYTES"}})
    baseline, _, _ = child(["-c", "import llmm.run.quantize"])
    results["baseline_rss_gib"] = baseline
    sizes = results.setdefault("sizes", {})
    if args.one_matrix_only:  # add the one-matrix reference to sizes measured before
        for name in [size for size in args.sizes if size in sizes]:
            entry = sizes[name]
            shape = entry.setdefault("largest_matrix_shape",  # a Llama's largest target: the MLP's
                                     [SIZES[name]["intermediate_size"], SIZES[name]["hidden_size"]])
            entry["one_matrix_peak_rss_gib"] = one_matrix_rss(shape, entry["loftq_iter"])
            fileio.write_json(output, results)
        if "llama7b_layer" in sizes:
            results["llama_2_70b_estimate"] = estimate_70b(sizes["llama7b_layer"], results["baseline_rss_gib"])
            fileio.write_json(output, results)
        return
    with tempfile.TemporaryDirectory(prefix="bench_stream_init-", dir=args.work_dir) as work_dir:
        for name in args.sizes:
            sizes[name] = run_size(name, Path(work_dir), 5 if name == "llama7b_layer" else args.loftq_iter,
                                   whole_model=name in args.whole_model)
            print(name, json.dumps(sizes[name]), flush=True)
            if "llama7b_layer" in sizes:
                results["llama_2_70b_estimate"] = estimate_70b(sizes["llama7b_layer"], results["baseline_rss_gib"])
            fileio.write_json(output, results)


if __name__ == "__main__":
    main()
