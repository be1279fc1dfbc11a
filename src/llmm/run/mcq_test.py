"""Evaluating trained multiple-choice runs again, or as a deep ensemble (scripts.test_mcq): the members' settings,
their adapters and the ensemble's averaged answer distributions."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from accelerate import PartialState

from llmm import LlmmConfig, load_llmm_model, outdirs
from llmm.run import adapters, causal_lm, cli, fileio, schema, tables
from llmm.run.mcq import (BLOCKS, TABLE, eval_precision, evaluate_sets, evaluation_entry, load_all, run_cell,
                          search_noise_width)
from llmm.run.width_search import RULES, apply_noise_width
from llmm.tasks import calibration as C
from llmm.tasks.mcq import encode_question, letter_token_ids

# The run's settings that an evaluation may replace (and the width search's).
OVERRIDES = ("eval_modes", "mc_samples", "ood", "test_data", "max_eval_samples", "per_device_eval_batch_size")


def parse_args(argv=None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description="Evaluate trained multiple-choice runs again, or as a deep "
                                     "ensemble: accuracy, ECE, NLL, Brier per mode.", allow_abbrev=False)
    parser.add_argument("--runs", nargs="+", required=True, help="run directories of scripts.train_mcq")
    cli.add_output_flags(parser)
    given = (*OVERRIDES, *schema.fields_of(schema.WidthSearchSettings))
    schema.add_flags(parser, BLOCKS, only=given)
    rules = next(a for a in parser._actions if a.dest == "noise_width_search")
    rules.nargs, rules.help = "+", rules.help + "; several rules: one search, the run evaluated with each rule's m"
    args = parser.parse_args(argv)
    schema.take_renamed(args, BLOCKS)
    adapters.check_settings({name: getattr(args, name) for name in given}, BLOCKS)  # one error line per bad value
    seen = {}
    for run in args.runs:
        real = outdirs.resolved(run)
        if real in seen:
            raise ValueError(f"run {run!r} is given twice (also as {seen[real]!r}): an ensemble needs distinct runs, "
                             "each once")
        seen[real] = run
    return args


# What the evaluation reads from a run's settings.json (written by every train_mcq of this version).
NEEDED = ("task", "method", "seed", "K", "rank", "llmmscale", "backbone", "model_name_or_path", "dtype", "init",
          "load_in_8bit", "load_in_4bit", "max_length", "per_device_eval_batch_size", "eval_modes", "mc_samples")


def run_settings(run: str) -> schema.McqRun:
    """A finished run's settings.json, holding every key the evaluation reads (NEEDED)."""
    path = Path(run) / "settings.json"
    if not path.is_file() or not (Path(run) / "adapter").is_dir():
        raise FileNotFoundError(f"{run!r} is not a finished train_mcq run (no settings.json / adapter/): pass the "
                                "run's output directory")
    remedy = "pass a train_mcq run directory, or re-run the training (train_mcq) that wrote it"
    return schema.McqRun.of(adapters.read_run_settings(path, BLOCKS, remedy, needed=NEEDED))


def member_settings(args) -> list[schema.McqRun]:
    members = [run_settings(run) for run in args.runs]
    overrides = {name: getattr(args, name) for name in OVERRIDES}
    search = {name: getattr(args, name) for name in schema.fields_of(schema.WidthSearchSettings)
              if getattr(args, name) is not None}
    rules = search.pop("noise_width_search", [])
    if "none" in rules:
        raise ValueError("--noise_width_search none: test_mcq evaluates with the width m the run saved (the paper's "
                         "m = 1 unless it searched); name tfb or nll to search again, or drop the flag")
    adapters.check_eval_modes(args.eval_modes)
    if rules and len(members) > 1:
        raise ValueError("--noise_width_search applies to one run; several runs are evaluated as a deep ensemble")
    if len(set(rules)) != len(rules):
        raise ValueError(f"--noise_width_search {' '.join(rules)} names a rule twice: name each once")
    if search and not rules:
        raise ValueError(f"--{next(iter(search))} only applies to a width search: drop it or add --noise_width_search "
                         "tfb / nll")
    if len(members) > 1 and args.mc_samples is not None:
        raise ValueError("--mc_samples applies to one run; an ensemble averages its members' mean networks: drop it")
    for settings, run in zip(members, args.runs):
        settings.update({key: value for key, value in overrides.items() if value is not None})
        settings.run = run
        adapters.check_sampled_modes(settings.eval_modes, settings.K, f"the run {run!r}", "mean (or dropout for "
                                     "mcdropout)")
        if args.mc_samples is not None and not set(C.SAMPLED_MODES) & set(settings.eval_modes) and not rules:
            raise ValueError(f"--mc_samples only applies to eval modes mc and dropout and to a width search (these "
                             f"are {settings.eval_modes}): drop it or add --eval_modes mc")
        if "dropout" in settings.eval_modes and not settings.lora_dropout > 0:
            raise ValueError(f"eval mode 'dropout' needs dropout in the adapters, which the run {run!r} has not "
                             "(lora_dropout 0): evaluate an mcdropout run, or drop the mode")
        searches = [searched_settings(settings, {**search, "noise_width_search": rule}, run) for rule in rules]
        if args.max_eval_samples is None:
            settings.max_eval_samples = None  # the run's debug cap applies to its own evaluation only
        settings.cell = run_cell(settings)  # before the backbone path below: the run's cell, as trained
        settings.searches = [{**s, "cell": run_cell(settings.copy(**s))} for s in searches]
        if causal_lm.in_process_loftq(settings):  # the quantized backbone the run wrote beside its adapter
            settings.model_name_or_path = str(Path(run) / "backbone")
    for settings, run in zip(members[1:], args.runs[1:]):
        differ = sorted(key for key in {*settings.cell, *members[0]["cell"]} - {"data_seed"}  # a seed too
                        if settings.cell.get(key) != members[0]["cell"].get(key))
        if differ:
            raise ValueError(f"ensemble members must share every setting but the seed: {args.runs[0]!r} and {run!r} "
                             f"differ in {differ}")
    if len(members) > 1 and args.eval_modes:
        raise ValueError("--eval_modes applies to one run; several runs are evaluated as a deep ensemble")
    return members


def searched_settings(settings: schema.McqRun, search: dict, run: str) -> dict:
    """The settings a width search on finished run ``run`` changes: the search's, and the calibration table's
    variant for the run's variant with this search (llmm + tfb: llmm_tfb), so it pools with runs that searched
    after training."""
    if not settings.K > 0:
        raise ValueError(f"{run!r} is a --method {settings.method} run (K = 0): the width search scales the Llmm "
                         "noise; pass an llmm run")
    if not settings.validation_size:
        raise ValueError(f"{run!r} held out no validation split (validation_size 0): train it with --validation_size N"
                         " (the search must not see the test questions)")
    defaults = {name: f.default for name, f in schema.fields_of(schema.WidthSearchSettings).items()}
    searched = {**defaults, **{k: settings[k] for k in defaults if settings.get(k) is not None}, **search}
    variants = tables.read_yaml(TABLE).get("variants") or {}
    wanted = {**variants.get(settings.variant or settings.method, {"method": settings.method}),
              "noise_width_search": searched["noise_width_search"]}
    names = [name for name, values in variants.items() if values == wanted]
    return {**searched, "variant": names[0] if names else None}


def load_member(settings: schema.McqRun):
    """(peft model, tokenizer) of one run: its backbone and adapter (M and Z), in eval mode."""
    model, tokenizer = causal_lm.load_backbone(settings)
    model = load_llmm_model(model, str(Path(settings.run) / "adapter"), k=settings.K)
    if not (settings.load_in_8bit or settings.load_in_4bit):  # bitsandbytes layers are placed when loaded
        model = model.to(PartialState().device)
    return model.eval(), tokenizer


def ensemble_seed(members: list[dict]) -> str:
    """An ensemble's seed for the tables: its members' seeds, "1+2+3" (one value; pairs with no single-seed run)."""
    return "+".join(str(seed) for seed in sorted(settings.seed for settings in members))


def ensemble(members: list[dict], eval_sets: dict, output_dir: Path) -> list[dict]:
    """The deep ensemble over every eval set: members loaded one at a time, distributions averaged."""
    first = members[0]
    n_letters = max(len(r["choices"]) for records, _ in eval_sets.values() for r in records)
    sums, labels, seconds = {}, {}, {}  # seconds: each set's prediction time over the members, as a run's test time
    for settings in members:
        model, tokenizer = load_member(settings)
        device = next(model.parameters()).device
        head = C.LetterHead(model, letter_token_ids(tokenizer, n_letters)).to(device)
        for name, (records, _) in eval_sets.items():
            batches = C.batches([encode_question(tokenizer, r, first.max_length) for r in records],
                                first.per_device_eval_batch_size, tokenizer.pad_token_id, device)
            started = time.time()
            probs, labels[name] = C.predict(head, batches, "mean")
            seconds[name] = seconds.get(name, 0.0) + time.time() - started
            sums[name] = sums.get(name, 0) + probs
        del model, head
    entries, seeds = [], ensemble_seed(members)
    data_seeds = sorted({settings.cell.get("data_seed") for settings in members}, key=str)
    cell = {**first.cell, "method": "ensemble", "member_method": first.method,
            "data_seed": data_seeds[0] if len(data_seeds) == 1 else "+".join(map(str, data_seeds))}
    for name in eval_sets:
        entries.append(evaluation_entry(eval_sets, name, "ensemble", len(members), sums[name] / len(members),
                                        labels[name], cell, method="ensemble", seed=seeds, K=first.K,
                                        backbone=first.backbone, wall_time_s=seconds[name]))
        C.plot_reliability(output_dir / f"reliability-{name}.png", {f"{name} ensemble M={len(members)}": entries[-1]})
    return entries


def main(argv=None) -> dict:
    started = time.time()
    args = parse_args(argv)
    members = member_settings(args)
    read = {f"the runs' {name}": [m.get(name) for m in members] for name in schema.input_names(BLOCKS)}
    outdirs.check_outputs_apart({"--output_dir": args.output_dir},
                                {"--runs": args.runs, "--test_data": args.test_data, "--ood": args.ood, **read})
    for settings in members:  # each adapter readable and its run's, before anything is written
        adapter = Path(settings.run) / "adapter"
        fileio.check_safetensors(adapter)
        saved_k = LlmmConfig.from_pretrained(str(adapter)).k
        if saved_k != settings.K:
            raise ValueError(f"the adapter in {str(adapter)!r} has K={saved_k}, its run's settings.json says "
                             f"K={settings.K}: they are not one run's; evaluate a run as train_mcq wrote it, or train "
                             "it again")
    output_dir = Path(args.output_dir)
    outdirs.check_output_dir(output_dir, args.overwrite)
    first = members[0]
    searches = first.searches  # one run: the width rules asked for (member_settings checks)
    _, eval_sets, validation = load_all(first, tables.read_yaml(TABLE), train=bool(searches), with_validation=True)
    outdirs.prepare_output_dir(output_dir, args.overwrite)
    width_search = None
    if len(members) == 1:
        model, tokenizer = load_member(first)
        letters = letter_token_ids(tokenizer, max(len(r["choices"]) for rs, _ in
                                                  [*eval_sets.values(), (validation, None)] for r in rs))
        evaluations = []
        for search in searches or [{}]:  # one search gives every rule's m: then one evaluation per rule
            settings = first.copy(**search)
            if search:
                width_search = width_search or search_noise_width(model, tokenizer, letters, validation, settings)
                apply_noise_width(model, width_search[RULES[search["noise_width_search"]]])
            named = search.get("variant") or search.get("noise_width_search")  # a variant without a table row: the rule
            plots = output_dir / named if len(searches) > 1 else output_dir
            plots.mkdir(exist_ok=True)
            evaluations += evaluate_sets(model, tokenizer, letters, eval_sets, settings, plots, first.method,
                                         settings.cell)
        method, seed = first.method, first.seed
    else:
        evaluations = ensemble(members, eval_sets, output_dir)
        method, seed = "ensemble", ensemble_seed(members)
    results = {"task": first.task, "method": method, "seed": seed, "member_seeds": [m["seed"] for m in members],
               "K": first.K, "backbone": first.backbone, "llmmscale": first.llmmscale, "rank": first.rank,
               "model": first.model_name_or_path, "runs": args.runs, "members": len(members),
               "eval_precision": eval_precision(first), "evaluations": evaluations, "noise_width_search": width_search,
               "wall_time_s": time.time() - started, "versions": fileio.versions(), "complete": True}
    fileio.write_json(output_dir / "results.json", results)
    cli.logger.info("results -> %s", output_dir / "results.json")
    return results
