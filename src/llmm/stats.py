"""Seed statistics for the result tables: what a cell is, its summary over seeds, and paired differences.

    record = {"seed": 3, "cell": cell_of(settings), ...}     # what every results.json carries
    cells = group_by_cell(records)                           # {cell key: {seed: record}}; a repeated seed is an error
    summarize([60.1, 61.3, 59.8, 60.9])                      # n, median, mean, sd
    paired_difference({0: 61.0, 1: 60.2}, {0: 59.5, 1: 60.0})  # mean of method - baseline over shared seeds, 95 % CI

A *cell* is every setting of an experiment but the seed (the ``cell`` record of results.json); runs are pooled as
seeds only when their cells are equal. *Paired* compares a method with a baseline on the same seeds: the two runs of
one seed share data order, initialisation and dropout masks (the Llmm noise has its own generator), so the per-seed
difference removes most seed-to-seed noise. The interval is a seeded percentile bootstrap of the mean difference;
with 4 seeds it is coarse and somewhat too narrow: a guide, not a test.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

import numpy as np

from llmm.run import fileio, schema

N_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
LEVEL = 0.95

NOT_CELL = schema.not_cell()
# Settings of the noise: a K = 0 baseline cannot be given them (a flag without effect is refused), so a method
# evaluated with the noise (GLUE's eval_noise mc, a GSM8K test's mode mc) is paired with the baseline's mean.
NOISE_FIELDS = ("eval_noise", "noise_per_example", "mc_samples", "noise_width_search", "noise_width_tolerance",
                "noise_width_grid", "test_mode", "test_mc_samples")
# Settings a method implies: a method and its baseline may differ in these (and only these) to be paired.
MODEL_PATH_FIELDS = ("init_source", "init_dir", "model_name_or_path", "test_model_name_or_path")
METHOD_FIELDS = ("method", "K", "llmmscale", "scaled_gradient", "gaussian_embeddings", "init", "backbone",
                 *MODEL_PATH_FIELDS, *NOISE_FIELDS)

# Settings a row label names first when rows must be told apart (then the rest, alphabetically).
PREFERRED_LABELS = ("K", "bits", "quant", "eval_noise", "mc_samples", "entropy_weight", "test_mode",
                    "test_decoding", "test_mc_samples")


def results_below(folder: Path) -> list[Path]:
    """Every results.json below ``folder``, through linked folders too (a run linked into a table's folder counts),
    each real folder once (a link back up is no loop)."""
    found, seen = [], set()
    for root, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            folders[:] = []
            continue
        seen.add(real)
        if "results.json" in files:
            found.append(Path(root) / "results.json")
    return sorted(found)


def read_results(paths: list[str], made_by: str) -> list[tuple[Path, object]]:
    """(file, its JSON) of every results.json the paths name (files, or directories searched recursively)."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{str(path)!r} does not exist: pass run directories or results.json files")
        files += [path] if path.is_file() else results_below(path)
    if not files:
        raise FileNotFoundError(f"no results.json below {paths}: train with {made_by} first")
    read = []
    for file in files:
        try:
            read.append((file, json.loads(file.read_text())))
        except json.JSONDecodeError as error:
            raise ValueError(f"{str(file)!r} is not valid JSON ({error}): delete it or re-run what wrote it "
                             f"({made_by})") from None
    return read


def cell_of(settings, blocks=None) -> dict:
    """A run's settings (a Settings object: every setting its entry point offers, tables.offered_defaults; or a
    settings.json's dict) without what does not change its numbers; its local inputs (of ``blocks``, default a Settings
    object's family) by their real paths: one input however it was typed (relative, absolute, through a link)."""
    values = settings.record() if isinstance(settings, schema.Settings) else settings
    if blocks or isinstance(settings, schema.Settings):
        values = fileio.real_inputs(values, blocks or (type(settings),))
    return {key: value for key, value in sorted(values.items()) if key not in NOT_CELL}


def canonical_cell(cell: dict, family: type, prefix: str = "") -> dict:
    """``cell`` (a results.json's) as the run acted: a setting of ``family`` that had no effect on the run (its
    field's ``applies`` false on the cell, e.g. llmmscale at K = 0, LoftQ's iterations under qlora, epochs when
    max_steps is set) left out, and a whole number of a float setting as a float (--lora_alpha 16.0 is 16), so that
    runs equal in effect pool and pair. ``prefix``: only the keys named ``<prefix><setting>`` (an evaluation's
    ``test_`` settings). Other keys stay as they are; a setting the cell lacks is not filled in (an older run
    directory did not record it, and its default then may not be today's). A cell that is no dict is returned as
    it is (group_by_cell names it)."""
    if not isinstance(cell, dict):
        return cell
    cell = schema.current_names(cell)
    fields = schema.fields_of(family)  # a test's seed (no role in a training cell) too
    own = {key[len(prefix):]: value for key, value in cell.items() if key.startswith(prefix)}
    own = fileio.real_inputs(own, (family,))  # an older run recorded inputs as typed: resolved where the table runs
    for name, value in own.items():
        if name in fields and schema.kind_of(fields[name]) in (float, schema.number) and type(value) is int:
            own[name] = float(value)

    def acted(name: str, settings) -> bool:
        applies = fields[name].metadata["applies"]
        try:
            return applies is None or bool((applies.cell_test or applies.test)(settings))
        except (TypeError, AttributeError, KeyError):  # an old cell without what the test reads: kept
            return True

    dropped: set[str] = set()
    while True:  # a setting without effect is at its default for the others' tests (entropy_floor at K = 0)
        settings = family.of({name: value for name, value in own.items() if name not in dropped})
        newly = {name for name in own if name in fields and name not in dropped and not acted(name, settings)}
        if not newly:
            break
        dropped |= newly
    kept = {f"{prefix}{name}": value for name, value in own.items() if name not in dropped}
    return dict(sorted({**{k: v for k, v in cell.items() if not k.startswith(prefix)}, **kept}.items()))


def test_cell(run_dir, test_settings: dict) -> tuple[int | None, dict]:
    """(training seed, cell) of an evaluation: the trained run's cell plus the evaluation's settings as test_<name>."""
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
    """A metric read from a results.json as a float (inf / nan kept); anything but a number is a ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: metric {name!r} is {value!r}, not a number: re-run that run, or leave it out of "
                         "the table's paths")
    return float(value)


def check_entries(entries, where: str, field: str = "evaluations") -> list[dict]:
    """A results.json's list of records (``evaluations``, ``runs``), else a ValueError."""
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise ValueError(f"{where}: {field!r} is {type(entries).__name__} {str(entries)[:60]!r}, not a list of "
                         "records: re-run that run, or leave it out of the table's paths")
    return entries


def summarize(values: list[float]) -> dict:
    """n, median, mean and sample sd of the finite values; non-finite ones (a diverged run's inf) are listed in
    ``left_out`` (present only then)."""
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


def bootstrap_interval(differences: list[float]) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``differences`` (resampled with replacement)."""
    values = np.asarray(differences, dtype=np.float64)
    if values.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = values[rng.integers(0, values.size, size=(N_RESAMPLES, values.size))].mean(axis=1)
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_difference(method: dict, baseline: dict) -> dict | None:
    """Method minus baseline ({seed: value} each) on the shared seeds with finite values (others in ``left_out``):
    n, seeds, mean, interval. None if they share no seed."""
    shared = sorted(set(method) & set(baseline))
    if not shared:
        return None
    seeds = [s for s in shared if math.isfinite(float(method[s])) and math.isfinite(float(baseline[s]))]
    left_out = [s for s in shared if s not in seeds]
    if not seeds:
        return {"n": 0, "seeds": [], "mean": math.nan, "low": math.nan, "high": math.nan, "left_out": left_out}
    differences = [float(method[s]) - float(baseline[s]) for s in seeds]
    low, high = bootstrap_interval(differences)
    difference = {"n": len(seeds), "seeds": seeds, "mean": statistics.fmean(differences), "low": low, "high": high}
    return {**difference, "left_out": left_out} if left_out else difference


def group_by_cell(records: list[dict]) -> dict[str, dict]:
    """{cell key: {"cell": cell, "runs": {seed: record}}}; two records of one cell with one seed are an error."""
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


def label_part(cell: dict, name: str) -> str:
    """A setting as a row label names it: ``name=value``, ``name=n/a`` where the cell does not hold it (no effect on
    the run, or not recorded by an older version)."""
    return f"{name}={cell[name]}" if name in cell else f"{name}=n/a"


def distinguishing_fields(cells: list[dict], shown: tuple[str, ...]) -> list[str]:
    """``shown`` plus the settings a row label needs so that no two of ``cells`` share a label: the preferred ones
    first, then those every cell holds (a setting some cells lack, e.g. a grid beside no search, labels them n/a)."""
    def value(c, f):  # hashable: a list setting (target_modules) as its JSON text; absent apart from null
        return json.dumps(c[f], sort_keys=True, default=str) if f in c else "n/a"

    fields, labels = list(shown), [tuple(value(c, f) for f in shown) for c in cells]
    others = {key for c in cells for key in c} - set(shown)
    lacking = {field: sum(field not in c for c in cells) for field in others}
    for field in [f for f in PREFERRED_LABELS if f in others] + sorted(others - set(PREFERRED_LABELS),
                                                                        key=lambda f: (lacking[f], f)):
        values: dict[tuple, set] = {}
        for label, c in zip(labels, cells):
            values.setdefault(label, set()).add(value(c, field))
        if any(len(v) > 1 for v in values.values()):
            fields.append(field)
            labels = [label + (value(c, field),) for label, c in zip(labels, cells)]
    return fields


def same_but(a: dict, b: dict, free) -> bool:
    """Two cells (canonical_cell's) agree in every setting both hold but ``free``: a setting one of them lacks had no
    effect on that run (the entropy's weight beside a K = 0 baseline) or did not exist when it ran, so it cannot tell
    the two experiments apart."""
    return all(a[key] == b[key] for key in set(a) & set(b) - set(free))


def find_baseline(cell: dict, cells: list[dict], baseline_method: str, free=None) -> tuple[dict | None, int]:
    """(the cell of ``baseline_method`` equal to ``cell`` in every setting both hold but ``free``, how many cells are
    the closest): of several matches, the one that holds the most of the cell's settings (an older run directory
    recorded fewer); None where none matches or two tie. ``free`` defaults to the settings a method implies; the
    model's paths (an _init.sh directory, or the checkpoint qlora starts from) may differ only where both cells name
    one table row (``model``): without it, two paths are two models."""
    if free is None:
        free = METHOD_FIELDS if cell.get("model") is not None else set(METHOD_FIELDS) - set(MODEL_PATH_FIELDS)
    matches = [c for c in cells if c.get("method") == baseline_method and same_but(c, cell, free)]
    sizes = [len(set(c) & set(cell)) for c in matches]
    tied = sizes.count(max(sizes)) if sizes else 0
    return (matches[sizes.index(max(sizes))] if tied == 1 else None), tied


def baseline_differences(cell: dict, groups: dict, baseline_method: str, metrics, value, free=None,
                         candidate=lambda cell: True) -> dict | None:
    """{metric: the paired difference of ``cell``'s runs minus its baseline's (find_baseline among the ``candidate``
    cells of ``groups``), each seed's ``value(record, metric)``}; None for the baseline itself or where none matches;
    {metric: {"tie": n}} where n baseline cells match equally well (format_difference names them)."""
    if cell.get("method") == baseline_method:
        return None
    base, matched = find_baseline(cell, [g["cell"] for g in groups.values() if candidate(g["cell"])],
                                  baseline_method, free)
    if base is None:
        return {metric: {"tie": matched} for metric in metrics} if matched else None
    runs, base_runs = groups[cell_key(cell)]["runs"], groups[cell_key(base)]["runs"]
    return {metric: paired_difference({s: value(r, metric) for s, r in runs.items()},
                                      {s: value(r, metric) for s, r in base_runs.items()}) for metric in metrics}


def order_rank(name, order: tuple) -> int:
    """A sort key: ``name``'s place in ``order``, a name it does not list after all of them."""
    return order.index(name) if name in order else len(order)


def _left_out_note(left_out: list, what: str) -> str:
    return f"; {len(left_out)} {what} left out: {', '.join(map(str, left_out))}" if left_out else ""


def left_out_note(summary: dict) -> str:
    """'; 1 not finite left out: inf' for a summary that left values out, else ''."""
    return _left_out_note(summary.get("left_out") or [], "not finite")


def format_summary(summary: dict, digits: int = 1, show_n: bool = True) -> str:
    """'60.5 (60.3 ± 0.8, n=4)': median, then mean ± sd and (``show_n``) the number of seeds; non-finite values
    are named, never averaged."""
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
    if "tie" in difference:
        return f"- (ambiguous: {difference['tie']} baseline rows match)"
    note = _left_out_note(difference.get("left_out") or [], "seed(s) with a non-finite value")
    if difference["n"] == 0:
        return f"- (no finite pair{note})"
    if difference["n"] < 2:
        return f"{difference['mean']:+.{digits}f} (n=1, no interval{note})"
    return (f"{difference['mean']:+.{digits}f} [{difference['low']:+.{digits}f}, {difference['high']:+.{digits}f}] "
            f"(n={difference['n']}{note})")
