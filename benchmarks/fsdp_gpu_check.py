"""The prepared GPU check of sharded training (benchmarks/gpu_check.sh runs it): FSDP2 and FSDP1 over an NF4
backbone stored in bfloat16, with CPU offload, through the HF Trainer exactly as a user starts it:

    accelerate launch --config_file configs/accelerate/fsdp2.yaml --num_processes N --fsdp_offload_params true \\
        -m scripts.train_gsm8k ... --load_in_4bit true --dtype bfloat16 --gradient_checkpointing true \\
        --gradient_checkpointing_reentrant true

(and the same with configs/accelerate/fsdp1.yaml) at world size 1 (and 2 when the machine has 2 GPUs), a few steps
of a synthetic Llama (random weights, byte-level tokenizer, tests/data/gsm8k.jsonl), beside the same run in one plain
process (no FSDP, the same global batch). Recorded in benchmarks/results/fsdp_nf4_cuda.json, per engine: each
process's peak GPU memory, the per-step losses of both runs and their largest relative difference (not bit-exact:
bf16 gathers and another gradient-reduction order), how many tensors adapter/ and mean_adapter/ hold (FSDP1 saved
none before llmm.model.adapter_state_dict), whether adapter/ reloads in one process (load_llmm_model) and
mean_adapter/ in plain PEFT, and their logits' gap; then the run resumed from its last (sharded, at max_steps)
checkpoint, which only evaluates and exports: its adapter/ must equal the run's.

    python -m benchmarks.fsdp_gpu_check --out benchmarks/results/fsdp_nf4_cuda.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ENGINES = {"fsdp2": "configs/accelerate/fsdp2.yaml", "fsdp1": "configs/accelerate/fsdp1.yaml"}


def make_model(folder: Path, hidden: int, layers: int) -> Path:
    """A random Llama in bfloat16 with the tests' offline byte-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from test_prompts import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def run_argv(model: Path, out: Path, batch: int, steps: int) -> list[str]:
    return ["--model", "llama-2-7b", "--rank", "64", "--model_name_or_path", str(model), "--init", "lora",
            "--data", str(ROOT / "tests/data/gsm8k.jsonl"), "--eval_split", "heldout", "--eval_size", "2",
            "--load_in_4bit", "true", "--dtype", "bfloat16", "--max_steps", str(steps), "--logging_steps", "1",
            "--save_steps", str(steps), "--eval_steps", str(steps), "--per_device_train_batch_size", str(batch),
            "--gradient_accumulation_steps", "1", "--gradient_checkpointing", "true",
            "--gradient_checkpointing_reentrant", "true", "--output_dir", str(out), "--overwrite"]


def worker(argv: list[str]) -> None:
    """One process of a run: the train_gsm8k command line in this process (as ``python -m scripts.train_gsm8k``
    runs it), then its peak GPU memory to OUTPUT_DIR/peak_memory_<rank>.json."""
    import runpy

    sys.argv = ["scripts.train_gsm8k", *argv]
    try:
        runpy.run_module("scripts.train_gsm8k", run_name="__main__")
    except SystemExit as stop:
        if stop.code:
            raise
    rank = int(os.environ.get("RANK", "0"))
    out = Path(argv[argv.index("--output_dir") + 1])
    cuda = torch.cuda.is_available()
    peak = {"rank": rank, "max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None}
    (out / f"peak_memory_{rank}.json").write_text(json.dumps(peak))


def launch(model: Path, out: Path, processes: int, steps: int, engine: str | None, *extra: str) -> dict:
    """A run of train_gsm8k: under ``engine`` (a key of ENGINES) with ``processes`` processes of batch 1, or in one
    plain process with the same global batch (engine None); ``extra`` arguments replace --overwrite."""
    argv = run_argv(model, out, batch=1 if engine else processes, steps=steps)
    if extra:
        argv = [*argv[:argv.index("--overwrite")], *extra]
    if engine:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / ENGINES[engine]), "--num_processes", str(processes),
                   "--fsdp_offload_params", "true", "-m", "benchmarks.fsdp_gpu_check", "--worker", *argv]
    else:
        command = [sys.executable, "-m", "benchmarks.fsdp_gpu_check", "--worker", *argv]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    record = {"command": " ".join(command), "returncode": done.returncode}
    if done.returncode != 0:
        return {**record, "stderr_tail": done.stderr[-3000:]}
    results = json.loads((out / "results.json").read_text())
    record["losses"] = [entry["loss"] for entry in results["history"] if "loss" in entry]
    record["eval_loss"] = results["eval_loss"]
    record["peak_memory"] = [json.loads(path.read_text()) for path in sorted(out.glob("peak_memory_*.json"))]
    return record


def adapter_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def saved_check(out: Path) -> dict:
    """How many tensors adapter/ (directions among them) and mean_adapter/ hold: an empty adapter fails."""
    adapter, mean = adapter_tensors(out / "adapter"), adapter_tensors(out / "mean_adapter")
    directions = sum("lora_llmm_" in key for key in adapter)
    return {"adapter_tensors": len(adapter), "adapter_direction_tensors": directions,
            "mean_adapter_tensors": len(mean), "saved_nonempty": bool(directions and mean)}


def resume_check(model: Path, out: Path, processes: int, steps: int, engine: str) -> dict:
    """The run resumed from its newest checkpoint (sharded, at max_steps): no training, adapter/ unchanged."""
    before = adapter_tensors(out / "adapter")
    record = launch(model, out, processes, steps, engine, "--resume_from_checkpoint")
    if record["returncode"] == 0:
        after = adapter_tensors(out / "adapter")
        record["adapter_unchanged"] = before.keys() == after.keys() and all(
            torch.equal(before[key], after[key]) for key in before)
    return record


def reload_check(model: Path, out: Path) -> dict:
    """adapter/ in one process (Llmm, mean network) and mean_adapter/ in plain PEFT: their logits' largest gap."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from llmm import load_llmm_model

    def backbone():
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.bfloat16)
        return AutoModelForCausalLM.from_pretrained(model, quantization_config=quantization, dtype=torch.bfloat16,
                                                    device_map={"": 0})

    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        llmm_logits = load_llmm_model(backbone(), str(out / "adapter")).eval()(input_ids=ids).logits.float()
        plain_logits = PeftModel.from_pretrained(backbone(), str(out / "mean_adapter")).eval()(input_ids=ids)
    gap = (llmm_logits - plain_logits.logits.float()).abs().max().item()
    return {"adapter_reloads": bool(torch.isfinite(llmm_logits).all()), "mean_adapter_loads_in_peft": True,
            "max_abs_logit_gap_llmm_mean_vs_peft": gap}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/fsdp_nf4_cuda.json"))
    parser.add_argument("--engines", default="fsdp2,fsdp1", help="comma-separated: " + ", ".join(ENGINES))
    parser.add_argument("--work", default="/tmp/llmm_fsdp_gpu_check")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    engines = args.engines.split(",")
    if not set(engines) <= ENGINES.keys():
        print(f"error: --engines takes {', '.join(ENGINES)}, got {args.engines!r}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: no CUDA device here: this check runs on GPUs (tests/test_sharded.py is the CPU evidence)",
              file=sys.stderr)
        return 2
    work = Path(args.work)
    model = make_model(work / "model", args.hidden, args.layers)
    report = {"model": f"random Llama hidden {args.hidden}, {args.layers} layers, bf16; NF4 (bf16 storage under "
                       "FSDP, uint8 in the plain run), Llmm K=2 rank 64, reentrant gradient checkpointing",
              "device": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
              "torch": torch.__version__, "runs": {}}
    status = 0
    for processes in [1, 2][:max(1, min(2, torch.cuda.device_count()))]:
        plain = launch(model, work / f"plain_{processes}", processes, args.steps, None)
        for engine in engines:
            entry = engine_check(model, work / f"{engine}_offload_{processes}", processes, args.steps, engine, plain)
            status |= 0 if entry["passed"] else 1
            report["runs"][f"{engine}_world_size_{processes}"] = entry
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({name: {"passed": run["passed"], "max_rel_loss_diff": run.get("max_rel_loss_diff")}
                      for name, run in report["runs"].items()}))
    return status


def engine_check(model: Path, out: Path, processes: int, steps: int, engine: str, plain: dict) -> dict:
    """One engine's run against the plain one: losses, saved and reloaded adapters, resume at max_steps."""
    sharded = launch(model, out, processes, steps, engine)
    entry = {"plain_one_process_same_global_batch": plain, f"{engine}_cpu_offload": sharded, "passed": False}
    if plain["returncode"] != 0 or sharded["returncode"] != 0:
        return entry
    pairs = list(zip(plain["losses"], sharded["losses"]))
    entry["max_rel_loss_diff"] = max(abs(a - b) / max(abs(a), 1e-12) for a, b in pairs)
    entry["saved"] = saved_check(out)
    entry["reload"] = reload_check(model, out) if entry["saved"]["saved_nonempty"] else None
    entry["resume_at_max_steps"] = resume_check(model, out, processes, steps, engine)
    finite = all(map(math.isfinite, sum(pairs, ())))
    entry["passed"] = (len(pairs) == steps and entry["max_rel_loss_diff"] < 2e-2 and finite
                       and entry["saved"]["saved_nonempty"] and entry["resume_at_max_steps"].get("adapter_unchanged"))
    return entry


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        raise SystemExit(main())
