"""The GLUE table (scripts.glue_table): dev metrics of the best (or last) epoch per run, pooled over seeds by
cell, LoftQ's published rows beside them, and paired differences against a baseline method."""

from __future__ import annotations

import math
import re
from pathlib import Path

from llmm import stats
from llmm.run import schema
from llmm.run.tables import CONFIGS, read_keyed, table_rows
from llmm.tasks.glue import TASKS, get_task

# LoftQ's table order, then the quick start's BBC News (its dev and test splits)
COLUMN_ORDER = ("mnli", "qnli", "rte", "sst2", "mrpc", "cola", "qqp", "stsb", "wnli", "bbcnews")
METHOD_ORDER = ("lora", "qlora", "loftq", "llmm")
HEADINGS = {"mnli": "MNLI m/mm", "qnli": "QNLI Acc", "rte": "RTE Acc", "sst2": "SST-2 Acc", "mrpc": "MRPC Acc/F1",
            "cola": "CoLA Mcc", "qqp": "QQP Acc/F1", "stsb": "STS-B P/S", "wnli": "WNLI Acc",
            "bbcnews": "BBC News Acc/F1 dev, Acc/F1 test"}
REFERENCE = CONFIGS / "glue_reference.yaml"
LABEL_FIELDS = ("method", "backbone", "rank")  # always in a row's label; other settings only where they differ


def cell_scores(results: dict, which: str) -> list[float] | None:
    """A run's numbers (x 100): every dev split x every task metric; an undefined one (a constant or diverged
    prediction) is NaN, which the summaries list as left out."""
    task = get_task(results["task"])
    entry = results.get(which)
    if not entry:
        return None
    scores = [entry["dev"].get(split, {}).get(metric) for split in task.dev_splits for metric in task.metrics]
    return [math.nan if s is None else 100 * s for s in scores]


def metric_names(task_name: str) -> list[str]:
    task = get_task(task_name)
    return [f"{metric} ({split})" if len(task.dev_splits) > 1 else metric
            for split in task.dev_splits for metric in task.metrics]


def gather(paths: list[str], which: str) -> tuple[list[dict], list[str]]:
    """One record per complete run and the incomplete runs that were skipped."""
    records, skipped = [], []
    for file, results in stats.read_results(paths, "scripts/train_glue.py"):
        if isinstance(results, dict) and "task" not in results and {"summary", "runs"} <= set(results):
            continue  # the quick start's summary of its runs, which lie below it and are read themselves
        if not isinstance(results, dict) or results.get("task") not in TASKS:
            task = results.get("task") if isinstance(results, dict) else None
            raise ValueError(f"{str(file)!r} is not a GLUE results.json (task {task!r}): pass GLUE run directories "
                             "(written by scripts/train_glue.py)")
        seed = results.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"{str(file)!r} has seed {seed!r}, not an integer: the file is damaged; train the run "
                             "again (scripts/train_glue.py) or leave it out")
        scores = cell_scores(results, which) if results.get("complete") else None
        if scores is None:
            skipped.append(str(file))
            continue
        records.append({"path": str(file), "task": results["task"], "seed": results.get("seed"),
                        "cell": stats.canonical_cell(results.get("cell"), schema.GlueRun), "scores": scores})
    return records, skipped


def build(records: list[dict], baseline: str) -> list[dict]:
    """One entry per cell: label, task, per-metric summaries over seeds and paired differences vs ``baseline``."""
    groups = stats.group_by_cell(records)
    cells = [g["cell"] for g in groups.values()]
    # Label settings that separate cells of one task; the same for every task, so a row lines up across columns.
    fields = stats.distinguishing_fields(cells, ("task", *LABEL_FIELDS))
    entries = []
    for group in groups.values():
        cell, runs = group["cell"], group["runs"]
        per_metric = list(zip(*(runs[seed]["scores"] for seed in sorted(runs))))
        differences = stats.baseline_differences(cell, groups, baseline, range(len(per_metric)),  # same task
                                                 lambda record, i: record["scores"][i])
        entries.append({"label": label(cell, fields), "task": cell["task"], "method": cell["method"],
                        "backbone": cell["backbone"].split(" (")[0], "rank": cell["rank"],
                        "model": cell.get("model", schema.GlueRun.model),  # older cells: the default, not recorded
                        "summaries": [stats.summarize(values) for values in per_metric],
                        "differences": [differences and differences[i] for i in range(len(per_metric))]})
    return entries


def label(cell: dict, fields: list[str]) -> str:
    text = f"{cell['method']} {cell['backbone']} r{cell['rank']}"
    extra = [stats.label_part(cell, name) for name in fields if name not in ("task", *LABEL_FIELDS)]
    return text + (f" ({', '.join(extra)})" if extra else "")


def same_model(model: str | None, published: str) -> bool:
    """A run fine-tuned the published rows' model: its hub id, or a local copy (a directory of its name) or _init.sh
    directory of it (deberta-v3-base-2bit-32rank)."""
    name = re.escape(Path(published).name.lower())
    return model is not None and (model == published or re.fullmatch(rf"{name}(-\d+bit-\d+rank)?",
                                                                      Path(model).name.lower()) is not None)


def reference_rows(published: list[dict], tasks: list[str], entries: list[dict]) -> list[tuple[str, dict]]:
    """(label, {task: [numbers]}) of the published rows for the tasks, (backbone, rank) pairs and model shown."""
    rows = []
    for row in published:
        numbers = {task: row[task] for task in tasks if task in row}
        backbone = f"{row['quant']} {row['bits']}-bit"
        if numbers and any((e["backbone"], e["rank"]) == (backbone, row["rank"])
                           and same_model(e["model"], row["model"]) for e in entries):
            name = f"{row['method']} {backbone} r{row['rank']}, published ({row['model']}, {row['source']})"
            rows.append((name, numbers))
    return rows


def order_key(entry_label: str) -> tuple:
    return stats.order_rank(entry_label.split(" ")[0], METHOD_ORDER), entry_label


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
    published = table_rows(read_keyed(REFERENCE)) if references else []
    for name, numbers in reference_rows(published, tasks, entries):
        lines.append(f"| {name} | " + " | ".join("/".join(f"{v:.1f}" for v in numbers[t]) if t in numbers else "-"
                                                 for t in tasks) + " |")
    models = {row["model"] for row in published}
    if models and not any(same_model(e["model"], model) for e in entries for model in models):
        lines += ["", f"LoftQ's published rows ({', '.join(sorted(models))}) are left out: no run here fine-tunes "
                      "that model."]
    lines += ["", f"Seed statistics; Δ = paired difference vs {baseline} on the same seeds, mean [95 % bootstrap "
                  "interval]:", "", f"| Method | Task | Metric | n | Median | Mean ± sd | Δ vs {baseline} |",
              "|---|---|---|---|---|---|---|"]
    for entry in sorted(entries, key=lambda e: (order_key(e["label"]), COLUMN_ORDER.index(e["task"]))):
        for metric, summary, difference in zip(metric_names(entry["task"]), entry["summaries"], entry["differences"]):
            spread = f"{summary['mean']:.1f} ± {summary['sd']:.1f}" if summary["n"] > 1 else f"{summary['mean']:.1f}"
            spread += stats.left_out_note(summary)  # undefined or non-finite values named, not averaged
            lines.append(f"| {entry['label']} | {entry['task']} | {metric} | {summary['n']} | {summary['median']:.1f}"
                         f" | {spread} | {stats.format_difference(difference)} |")
    return "\n".join(lines) + "\n"
