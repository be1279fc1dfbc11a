"""Gather GLUE runs into a markdown table like the paper's: one row per method, one column per task.

    python -m scripts.glue_table runs/glue                       # every results.json below runs/glue
    python -m scripts.glue_table runs/glue runs/baselines --which last --output runs/glue/table.md

A row is (method, backbone, rank), e.g. "llmm nf 2-bit r32"; a cell is the best-epoch dev score x 100 (--which
last: the last epoch), averaged over the runs (seeds) that share row and task: "60.5" (CoLA Matthews),
"87.5/91.2" (MRPC accuracy/F1), "88.0/88.1" (MNLI matched/mismatched), "89.5/89.2" (STS-B Pearson/Spearman).
With several seeds the cell adds the standard deviation of its first number and the count: "60.5 ±0.8 (n=3)".
Runs whose results.json is not marked complete are left out (and listed on stderr).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from llmm.glue import TASKS, get_task
from utils_llmm import run_main, write_text

COLUMN_ORDER = ("mnli", "qnli", "rte", "sst2", "mrpc", "cola", "qqp", "stsb", "wnli")  # LoftQ's table order
METHOD_ORDER = ("lora", "qlora", "loftq", "llmm")
HEADINGS = {"mnli": "MNLI m/mm", "qnli": "QNLI Acc", "rte": "RTE Acc", "sst2": "SST-2 Acc", "mrpc": "MRPC Acc/F1",
            "cola": "CoLA Mcc", "qqp": "QQP Acc/F1", "stsb": "STS-B P/S", "wnli": "WNLI Acc"}


def cell_scores(results: dict, which: str) -> list[float] | None:
    """The numbers of one cell (x 100) from a run's results.json: every dev split x every task metric."""
    task = get_task(results["task"])
    entry = results.get(which)
    if not entry:
        return None
    scores = [entry["dev"].get(split, {}).get(metric) for split in task.dev_splits for metric in task.metrics]
    return None if any(s is None for s in scores) else [100 * s for s in scores]


def format_cell(runs: list[list[float]]) -> str:
    means = [statistics.fmean(values) for values in zip(*runs)]
    text = "/".join(f"{m:.1f}" for m in means)
    if len(runs) > 1:
        text += f" ±{statistics.stdev(r[0] for r in runs):.1f} (n={len(runs)})"
    return text


def gather(paths: list[str], which: str) -> tuple[dict, list[str]]:
    """{(method, backbone, rank): {task: [cell scores per run]}} and the incomplete runs that were skipped."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{str(path)!r} does not exist: pass run directories or results.json files")
        files += [path] if path.is_file() else sorted(path.rglob("results.json"))
    if not files:
        raise FileNotFoundError(f"no results.json below {paths}: train with scripts/train_glue.py first")
    table, skipped = defaultdict(lambda: defaultdict(list)), []
    for file in files:
        try:
            results = json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{str(file)!r} is not valid JSON ({error}): delete it or re-run the training that "
                             "writes it") from None
        if not isinstance(results, dict) or results.get("task") not in TASKS:
            task = results.get("task") if isinstance(results, dict) else None
            raise ValueError(f"{str(file)!r} is not a GLUE results.json (task {task!r}): pass GLUE run directories "
                             "(written by scripts/train_glue.py)")
        scores = cell_scores(results, which) if results.get("complete") else None
        if scores is None:
            skipped.append(str(file))
            continue
        row = (results["method"], results["backbone"], results["rank"])
        table[row][results["task"]].append(scores)
    return table, skipped


def markdown(table: dict) -> str:
    tasks = [t for t in COLUMN_ORDER if any(t in cells for cells in table.values())]
    lines = ["| Method | " + " | ".join(HEADINGS[t] for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    order = sorted(table, key=lambda row: (METHOD_ORDER.index(row[0]) if row[0] in METHOD_ORDER else 99, *row[1:]))
    for method, backbone, rank in order:
        cells = [format_cell(table[(method, backbone, rank)][t]) if t in table[(method, backbone, rank)] else "-"
                 for t in tasks]
        lines.append(f"| {method} {backbone} r{rank} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("paths", nargs="+", help="run directories (searched recursively) or results.json files")
    parser.add_argument("--which", choices=("best", "last"), default="best", help="epoch to report")
    parser.add_argument("--output", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    table, skipped = gather(args.paths, args.which)
    for file in skipped:
        print(f"skipped (incomplete): {file}", file=sys.stderr)
    if not table:
        raise ValueError(f"none of the {len(skipped)} results.json files is complete: let the runs finish (or "
                         "continue them with --resume_from_checkpoint)")
    text = markdown(table)
    if args.output:
        write_text(args.output, text)
    print(text, end="")
    return text


if __name__ == "__main__":
    run_main(main)
