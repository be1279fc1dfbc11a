"""The multiple-choice protocol's first task (winogrande_s, configs/mcq.yaml) on a CUDA device, every method of the
options' table, a few steps each: each run completes, the deep ensemble and the table build; timings recorded.

    python -m benchmarks.mcq_gpu_check                 # CUDA only (else one error line, exit 2)
    python -m benchmarks.mcq_gpu_check --cpu --steps 2 # a smoke run of this script on CPU (its figures mean nothing)

No hub: a random Llama (hidden 256, 2 layers) with the tests' byte-level tokenizer trained on the prompts (so each
answer letter is one token, as test_mcq's) and winogrande-shaped questions (the hub's fields: sentence, option1,
option2, answer) written to a temporary folder.
Methods: map (seeds 1 and 2, for the ensemble), mcdropout, llmm, llmm_pex, llmm_tfb, llmm_nll, llmm_ent (seed 1),
each with --validation_size 6 (the width rows' split, the same training questions for every row). Then
scripts.test_mcq over the two map runs (the deep ensemble) and scripts.mcq_table over everything. Writes
benchmarks/results/mcq_cuda.json (per run: wall time, steps, accuracy / NLL per mode, the chosen width) and the
table beside it (mcq_cuda_table.md).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("map", "mcdropout", "llmm", "llmm_pex", "llmm_tfb", "llmm_nll", "llmm_ent")
NAMES = ("Sarah", "Maria", "John", "Ahmed", "Lena", "Kofi", "Mei", "Ivan")
THINGS = (("trophy", "suitcase", "large"), ("ball", "box", "big"), ("cup", "jug", "small"), ("book", "bag", "heavy"))


def refuse(message: str) -> None:
    """One ``error:`` line, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def winogrande_questions(n: int, seed: int) -> list[dict]:
    """n questions in the hub's winogrande fields (answer "1" or "2"), from two templates."""
    rng, records = random.Random(seed), []
    for index in range(n):
        if index % 2:
            a, b = rng.sample(NAMES, 2)
            records.append({"sentence": f"{a} was a much better cook than {b} so _ always made dinner.",
                            "option1": a, "option2": b, "answer": "1"})
        else:
            thing, holder, size = rng.choice(THINGS)
            records.append({"sentence": f"The {thing} doesn't fit into the {holder} because the _ is too {size}.",
                            "option1": thing, "option2": holder, "answer": rng.choice("12")})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def make_model(folder: Path, files: list[Path], hidden: int = 256, layers: int = 2) -> Path:
    """A random Llama whose byte-level tokenizer writes each answer letter as one token after "Answer:"."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmm.tasks.mcq import LETTERS, format_prompt, load_mcq

    sys.path.insert(0, str(ROOT / "tests"))
    from test_prompts import byte_level_tokenizer

    texts = [format_prompt(record) for file in files for record in load_mcq(str(file))]
    tokenizer = byte_level_tokenizer(texts + [f"Answer: {letter}" for letter in LETTERS] * 20, vocab_size=400)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_argv(model: Path, train: Path, test: Path, out: Path, method: str, seed: int, steps: int,
               dtype: str) -> list[str]:
    return ["--task", "winogrande_s", "--variant", method, "--seed", str(seed), "--model_name_or_path", str(model),
            "--train_data", str(train), "--test_data", str(test), "--load_in_8bit", "false", "--dtype", dtype,
            "--max_steps", str(steps), "--logging_steps", "1", "--eval_steps", str(steps), "--save_steps",
            str(steps), *(["--mc_samples", "3"] if method != "map" else []),  # map evaluates its mean only
            "--validation_size", "6", "--output_dir", str(out)]


def summary(results: dict, wall: float) -> dict:
    """What the check records of one run (or the ensemble)."""
    return {"wall_s": round(wall, 2), "global_step": results.get("global_step"), "complete": results.get("complete"),
            "noise_width": results.get("noise_width"),
            "evaluations": [{key: entry[key] for key in ("eval_set", "mode", "N", "accuracy", "nll", "ece")}
                            for entry in results["evaluations"]]}


def entry_point(name: str, *argv) -> None:
    """``python -m scripts.<name> argv`` from the repository root (an entry point, run as a user runs it)."""
    subprocess.run([sys.executable, "-m", f"scripts.{name}", *map(str, argv)], cwd=ROOT, check=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    parser.add_argument("--cpu", action="store_true", help="run on CPU anyway (a smoke run of the script)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mcq_cuda.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.cpu:
        refuse("no CUDA device here: the multiple-choice GPU check needs one (--cpu: a smoke run)")
    from llmm.run.mcq import train as train_mcq

    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    record = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "dtype": dtype,
              "steps": args.steps, "task": "winogrande_s", "runs": {}}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        train = write_jsonl(root / "train.jsonl", winogrande_questions(30, seed=0))
        test = write_jsonl(root / "test.jsonl", winogrande_questions(16, seed=1))
        model = make_model(root / "tiny-llama", [train, test])
        for method, seed in [("map", 1), ("map", 2), *((m, 1) for m in METHODS[1:])]:
            started = time.time()
            results = train_mcq(train_argv(model, train, test, root / "runs" / f"{method}-s{seed}", method,
                                                seed, args.steps, dtype))
            if not results.get("complete") or results.get("global_step") != args.steps:
                refuse(f"{method} seed {seed} did not complete {args.steps} steps")
            if method in ("llmm_tfb", "llmm_nll") and not results.get("noise_width_search"):
                refuse(f"{method} recorded no width search")
            record["runs"][f"{method}-s{seed}"] = summary(results, time.time() - started)
        started = time.time()
        entry_point("test_mcq", "--runs", root / "runs" / "map-s1", root / "runs" / "map-s2", "--output_dir",
                    root / "runs" / "ensemble")
        ensemble = json.loads((root / "runs" / "ensemble" / "results.json").read_text())
        record["runs"]["ensemble-1+2"] = summary(ensemble, time.time() - started)
        started = time.time()
        entry_point("mcq_table", root / "runs", "--output", root / "table.md")
        table = (root / "table.md").read_text()
        record["table_s"] = round(time.time() - started, 2)
    paired = table.split("Paired difference vs map")[1] if "Paired difference vs map" in table else ""
    missing = [m for m in (*METHODS[1:], "ensemble") if f"| {m} " not in paired]
    if missing:
        refuse(f"the table pairs no row of {missing} with map")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    out.with_name(out.stem + "_table.md").write_text(table)
    print(f"multiple-choice GPU check: {len(record['runs'])} runs complete, table built -> {out}")
    return record


if __name__ == "__main__":
    main()
