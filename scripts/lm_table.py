"""Gather the Llama runs into seed tables: GSM8K test accuracy, Alpaca / HH-RLHF held-out loss and perplexity.

    python -m scripts.lm_table runs/gsm8k                    # test_gsm8k results (accuracy) and training results
    python -m scripts.lm_table runs/nlg --baseline loftq --output runs/nlg/table.md

Reads every results.json below the paths: a scripts.test_gsm8k evaluation (GSM8K accuracy, x 100) or a training run
of scripts.train_gsm8k / scripts.train_nlg (held-out loss and perplexity after training). One table per task and
metric, one row per cell: n seeds, median, mean ± sd, and for every method with a --baseline run (default loftq) of
the same settings on shared seeds, the paired difference method - baseline with its 95 % bootstrap interval
(llmm.stats; for loss and perplexity lower is better, so a negative difference favours the method).

Runs are pooled as seeds only when the ``cell`` of their results.json (every setting but the seed; for a test,
the trained run's settings plus the test's: mode, decoding, mc_samples, ...) is equal; runs that differ in anything
else are separate rows, labelled by the settings that tell them apart. Two runs of one cell with one seed are an
error.
"""

from __future__ import annotations

import argparse
import json

from llmm import outdirs, stats
from llmm.run.cli import run_main
from llmm.run.fileio import write_text

METHOD_ORDER = ("lora", "qlora", "loftq", "llmm")
LABEL_FIELDS = ("method", "model", "rank")  # always in a row's label; other settings only where they differ
METRICS = {"accuracy": ("GSM8K test accuracy (%)", 100.0), "eval_loss": ("held-out loss", 1.0),
           "eval_perplexity": ("held-out perplexity", 1.0)}


def read_records(paths: list[str]) -> list[dict]:
    """One record per (results.json, metric): {path, task, metric, seed, cell, value}."""
    files = stats.result_files(paths, "scripts.train_gsm8k / scripts.train_nlg / scripts.test_gsm8k")
    records = []
    for file in files:
        try:
            results = json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{str(file)!r} is not valid JSON ({error}): delete it or re-run what writes it") from None
        if not isinstance(results, dict):
            continue
        metrics = ["accuracy"] if "accuracy" in results else [m for m in ("eval_loss", "eval_perplexity")
                                                              if m in results]
        task = "gsm8k" if "accuracy" in results else results.get("task") or (results.get("cell") or {}).get("task")
        for metric in metrics:
            records.append({"path": str(file), "task": task, "metric": metric, "seed": results.get("seed"),
                            "cell": results.get("cell"),
                            "value": stats.metric_value(results[metric], str(file), metric) * METRICS[metric][1]})
    if not records:
        raise FileNotFoundError(f"no GSM8K test or causal-LM training results.json below {paths}: run "
                                "scripts.train_gsm8k / scripts.train_nlg / scripts.test_gsm8k first")
    return records


def label(cell: dict, fields: list[str]) -> str:
    text = " ".join(str(cell.get(name)) for name in LABEL_FIELDS if cell.get(name) is not None)
    extra = [f"{name}={cell.get(name)}" for name in fields if name not in LABEL_FIELDS]
    return text + (f" ({', '.join(extra)})" if extra else "")


def table(records: list[dict], baseline: str) -> str:
    """Markdown: one section per (task, metric)."""
    sections = []
    for task, metric in sorted({(r["task"], r["metric"]) for r in records}, key=str):
        chosen = [r for r in records if (r["task"], r["metric"]) == (task, metric)]
        groups = stats.group_by_cell(chosen)
        cells = [g["cell"] for g in groups.values()]
        fields = stats.distinguishing_fields(cells, LABEL_FIELDS)
        lines = [f"{task}, {METRICS[metric][0]}; Δ = paired difference vs {baseline} on the same seeds, mean [95 % "
                 "bootstrap interval]:", "", f"| Method | n | Median | Mean ± sd | Δ vs {baseline} |",
                 "|---|---|---|---|---|"]
        rows = []
        for group in groups.values():
            cell, values = group["cell"], {seed: run["value"] for seed, run in group["runs"].items()}
            summary = stats.summarize(list(values.values()))
            base = stats.find_baseline(cell, cells, baseline) if cell.get("method") != baseline else None
            difference = stats.paired_difference(values, {s: r["value"] for s, r in
                                                          groups[stats.cell_key(base)]["runs"].items()}) if base else None
            digits = 3 if metric == "eval_loss" else 2
            spread = (f"{summary['mean']:.{digits}f} ± {summary['sd']:.{digits}f}" if summary["n"] > 1
                      else f"{summary['mean']:.{digits}f}")
            spread += stats.left_out_note(summary)  # non-finite values (a diverged run) named, not averaged
            name = label(cell, fields)
            order = METHOD_ORDER.index(cell.get("method")) if cell.get("method") in METHOD_ORDER else 99
            rows.append(((order, name), f"| {name} | {summary['n']} | {summary['median']:.{digits}f} | {spread} | "
                                        f"{stats.format_difference(difference, digits)} |"))
        sections.append("\n".join(lines + [row for _, row in sorted(rows)]))
    return "\n\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("paths", nargs="+", help="run directories (searched recursively) or results.json files")
    parser.add_argument("--baseline", default="loftq", help="method the others are paired with (same settings, "
                        "same seeds)")
    parser.add_argument("--output", default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    if args.output:  # never a directory, never over a file of the runs it reads
        outdirs.check_output_file(args.output)
        outdirs.check_outputs_apart({"--output": args.output}, {"paths": args.paths}, files=("--output",))
    text = table(read_records(args.paths), args.baseline)
    if args.output:
        write_text(args.output, text)
    print(text, end="")
    return text


if __name__ == "__main__":
    run_main(main)
