"""Gather multiple-choice calibration runs into BLoB-style tables: accuracy, ECE, NLL, Brier, and the width.

    python -m scripts.mcq_table runs/mcq                              # every results.json below runs/mcq
    python -m scripts.mcq_table runs/mcq --output runs/mcq/table.md

A row is one way of predicting: "llmm int8 K2 mc N=10", "map loftq-nf4 K0 mean", "mcdropout int8 K0 dropout N=10",
"ensemble int8 K0 M=3" (scripts.test_mcq over M runs). A column is the training task (its test split) or an OOD
pair "obqa->arc_c". A cell is the mean over the runs (seeds) sharing row and column: accuracy and ECE in percent,
NLL and Brier as they are; with several seeds "mean ±sd (n=3)" (plain sample standard deviation). The published
BLoB / MAP rows (configs/mcq_published.yaml) come first, marked as published, in the tables where they have a
figure for a shown column. A last table gives the learned
distribution's width at the end of training (median over layers of ||Z|| / sqrt(s) / ||M||, factors A / B).
Two results for the same row, column and seed are an error (pass the run directories you mean).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import utils_llmm as U

PUBLISHED = U.CONFIGS / "mcq_published.yaml"
TASK_ORDER = ("winogrande_s", "arc_c", "arc_e", "winogrande_m", "obqa", "boolq")
METHOD_ORDER = ("map", "mcdropout", "ensemble", "llmm")
METRICS = {"accuracy": ("Accuracy (%, higher is better)", 100), "ece": ("ECE (%, 15 bins, lower is better)", 100),
           "nll": ("NLL (lower is better)", 1), "brier": ("Brier (lower is better)", 1)}


def row_label(entry: dict) -> str:
    if entry["mode"] == "ensemble":
        return f"ensemble {entry['backbone']} K{entry['K']} M={entry['N']}"
    label = f"{entry['method']} {entry['backbone']} K{entry['K']} {entry['mode']}"
    return label + (f" N={entry['N']}" if entry["mode"] in ("mc", "dropout") else "")


def column(task: str, entry: dict) -> str:
    return task if entry["shift"] == "in-distribution" else f"{task}->{entry['eval_set']}"


def result_files(paths: list[str]) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{str(path)!r} does not exist: pass run directories or results.json files")
        files += [path] if path.is_file() else sorted(path.rglob("results.json"))
    if not files:
        raise FileNotFoundError(f"no results.json below {paths}: train with scripts/train_mcq.py first")
    return files


def gather(paths: list[str]) -> tuple[dict, dict, list[str]]:
    """({(row, column): {seed: entry}}, {(method backbone K, task): [final width summaries]}, skipped files)."""
    cells, widths, skipped, origin = defaultdict(dict), defaultdict(list), [], {}
    for file in result_files(paths):
        try:
            results = json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{str(file)!r} is not valid JSON ({error}): delete it or re-run the run") from None
        if not isinstance(results, dict) or "evaluations" not in results:
            raise ValueError(f"{str(file)!r} is not a multiple-choice results.json (no 'evaluations'): pass "
                             "directories written by scripts/train_mcq.py or scripts/test_mcq.py")
        if not results.get("complete"):
            skipped.append(str(file))
            continue
        for entry in results["evaluations"]:
            key, seed = (row_label(entry), column(results["task"], entry)), json.dumps(entry["seed"])
            if seed in cells[key]:
                raise ValueError(f"two results for {key[0]!r} on {key[1]!r}, seed {seed}: {origin[key, seed]} and "
                                 f"{file}; pass only one of them")
            cells[key][seed], origin[key, seed] = entry, str(file)
        history = results.get("width", {}).get("history")
        if history:
            widths[(f"{results['method']} {results['backbone']} K{results['K']}", results["task"])].append(history[-1])
    return cells, widths, skipped


def format_cell(values: list[float], scale: float) -> str:
    values = [v * scale for v in values]
    digits = 1 if scale == 100 else 3
    text = f"{statistics.fmean(values):.{digits}f}"
    if len(values) > 1:
        text += f" ±{statistics.stdev(values):.{digits}f} (n={len(values)})"
    return text


def ordered_columns(cells: dict) -> list[str]:
    columns = {key[1] for key in cells}

    def rank(name: str):
        task, _, target = name.partition("->")
        return (TASK_ORDER.index(task) if task in TASK_ORDER else len(TASK_ORDER), task, target != "", target)
    return sorted(columns, key=rank)


def ordered_rows(cells: dict) -> list[str]:
    rows = {key[0] for key in cells}
    return sorted(rows, key=lambda r: (METHOD_ORDER.index(r.split()[0]) if r.split()[0] in METHOD_ORDER else 99, r))


def markdown(cells: dict, widths: dict, published: dict) -> str:
    columns, rows = ordered_columns(cells), ordered_rows(cells)
    out = []
    for metric, (title, scale) in METRICS.items():
        out += [f"### {title}", "", "| Method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for reference in published.get("references", []):
            figures = dict(zip(published["tasks"], reference.get(metric, [])))
            if any(c in figures for c in columns):  # a reference row only where it has a figure to compare
                out.append(f"| {reference['label']} | "
                           + " | ".join(str(figures[c]) if c in figures else "-" for c in columns) + " |")
        for row in rows:
            texts = [format_cell([e[metric] for e in cells[(row, c)].values()], scale) if (row, c) in cells else "-"
                     for c in columns]
            out.append(f"| {row} | " + " | ".join(texts) + " |")
        out.append("")
    if widths:
        tasks = sorted({task for _, task in widths}, key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else 99, t))
        out += ["### Width of the learned distribution at the end of training "
                "(median over layers of ||Z|| / sqrt(s) / ||M||, A / B)", "",
                "| Run | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for run in sorted({run for run, _ in widths}):
            texts = []
            for task in tasks:
                finals = widths.get((run, task))
                texts.append("-" if not finals else " / ".join(
                    format_cell([f[factor]["median"] for f in finals if f.get(factor)], 1)
                    if any(f.get(factor) for f in finals) else "-" for factor in ("A", "B")))
            out.append(f"| {run} | " + " | ".join(texts) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("paths", nargs="+", help="run directories (searched recursively) or results.json files")
    parser.add_argument("--published", default=str(PUBLISHED), help="reference rows (YAML)")
    parser.add_argument("--output", default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    published = U.read_yaml(args.published)
    cells, widths, skipped = gather(args.paths)
    for file in skipped:
        print(f"skipped (incomplete): {file}", file=sys.stderr)
    if not cells:
        raise ValueError(f"none of the {len(skipped)} results.json files is complete: let the runs finish")
    text = markdown(cells, widths, published)
    if args.output:
        U.write_text(args.output, text)
    print(text, end="")
    return text


if __name__ == "__main__":
    U.run_main(main)
