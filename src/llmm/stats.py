"""Seed statistics for the result tables: what a cell is, its summary over seeds, and paired differences.

    record = {"seed": 3, "cell": cell_of(settings), ...}     # what every results.json carries
    cells = group_by_cell(records)                           # {cell key: {seed: record}}; a repeated seed is an error
    summarize([60.1, 61.3, 59.8, 60.9])                      # n, median, mean, sd
    paired_difference({0: 61.0, 1: 60.2}, {0: 59.5, 1: 60.0})  # mean of method - baseline over shared seeds, 95 % CI

A *cell* is every setting that defines an experiment except the seed (method, task, backbone, bits, rank, K, eval
noise mode, Monte-Carlo samples, learning rate, ...), read from the ``cell`` record the training and test scripts
write into results.json. Runs are pooled as seeds only when their cells are equal; runs that differ in anything else
are different cells, shown as different rows (never averaged together). *Paired* compares a method with a baseline
run on the same seeds: with common random numbers (the Llmm noise has its own generator) the two runs of one seed see
the same data order, initialisation and dropout masks, so the per-seed difference removes most seed-to-seed noise.

The interval is a percentile bootstrap of the mean paired difference: ``N_RESAMPLES`` = 10,000 resamples of the seeds
with replacement from a generator seeded with ``BOOTSTRAP_SEED`` = 0 (so a table is reproducible). With n seeds
there are at most n^n distinct resamples; with 4 seeds the percentile interval is coarse and somewhat too narrow,
so read it as a guide, not a test. One seed gives no interval.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np

from llmm.run import schema

N_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
LEVEL = 0.95

# Settings that do not change a run's numbers (role "run" in llmm.run.schema): never part of a cell.
NOT_CELL = schema.not_cell()
# Settings a method implies: a method and its baseline may differ in these (and only these) to be paired.
METHOD_FIELDS = ("method", "K", "llmmscale", "scaled_gradient", "gaussian_embeddings", "init", "backbone",
                 "init_source", "init_dir", "model_name_or_path", "test_model_name_or_path")

# Settings a row label names first when rows must be told apart (then the rest, alphabetically).
PREFERRED_LABELS = ("K", "bits", "quant", "eval_noise", "mc_samples", "test_mode", "test_decoding",
                    "test_mc_samples")


def result_files(paths: list[str], made_by: str) -> list[Path]:
    """The results.json files the table paths name (files, or directories searched recursively); ``made_by`` names
    the script whose runs write them, for the error when there are none."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{str(path)!r} does not exist: pass run directories or results.json files")
        files += [path] if path.is_file() else sorted(path.rglob("results.json"))
    if not files:
        raise FileNotFoundError(f"no results.json below {paths}: train with {made_by} first")
    return files


def cell_of(settings) -> dict:
    """The cell of a run: its resolved settings (a Settings object, or a settings.json's dict) without the seed and
    without what does not change its numbers."""
    values = settings.record() if isinstance(settings, schema.Settings) else settings
    return {key: value for key, value in sorted(values.items()) if key not in NOT_CELL}


def test_cell(run_dir, test_settings: dict) -> tuple[int | None, dict]:
    """(training seed, cell) of an evaluation of a trained run: the run's cell (its results.json, else its
    settings.json) plus the evaluation's settings as ``test_<name>`` (the generation seed included)."""
    run_dir = Path(run_dir)
    results = run_dir / "results.json"
    trained = json.loads(results.read_text()) if results.is_file() else {}
    if "cell" not in trained:
        settings = json.loads((run_dir / "settings.json").read_text()) if (run_dir / "settings.json").is_file() else {}
        trained = {"seed": settings.get("seed"), "cell": cell_of(settings)}
    test = {f"test_{key}": value for key, value in cell_of(test_settings).items() if key != "K"}  # K: a check
    return trained.get("seed"), {**trained["cell"], **test, "test_seed": test_settings.get("seed")}


def cell_key(cell: dict) -> str:
    return json.dumps(cell, sort_keys=True, default=str)


def metric_value(value, where: str, name: str) -> float:
    """A metric read from a results.json as a float (inf / nan kept, shown as such by the tables); None, a string,
    a bool or a list is a ValueError naming ``where`` (the run file) and the metric."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: metric {name!r} is {value!r}, not a number: re-run that run, or leave it out of "
                         "the table's paths")
    return float(value)


def check_entries(entries, where: str, field: str = "evaluations") -> list[dict]:
    """A results.json's list of records (``evaluations``, ``runs``): a list of objects, else a ValueError naming
    ``where``."""
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError(f"{where}: {field!r} is {type(entries).__name__} {str(entries)[:60]!r}, not a list of "
                         "records: re-run that run, or leave it out of the table's paths")
    return entries


def summarize(values: list[float]) -> dict:
    """n, median, mean and sample standard deviation (NaN for one value) of the finite values; the non-finite
    ones (a diverged run's inf perplexity, a nan) are left out of the statistics and listed in ``left_out`` (present
    only then)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize needs at least one value")
    finite = [v for v in values if math.isfinite(v)]
    left_out = [v for v in values if not math.isfinite(v)]
    if not finite:
        return {"n": 0, "median": math.nan, "mean": math.nan, "sd": math.nan, "left_out": left_out}
    sd = statistics.stdev(finite) if len(finite) > 1 else math.nan
    summary = {"n": len(finite), "median": statistics.median(finite), "mean": statistics.fmean(finite), "sd": sd}
    return {**summary, "left_out": left_out} if left_out else summary


def bootstrap_interval(differences: list[float], n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                       level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``differences`` (resampled with replacement)."""
    values = np.asarray(differences, dtype=np.float64)
    if values.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_resamples, values.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_difference(method: dict, baseline: dict, **bootstrap) -> dict | None:
    """Method minus baseline on the seeds both have ({seed: value} each): n, the seeds, mean difference, interval.
    Seeds where either value is not finite are left out (listed in ``left_out``). None if they share no seed."""
    shared = sorted(set(method) & set(baseline))
    if not shared:
        return None
    seeds = [s for s in shared if math.isfinite(float(method[s])) and math.isfinite(float(baseline[s]))]
    left_out = [s for s in shared if s not in seeds]
    if not seeds:
        return {"n": 0, "seeds": [], "mean": math.nan, "low": math.nan, "high": math.nan, "left_out": left_out}
    differences = [float(method[s]) - float(baseline[s]) for s in seeds]
    low, high = bootstrap_interval(differences, **bootstrap)
    difference = {"n": len(seeds), "seeds": seeds, "mean": statistics.fmean(differences), "low": low, "high": high}
    return {**difference, "left_out": left_out} if left_out else difference


def group_by_cell(records: list[dict]) -> dict[str, dict]:
    """{cell key: {"cell": cell, "runs": {seed: record}}}. Two records of one cell with one seed are an error: they
    are not two seeds, and pooling them would count one seed twice (``record["path"]`` names them)."""
    groups: dict[str, dict] = {}
    for record in records:
        if not isinstance(record.get("cell"), dict) or "seed" not in record:
            raise ValueError(f"{record.get('path', 'a results.json')} has no 'cell'/'seed' record (written by an "
                             "older version of the scripts): re-run it, or leave it out of the table")
        record["cell"] = schema.current_names(record["cell"])  # old run directories' names are today's
        group = groups.setdefault(cell_key(record["cell"]), {"cell": record["cell"], "runs": {}})
        seed = record["seed"]
        if seed in group["runs"]:
            raise ValueError(f"{group['runs'][seed].get('path')} and {record.get('path')} are two runs of one cell "
                             f"with seed {seed}: they cannot be pooled as seeds; remove one of them from the table's "
                             "paths")
        group["runs"][seed] = record
    return groups


def distinguishing_fields(cells: list[dict], shown: tuple[str, ...]) -> list[str]:
    """The settings, beyond ``shown``, a row label needs so that no two of ``cells`` share a label: a field is
    added only where the label so far does not already determine it."""
    fields, labels = list(shown), [tuple(c.get(f) for f in shown) for c in cells]
    others = {key for c in cells for key in c} - set(shown)
    for field in [f for f in PREFERRED_LABELS if f in others] + sorted(others - set(PREFERRED_LABELS)):
        values: dict[tuple, set] = {}
        for label, c in zip(labels, cells):
            values.setdefault(label, set()).add(json.dumps(c.get(field), sort_keys=True, default=str))
        if any(len(v) > 1 for v in values.values()):
            fields.append(field)
            labels = [label + (c.get(field),) for label, c in zip(labels, cells)]
    return fields


def find_baseline(cell: dict, cells: list[dict], baseline_method: str) -> dict | None:
    """The cell of ``baseline_method`` equal to ``cell`` in every setting but the ones a method implies."""
    def rest(c):
        return cell_key({k: v for k, v in c.items() if k not in METHOD_FIELDS})

    matches = [c for c in cells if c.get("method") == baseline_method and rest(c) == rest(cell)]
    return matches[0] if len(matches) == 1 else None


def _left_out_note(left_out: list, what: str) -> str:
    return f"; {len(left_out)} {what} left out: {', '.join(map(str, left_out))}" if left_out else ""


def left_out_note(summary: dict) -> str:
    """'; 1 not finite left out: inf' for a summary that left values out, else ''."""
    return _left_out_note(summary.get("left_out") or [], "not finite")


def format_summary(summary: dict, digits: int = 1, show_n: bool = True) -> str:
    """'60.5 (60.3 ± 0.8, n=4)': median, then mean ± sd and (``show_n``) the number of seeds; non-finite values
    are named, never averaged: '60.5 (n=1; 1 not finite left out: inf)', 'inf (not finite)'."""
    if summary["n"] == 0:
        return ", ".join(sorted({str(v) for v in summary.get("left_out") or []})) + " (not finite)"
    note = left_out_note(summary)
    n = f", n={summary['n']}" if show_n else ""
    if summary["n"] == 1:
        return f"{summary['median']:.{digits}f}" + (f" (n=1{note})" if show_n or note else "")
    return f"{summary['median']:.{digits}f} ({summary['mean']:.{digits}f} ± {summary['sd']:.{digits}f}{n}{note})"


def format_difference(difference: dict | None, digits: int = 1) -> str:
    """'+1.2 [-0.3, +2.5] (n=4)': mean paired difference and its 95 % bootstrap interval."""
    if difference is None:
        return "-"
    note = _left_out_note(difference.get("left_out") or [], "seed(s) with a non-finite value")
    if difference["n"] == 0:
        return f"- (no finite pair{note})"
    if difference["n"] < 2:
        return f"{difference['mean']:+.{digits}f} (n=1, no interval{note})"
    return (f"{difference['mean']:+.{digits}f} [{difference['low']:+.{digits}f}, {difference['high']:+.{digits}f}] "
            f"(n={difference['n']}{note})")
