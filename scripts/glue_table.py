"""Gather GLUE runs into the paper's layout, with seed statistics and paired differences against LoftQ.

    python -m scripts.glue_table runs/glue                       # every results.json below runs/glue
    python -m scripts.glue_table runs/glue runs/baselines --which last --output runs/glue/table.md

Prints two markdown tables (dev scores x 100, best epoch, or the last with --which last):

1. The paper's layout, one row per method and setting, one column per task: the **median over seeds**, e.g. "60.5"
   (CoLA Matthews), "87.5/91.2" (MRPC accuracy/F1), "88.0/88.1" (MNLI m/mm), "89.5/89.2" (STS-B Pearson/Spearman),
   with the number of seeds; the published LoftQ numbers (configs/glue_reference.yaml) as reference rows.
2. Seed statistics per row, task and metric: n, median, mean ± sd, and for every method that has a --baseline run
   (default loftq) with the same settings on shared seeds, the paired difference method - baseline with its 95 %
   bootstrap interval (llmm.stats).

Runs are pooled as seeds only when the ``cell`` their results.json records (every setting but the seed: method,
backbone, rank, K, llmmscale, eval noise mode, Monte-Carlo samples, ...) is equal; runs that differ in anything else
are separate rows, labelled by the settings that tell them apart. Two runs of one cell with the same seed are an
error. Runs whose results.json is not marked complete are left out (and listed on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys

from llmm import stats
from llmm.tasks.glue import TASKS, get_task
from llmm.run.cli import run_main
from llmm.run.fileio import write_text
from llmm.run.tables import CONFIGS, read_yaml, table_rows

COLUMN_ORDER = ("mnli", "qnli", "rte", "sst2", "mrpc", "cola", "qqp", "stsb", "wnli")  # LoftQ's table order
METHOD_ORDER = ("lora", "qlora", "loftq", "llmm")
HEADINGS = {"mnli": "MNLI m/mm", "qnli": "QNLI Acc", "rte": "RTE Acc", "sst2": "SST-2 Acc", "mrpc": "MRPC Acc/F1",
            "cola": "CoLA Mcc", "qqp": "QQP Acc/F1", "stsb": "STS-B P/S", "wnli": "WNLI Acc"}
REFERENCE = CONFIGS / "glue_reference.yaml"
LABEL_FIELDS = ("method", "backbone", "rank")  # always in a row's label; other settings only where they differ


def cell_scores(results: dict, which: str) -> list[float] | None:
    """The numbers of one cell (x 100) from a run's results.json: every dev split x every task metric."""
    task = get_task(results["task"])
    entry = results.get(which)
    if not entry:
        return None
    scores = [entry["dev"].get(split, {}).get(metric) for split in task.dev_splits for metric in task.metrics]
    return None if any(s is None for s in scores) else [100 * s for s in scores]


def metric_names(task_name: str) -> list[str]:
    task = get_task(task_name)
    return [f"{metric} ({split})" if len(task.dev_splits) > 1 else metric
            for split in task.dev_splits for metric in task.metrics]


def gather(paths: list[str], which: str) -> tuple[list[dict], list[str]]:
    """One record per complete run ({path, task, seed, cell, scores}) and the incomplete runs that were skipped."""
    files = stats.result_files(paths, "scripts/train_glue.py")
    records, skipped = [], []
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
        records.append({"path": str(file), "task": results["task"], "seed": results.get("seed"),
                        "cell": results.get("cell"), "scores": scores})
    return records, skipped


def build(records: list[dict], baseline: str) -> list[dict]:
    """One entry per cell: label, task, per-metric summaries over seeds and paired differences vs ``baseline``."""
    groups = stats.group_by_cell(records)
    # Label settings that separate cells of one task; the same for every task, so a row lines up across columns.
    fields = stats.distinguishing_fields([g["cell"] for g in groups.values()], ("task", *LABEL_FIELDS))
    entries = []
    for task in {g["cell"]["task"] for g in groups.values()}:
        cells = [g for g in groups.values() if g["cell"]["task"] == task]
        for group in cells:
            cell = group["cell"]
            seeds = sorted(group["runs"])
            per_metric = list(zip(*(group["runs"][s]["scores"] for s in seeds)))
            base = stats.find_baseline(cell, [g["cell"] for g in cells], baseline) if cell["method"] != baseline \
                else None
            base_runs = groups[stats.cell_key(base)]["runs"] if base else None
            differences = [stats.paired_difference({s: group["runs"][s]["scores"][i] for s in seeds},
                                                   {s: r["scores"][i] for s, r in base_runs.items()})
                           if base_runs else None for i in range(len(per_metric))]
            entries.append({"label": label(cell, fields), "task": task, "method": cell["method"],
                            "backbone": cell["backbone"].split(" (")[0], "rank": cell["rank"],
                            "summaries": [stats.summarize(values) for values in per_metric],
                            "differences": differences})
    return entries


def label(cell: dict, fields: list[str]) -> str:
    text = f"{cell['method']} {cell['backbone']} r{cell['rank']}"
    extra = [f"{name}={cell.get(name)}" for name in fields if name not in ("task", *LABEL_FIELDS)]
    return text + (f" ({', '.join(extra)})" if extra else "")


def reference_rows(tasks: list[str], shown: set[tuple[str, int]]) -> list[tuple[str, dict]]:
    """(label, {task: [numbers]}) of the published rows for the tasks and (backbone, rank) pairs shown."""
    rows = []
    for row in table_rows(read_yaml(REFERENCE)):
        numbers = {task: row[task] for task in tasks if task in row}
        if numbers and (f"{row['quant']} {row['bits']}-bit", row["rank"]) in shown:
            name = f"{row['method']} {row['quant']} {row['bits']}-bit r{row['rank']}, published ({row['source']})"
            rows.append((name, numbers))
    return rows


def order_key(entry_label: str) -> tuple:
    method = entry_label.split(" ")[0]
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else 99, entry_label)


def markdown(entries: list[dict], baseline: str, references: bool = True) -> str:
    tasks = [t for t in COLUMN_ORDER if any(e["task"] == t for e in entries)]
    by_label: dict[str, dict] = {}
    for entry in entries:
        by_label.setdefault(entry["label"], {})[entry["task"]] = entry
    lines = ["Median over seeds (n seeds):", "",
             "| Method | " + " | ".join(HEADINGS[t] for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for name in sorted(by_label, key=order_key):
        cells = []
        for task in tasks:
            entry = by_label[name].get(task)
            cells.append("-" if entry is None else "/".join(f"{s['median']:.1f}" for s in entry["summaries"])
                         + f" (n={entry['summaries'][0]['n']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    shown = {(e["backbone"], e["rank"]) for e in entries}
    for name, numbers in reference_rows(tasks, shown) if references else []:
        lines.append(f"| {name} | " + " | ".join("/".join(f"{v:.1f}" for v in numbers[t]) if t in numbers else "-"
                                                 for t in tasks) + " |")
    lines += ["", f"Seed statistics; Δ = paired difference vs {baseline} on the same seeds, mean [95 % bootstrap "
                  "interval]:", "", f"| Method | Task | Metric | n | Median | Mean ± sd | Δ vs {baseline} |",
              "|---|---|---|---|---|---|---|"]
    for entry in sorted(entries, key=lambda e: (order_key(e["label"]), COLUMN_ORDER.index(e["task"]))):
        for metric, summary, difference in zip(metric_names(entry["task"]), entry["summaries"], entry["differences"]):
            spread = f"{summary['mean']:.1f} ± {summary['sd']:.1f}" if summary["n"] > 1 else f"{summary['mean']:.1f}"
            lines.append(f"| {entry['label']} | {entry['task']} | {metric} | {summary['n']} | {summary['median']:.1f}"
                         f" | {spread} | {stats.format_difference(difference)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("paths", nargs="+", help="run directories (searched recursively) or results.json files")
    parser.add_argument("--which", choices=("best", "last"), default="best", help="epoch to report")
    parser.add_argument("--baseline", default="loftq", help="method the others are paired with (same settings, "
                        "same seeds)")
    parser.add_argument("--no_reference", action="store_true", help="leave out the published LoftQ rows")
    parser.add_argument("--output", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    records, skipped = gather(args.paths, args.which)
    for file in skipped:
        print(f"skipped (incomplete): {file}", file=sys.stderr)
    if not records:
        raise ValueError(f"none of the {len(skipped)} results.json files is complete: let the runs finish (or "
                         "continue them with --resume_from_checkpoint)")
    text = markdown(build(records, args.baseline), args.baseline, references=not args.no_reference)
    if args.output:
        write_text(args.output, text)
    print(text, end="")
    return text


if __name__ == "__main__":
    run_main(main)
