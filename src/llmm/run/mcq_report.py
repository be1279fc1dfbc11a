"""The multiple-choice tables (scripts.mcq_table): accuracy / ECE / NLL / Brier per task and eval set, seeds pooled
by cell, paired differences against a baseline method, and the learned distribution's width."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llmm import stats
from llmm.run import schema, tables
from llmm.tasks.calibration import SAMPLED_MODES

PUBLISHED = tables.CONFIGS / "mcq_published.yaml"
TASK_ORDER = ("winogrande_s", "arc_c", "arc_e", "winogrande_m", "obqa", "boolq")
METHOD_ORDER = ("map", "mcdropout", "ensemble", "llmm", "llmm_pex", "llmm_tfb", "llmm_nll", "llmm_ent")
METRICS = {"accuracy": ("Accuracy (%, higher is better)", 100), "ece": ("ECE (%, 15 bins, lower is better)", 100),
           "nll": ("NLL (lower is better)", 1), "brier": ("Brier (lower is better)", 1)}
# Always in a row's label (or its column); other settings are named only where they tell rows apart.
SHOWN = ("task", "eval_set", "method", "variant", "backbone", "K", "eval_mode", "eval_samples")
WIDTH_SHOWN = ("task", "method", "variant", "backbone", "K")  # the same for the width table's runs
# What a method and its baseline may differ in to be paired: the method and what it implies, and the mode it is
# evaluated in (the baseline in its mean mode). Everything else, the backbone included, must be equal.
PAIRING_FREE = ("method", "variant", "K", "llmmscale", "scaled_gradient", "lora_dropout", "eval_mode", "eval_samples",
                "entropy_weight", "entropy_warmup_ratio", "entropy_floor", "mc_dropout", *stats.NOISE_FIELDS)


def row_label(cell: dict, extra: list[str]) -> str:
    if cell["method"] == "ensemble":
        text = f"ensemble {cell['backbone']} K{cell['K']} M={cell['eval_samples']}"
    else:
        text = f"{cell.get('variant') or cell['method']} {cell['backbone']} K{cell['K']}"
        mode = cell.get("eval_mode")  # None: a trained run's cell (the width table)
        text += (f" {mode}" if mode else "") + (f" N={cell['eval_samples']}" if mode in SAMPLED_MODES else "")
    named = [stats.label_part(cell, name) for name in extra]
    return text + (f" ({', '.join(named)})" if named else "")


def column(cell: dict) -> str:
    return cell["task"] if cell["eval_set"] == cell["task"] else f"{cell['task']}->{cell['eval_set']}"


def gather(paths: list[str]) -> tuple[list[dict], list[dict], list[str]]:
    """(one record per evaluation, one per trained run with a width history, the incomplete files skipped)."""
    records, widths, skipped = [], [], []
    for file, results in stats.read_results(paths, "scripts/train_mcq.py"):
        if not isinstance(results, dict) or "evaluations" not in results:
            raise ValueError(f"{str(file)!r} is not a multiple-choice results.json (no 'evaluations'): pass "
                             "directories written by scripts/train_mcq.py or scripts/test_mcq.py")
        if not results.get("complete"):
            skipped.append(str(file))
            continue
        costs = run_costs(results)
        for entry in stats.check_entries(results["evaluations"], str(file)):
            records.append({"path": f"{file} ({entry['eval_set']} {entry['mode']})", "seed": entry.get("seed"),
                            "cell": acted_cell(entry.get("cell")), "questions": question_key(entry.get("questions")),
                            "costs": {**costs, "test_s": entry.get("wall_time_s")},
                            "metrics": {name: stats.metric_value(entry.get(name), str(file), name) * scale
                                        for name, (_, scale) in METRICS.items()}})
        history = results.get("width", {}).get("history")
        if history:
            widths.append({"path": str(file), "seed": results.get("seed"), "cell": acted_cell(results.get("cell")),
                           "final": history[-1]})
    return records, widths, skipped


def acted_cell(cell):
    """The cell as the run acted (llmm.stats.canonical_cell), a variant that only names its method left out
    (schema.without_method_variant: one row for --variant llmm and --method llmm)."""
    cell = stats.canonical_cell(cell, schema.McqRun)
    return schema.without_method_variant(cell) if isinstance(cell, dict) else cell


def question_key(questions) -> str | None:
    """A fingerprint of the questions an evaluation answered (ids and gold labels), or None where none were saved."""
    if not isinstance(questions, list):
        return None
    pairs = [(str(q.get("id")), q.get("label")) for q in questions if isinstance(q, dict)]
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def ensemble_members(cell: dict, seed, groups: dict, baseline: str) -> dict | None:
    """{member seed: the ``baseline``'s mean-mode evaluation of that seed with the same settings} for a deep
    ensemble; None unless every member is found, each in one cell only."""
    if cell.get("member_method") != baseline:
        return None
    joined = "+" in str(cell.get("data_seed"))
    free = {*PAIRING_FREE, "member_method", *(("data_seed",) if joined else ())}
    members, wanted = {}, str(seed).split("+")  # an ensemble's seed "1+2+3" (mcq_test.ensemble_seed)
    for group in groups.values():
        other = group["cell"]
        if other["method"] != baseline or other["eval_mode"] != "mean" or not stats.same_but(other, cell, free):
            continue
        for run_seed, record in group["runs"].items():
            if str(run_seed) in wanted:
                if str(run_seed) in members:
                    return None  # two baseline cells hold this member: which one it was is not known
                members[str(run_seed)] = record
    return members if len(members) == len(wanted) else None


def _grouped(records: list[dict], shown=SHOWN) -> tuple[dict, list[dict], list[str]]:
    """The records grouped by cell, the cells, and the settings beyond ``shown`` that tell rows apart."""
    groups = stats.group_by_cell(records)
    cells = [g["cell"] for g in groups.values()]
    return groups, cells, [f for f in stats.distinguishing_fields(cells, shown) if f not in shown]


def build(records: list[dict], baseline: str) -> list[dict]:
    """One entry per cell: row label, column, per-metric summaries over seeds, paired differences vs ``baseline``."""
    groups, cells, extra = _grouped(records)
    entries = []
    for group in groups.values():
        cell, runs = group["cell"], group["runs"]
        if cell["method"] == "ensemble":
            differences = ensemble_differences(cell, runs, groups, baseline)
        else:
            differences = stats.baseline_differences(cell, groups, baseline, METRICS, lambda r, m: r["metrics"][m],
                                                     PAIRING_FREE, lambda c: c["eval_mode"] == "mean")
        entries.append({
            "row": row_label(cell, extra), "column": column(cell), "method": cell["method"],
            "summaries": {m: stats.summarize([r["metrics"][m] for r in runs.values()]) for m in METRICS},
            "differences": differences})
    return entries


def ensemble_differences(cell: dict, runs: dict, groups: dict, baseline: str) -> dict | None:
    """Per metric, the paired difference of the ensemble minus each ``baseline`` member (on the same questions) over
    the (ensemble, member) pairs; None unless every ensemble of the row has all its members."""
    ensemble, member = {}, {}
    for seed, record in runs.items():
        members = ensemble_members(cell, seed, groups, baseline)
        if not members or any(None not in (record["questions"], m["questions"])
                              and m["questions"] != record["questions"] for m in members.values()):
            return None
        for member_seed, run in members.items():
            ensemble[str(seed), member_seed], member[str(seed), member_seed] = record, run
    return {m: stats.paired_difference({k: r["metrics"][m] for k, r in ensemble.items()},
                                       {k: r["metrics"][m] for k, r in member.items()}) for m in METRICS}


def run_costs(results: dict) -> dict:
    """Seconds per optimizer step (train_runtime less evaluations, over the steps it trained: a resumed run's own,
    after its checkpoint; None for an evaluation-only run) and the width search's seconds. A fresh run's evaluation
    at step 0 (eval_on_start) is inside its train_runtime; a resumed run's history holds the checkpoint's, timed
    before it."""
    history = results.get("history") or []
    runtime = next((log["train_runtime"] for log in history if "train_runtime" in log), None)
    resumed = results.get("resumed_from")  # .../checkpoint-N
    start = int(Path(resumed).name.removeprefix("checkpoint-")) if resumed else 0
    steps = (results.get("global_step") or 0) - start
    evaluations = sum(log.get("eval_runtime", 0.0) for log in history if not resumed or log.get("step", 0) > start)
    step_s = None if runtime is None or steps <= 0 else (runtime - evaluations) / steps
    return {"step_s": step_s, "search_s": (results.get("noise_width_search") or {}).get("wall_time_s")}


def ratio(value, reference) -> str:
    return f" ({value / reference:.2f}x)" if value and reference else ""


def cost_table(records: list[dict], baseline: str) -> list[str]:
    """Training-step and test-time cost per row (medians over seeds) and their ratio to its ``baseline`` row's: the
    one the paired table pairs it with (mean mode; none where none or several match)."""
    groups, _, extra = _grouped(records)

    def median(group, key):
        values = [r["costs"][key] for r in group["runs"].values() if r["costs"].get(key) is not None]
        return stats.summarize(values)["median"] if values else None

    candidates = [g["cell"] for g in groups.values() if g["cell"]["eval_mode"] == "mean"]
    rows = []
    for group in groups.values():
        cell = group["cell"]
        if cell["eval_set"] != cell["task"]:
            continue  # OOD sets: the in-distribution time says the cost
        step, search, test = (median(group, key) for key in ("step_s", "search_s", "test_s"))
        base = stats.find_baseline(cell, candidates, baseline, PAIRING_FREE)[0]
        step_base, test_base = ((median(groups[stats.cell_key(base)], key) for key in ("step_s", "test_s")) if base
                                else (None, None))
        rows.append((row_label(cell, extra), cell["task"],
                     f"{step:.2f}{ratio(step, step_base)}" if step is not None else "- (not trained here)",
                     f"{search:.0f}" if search is not None else "-",
                     f"{test:.1f}{ratio(test, test_base)}" if test is not None else "-"))
    if not rows:
        return []
    out = [f"### Cost: training seconds per optimizer step and test seconds (medians over seeds; ratio to "
           f"{baseline}'s, its mean mode for test time), width-search seconds", "",
           "| Method | Task | s / step | width search s | test s |", "|---|---|---|---|---|"]
    out += [f"| {' | '.join(row)} |" for row in sorted(rows, key=lambda r: (row_rank(r[0]), task_rank(r[1])))]
    return out + [""]


def task_rank(task: str) -> tuple:
    return (stats.order_rank(task, TASK_ORDER), task)


def column_rank(name: str) -> tuple:
    task, _, target = name.partition("->")
    return (*task_rank(task), target != "", target)


def row_rank(row: str) -> tuple:
    method = row.split()[0]
    return (stats.order_rank(method, METHOD_ORDER), row)


def digits(metric: str) -> int:
    return 1 if METRICS[metric][1] == 100 else 3


def metric_tables(entries: list[dict], published: dict) -> list[str]:
    columns = sorted({e["column"] for e in entries}, key=column_rank)
    rows = sorted({e["row"] for e in entries}, key=row_rank)
    by_key = {(e["row"], e["column"]): e for e in entries}
    out = []
    for metric, (title, _) in METRICS.items():
        out += [f"### {title}: median (mean ± sd, n seeds)", "", "| Method | " + " | ".join(columns) + " |",
                "|---" * (len(columns) + 1) + "|"]
        for reference in published.get("references", []):
            figures = dict(zip(published["tasks"], reference.get(metric, [])))
            if any(c in figures for c in columns):  # a reference row only where it has a figure to compare
                out.append(f"| {reference['label']} | "
                           + " | ".join(str(figures[c]) if c in figures else "-" for c in columns) + " |")
        for row in rows:
            texts = [stats.format_summary(by_key[row, c]["summaries"][metric], digits(metric)) if (row, c) in by_key
                     else "-" for c in columns]
            out.append(f"| {row} | " + " | ".join(texts) + " |")
        out.append("")
    return out


def paired_table(entries: list[dict], baseline: str) -> list[str]:
    """Every row but the baseline's: its paired differences, "-" where no baseline run matches."""
    paired = sorted((e for e in entries if e["method"] != baseline), key=lambda e: (row_rank(e["row"]),
                                                                                   column_rank(e["column"])))
    if not any(e["differences"] for e in paired):
        return [f"No row has a {baseline} run of the same task, backbone and settings to be paired with.", ""]
    out = [f"### Paired difference vs {baseline} (mean mode, same task, backbone, settings and seeds): "
           "mean [95 % bootstrap interval] (n seeds)", "",
           "| Method | Column | " + " | ".join(f"Δ {name}" for name in ("accuracy", "ECE", "NLL", "Brier")) + " |",
           "|---" * (len(METRICS) + 2) + "|"]
    for entry in paired:
        texts = [stats.format_difference((entry["differences"] or {}).get(m), digits(m)) for m in METRICS]
        out.append(f"| {entry['row']} | {entry['column']} | " + " | ".join(texts) + " |")
    if any(e["method"] == "ensemble" and e["differences"] for e in paired):
        out += ["", f"Ensemble rows: the ensemble (one evaluation) minus each of its {baseline} members (the runs it "
                "averages, mean mode, on the same questions), mean over the members and the bootstrap interval over "
                "them (n = members): the gain over one member; the interval shows member-to-member spread, not the "
                "test questions' sampling."]
    return out + [""]


def width_table(widths: list[dict]) -> list[str]:
    if not widths:
        return []
    groups, cells, extra = _grouped(widths, WIDTH_SHOWN)
    tasks = sorted({c["task"] for c in cells}, key=task_rank)
    texts: dict[str, dict[str, str]] = {}
    for group in groups.values():
        cell, finals = group["cell"], list(group["runs"].values())
        texts.setdefault(row_label(cell, extra), {})[cell["task"]] = " / ".join(
            stats.format_summary(stats.summarize([r["final"][factor]["median"] for r in finals]), 3)
            if all(r["final"].get(factor) for r in finals) else "-" for factor in ("A", "B"))
    out = ["### Width of the learned distribution at the end of training "
           "(median over layers of ||Z|| / sqrt(s) / ||M||, A / B; median (mean ± sd, n seeds))", "",
           "| Run | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for label in sorted(texts, key=row_rank):
        out.append(f"| {label} | " + " | ".join(texts[label].get(task, "-") for task in tasks) + " |")
    return out + [""]


def check_published(published: dict, file=PUBLISHED) -> None:
    """The --published file (configs/mcq_published.yaml's form): ``tasks`` and ``references``, each reference a
    ``label``, its ``source`` and per metric one figure per task; else one error naming the key and the fix."""
    file = f"--published {str(file)!r}"
    tables.check_blocks(published, {"tasks": (list, str), "references": (list, dict)}, file, ("tasks", "references"))
    for index, reference in enumerate(published["references"]):
        where = f"{file}: references[{index}]"
        tables.check_names(reference, ["label", "source", *METRICS], where)
        if not isinstance(reference.get("label"), str):
            raise ValueError(f"{where} has label {reference.get('label')!r}: give each reference a label (text)")
        for metric, figures in ((m, reference[m]) for m in METRICS if m in reference):
            if not (isinstance(figures, list) and len(figures) == len(published["tasks"])
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in figures)):
                raise ValueError(f"{where} has {metric} {figures!r}: it must be a list of {len(published['tasks'])} "
                                 "numbers, one per task of 'tasks' (or leave the metric out)")


def markdown(records: list[dict], widths: list[dict], published: dict, baseline: str) -> str:
    entries = build(records, baseline)
    return "\n".join(metric_tables(entries, published) + paired_table(entries, baseline) + width_table(widths)
                     + cost_table(records, baseline))
