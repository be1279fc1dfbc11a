"""The causal-LM tables (scripts.lm_table): GSM8K test accuracy, Alpaca / HH-RLHF held-out loss and perplexity per
cell, seeds pooled, paired differences against a baseline method."""

from __future__ import annotations

from pathlib import Path

from llmm import stats
from llmm.run import schema

METHOD_ORDER = ("lora", "qlora", "loftq", "llmm")
LABEL_FIELDS = ("method", "model", "rank")  # always in a row's label; other settings only where they differ
METRICS = {"accuracy": ("GSM8K test accuracy (%)", 100.0), "eval_loss": ("held-out loss", 1.0),
           "eval_perplexity": ("held-out perplexity", 1.0)}


def read_records(paths: list[str]) -> list[dict]:
    """One record per (results.json, metric): {path, task, metric, seed, cell, value}."""
    records = []
    for file, results in stats.read_results(paths, "scripts.train_gsm8k / scripts.train_nlg / scripts.test_gsm8k"):
        if not isinstance(results, dict):
            continue
        tested = "accuracy" in results  # a GSM8K test, else a training run
        metrics = ["accuracy"] if tested else [m for m in ("eval_loss", "eval_perplexity") if m in results]
        task = "gsm8k" if tested else results.get("task") or (results.get("cell") or {}).get("task")
        # as the runs acted (llmm.stats.canonical_cell); a test's cell is the trained run's plus its test_ settings
        cell = stats.canonical_cell(results.get("cell"), schema.CausalLMRun)
        if tested:
            cell = stats.canonical_cell(cell, schema.Gsm8kTestRun, prefix="test_")
        records += [{"path": str(file), "task": task, "metric": metric, "seed": results.get("seed"), "cell": cell,
                     "value": stats.metric_value(results[metric], str(file), metric) * METRICS[metric][1]}
                    for metric in metrics]
    if not records:
        raise FileNotFoundError(f"no GSM8K test or causal-LM training results.json below {paths}: run "
                                "scripts.train_gsm8k / scripts.train_nlg / scripts.test_gsm8k first")
    return records


def label(cell: dict, fields: list[str]) -> str:
    """"llmm llama-2-7b r64 (settings that tell it apart)"; a run of no table row names its model's directory."""
    named = {**cell, "model": cell.get("model") or Path(str(cell.get("model_name_or_path") or "")).name or None}
    text = " ".join(f"r{value}" if name == "rank" else str(value) for name in LABEL_FIELDS
                    if (value := named.get(name)) is not None)
    extra = [stats.label_part(cell, name) for name in fields if name not in LABEL_FIELDS or name not in cell]
    return text + (f" ({', '.join(extra)})" if extra else "")


def markdown(records: list[dict], baseline: str) -> str:
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
            cell = group["cell"]
            summary = stats.summarize([run["value"] for run in group["runs"].values()])
            difference = (stats.baseline_differences(cell, groups, baseline, ("value",), lambda r, _: r["value"])
                          or {}).get("value")
            digits = 3 if metric == "eval_loss" else 2
            spread = (f"{summary['mean']:.{digits}f} ± {summary['sd']:.{digits}f}" if summary["n"] > 1
                      else f"{summary['mean']:.{digits}f}")
            spread += stats.left_out_note(summary)  # non-finite values (a diverged run) named, not averaged
            name = label(cell, fields)
            rows.append(((stats.order_rank(cell.get("method"), METHOD_ORDER), name),
                         f"| {name} | {summary['n']} | {summary['median']:.{digits}f} | {spread} | "
                         f"{stats.format_difference(difference, digits)} |"))
        sections.append("\n".join(lines + [row for _, row in sorted(rows)]))
    return "\n\n".join(sections) + "\n"
