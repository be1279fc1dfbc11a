"""Re-scoring a saved GLUE run (scripts.eval_glue): the run's adapter on the backbone it names, its dev splits or
labelled files, in mean, sample or mc mode; metrics, outputs and labels per split as JSON. The command's docstring
(scripts/eval_glue.py) says how to run it."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from datasets import DatasetDict
from transformers import DataCollatorWithPadding

import llmm
from llmm.tasks.glue import TASKS, get_task, load_file, load_glue, tokenize
from llmm.run.glue import load_model, predictions_record
from llmm.run import cli, schema
from llmm.run.fileio import check_data_paths, seed_everything, write_json
from llmm.run.adapters import check_sampled_modes, check_settings, read_run_settings
from llmm.run.width_search import noise_width_in_use

BLOCKS = (*schema.FAMILY_BLOCKS["glue"], schema.EvalModeSettings)
REPLACED = ("mc_samples", "seed", "per_device_eval_batch_size")  # the run's settings an evaluation may replace


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog=f"--{', --'.join(REPLACED)}: default, the run's")
    parser.add_argument("run_dir", help="a scripts.train_glue output directory (settings.json, adapter/)")
    parser.add_argument("--file", nargs="+", default=None, help="labelled .tsv/.csv/.json/.jsonl file(s) to score "
                        "instead of the run's dev splits")
    parser.add_argument("--output", default=None, help="JSON file (default: RUN_DIR/eval/<mode>.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    schema.add_flags(parser, BLOCKS, only={"mode", *REPLACED},
                     renamed={old: "per_device_eval_batch_size" for old in ("batch_size", "eval_batch_size")})
    parser.set_defaults(mode=schema.EvalModeSettings.mode)
    seed = next(action for action in parser._actions if action.dest == "seed")
    seed.help += ("; here only the noise draws of --mode sample / mc (mc: network n from stream n of the seed, as "
                  "the run's mc dev evaluation and width search drew it)")
    args = parser.parse_args(argv)
    schema.take_renamed(args, BLOCKS)  # --batch_size, its old name
    return args


def check(args: argparse.Namespace) -> tuple[Path, schema.GlueRun, Path]:
    """The run directory, its settings and the output path; bad input fails here, before anything is loaded."""
    check_settings({name: getattr(args, name) for name in ("mode", *REPLACED)}, BLOCKS)
    if args.output is not None:
        llmm.outdirs.check_output_file(args.output)
    run = Path(args.run_dir)
    if not (run / "settings.json").is_file() or not (run / "adapter" / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{str(run)!r} is not a finished scripts.train_glue run (it needs settings.json and "
                                "adapter/): pass a run's output directory")
    settings = schema.GlueRun.of(read_run_settings(run / "settings.json", BLOCKS, "re-run the training (train_glue)"))
    if settings.task not in TASKS:
        raise ValueError(f"{str(run)!r} is no train_glue run (its task is {settings.task!r}): eval_glue evaluates GLUE "
                         "runs; test a causal-LM run with test_gsm8k, a multiple-choice run with test_mcq")
    if args.mc_samples is not None and args.mode != "mc":
        raise ValueError(f"--mc_samples only applies to --mode mc (this is --mode {args.mode}): drop it or add "
                         "--mode mc")
    check_sampled_modes([args.mode], settings.K, "this run", "--mode mean")
    if args.seed is not None and args.mode == "mean":
        raise ValueError("--seed seeds the noise draws of --mode sample / mc; the mean network has none: drop it")
    check_data_paths(file=args.file)
    stems = [Path(path).stem for path in args.file or []]
    if len(set(stems)) != len(stems):
        raise ValueError(f"--file names two files with the same stem ({stems}): the output keys splits by file stem")
    output = Path(args.output) if args.output is not None else run / "eval" / f"{args.mode}.json"
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{str(output)!r} exists: pass --overwrite to replace it, or another --output")
    read = {f"the run's {name}": settings.get(name) for name in schema.input_names(BLOCKS)}
    read["the adapter's base model"] = adapter_base(run)
    llmm.outdirs.check_outputs_apart({"--output": output}, {"RUN_DIR": run, "--file": args.file, **read},
                                     files=("--output",))
    return run, settings, output


def adapter_base(run: Path) -> str | None:
    """The backbone the run's adapter names (its base_model_name_or_path)."""
    return json.loads((run / "adapter" / "adapter_config.json").read_text()).get("base_model_name_or_path")


def load_run(run: Path, task):
    """(tokenizer, model in eval mode) of a saved run: its adapter on the backbone the adapter names."""
    base = adapter_base(run)
    if not base:
        raise ValueError(f"{str(run / 'adapter')!r} names no base model: it was not written by scripts.train_glue")
    tokenizer, model = load_model(base, task)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return tokenizer, llmm.load_llmm_model(model.to(device), str(run / "adapter"))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    run, settings, output = check(args)
    task = get_task(settings.task)
    if args.file:
        raw = {Path(path).stem: load_file(task, path) for path in args.file}
    elif settings.get("validation_file"):  # the run's dev files only: scoring needs no training file
        missing = [path for path in settings.validation_file if not Path(path).is_file()]
        if missing:
            raise FileNotFoundError(f"the run's dev file {missing[0]!r} does not exist here: run eval_glue where the "
                                    "run was trained (an older run's settings.json may hold relative paths), or pass "
                                    "--file")
        raw = {split: load_file(task, path) for split, path in zip(task.dev_splits, settings.validation_file)}
    else:
        loaded = load_glue(task, settings.get("data_dir"))
        raw = {split: loaded[split] for split in task.dev_splits}
    seed = settings.seed if args.seed is None else args.seed
    mc_samples = args.mc_samples or settings.mc_samples
    seed_everything(seed)
    started = time.time()
    tokenizer, model = load_run(run, task)
    data = tokenize(DatasetDict(raw), task, tokenizer, settings.max_length)
    collator = DataCollatorWithPadding(tokenizer)
    batch_size = args.per_device_eval_batch_size or settings.per_device_eval_batch_size
    splits = predictions_record(task, model, data, raw, collator, batch_size, args.mode, mc_samples, seed)
    for split, path in zip(splits, args.file or []):  # --file: its splits are named by the files' stems
        splits[split] = {"file": path, **splits[split]}
    record = {"run_dir": str(run), "task": task.name, "mode": args.mode, "seed": seed,
              **({"mc_samples": mc_samples} if args.mode == "mc" else {}),
              **({"noise_width": noise_width_in_use(model)} if args.mode != "mean" else {}), "batch_size": batch_size,
              "base_model": model.peft_config["default"].base_model_name_or_path,
              "wall_time_s": time.time() - started, "splits": splits}
    write_json(output, record)
    for split, entry in splits.items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in entry["metrics"].items() if isinstance(v, float))
        cli.logger.info("%s %s (%s): %s", task.name, split, args.mode, shown)
    cli.logger.info("wrote %s", output)
    return record
