"""Helpers the entry points in scripts/ share: hyperparameter tables, settings resolution, run directories, I/O.
The training pieces (resume, one noise stream per process, stop on a non-finite loss) are in scripts/training.py.

A table in configs/ is YAML with ``keys`` (the columns that select a row), ``defaults`` (values every row
inherits) and ``rows`` (one experiment each, naming its ``source``). Precedence: defaults, then the row, then
command-line flags that were given. The paper's names K and llmmscale map to LlmmConfig's ``k`` and ``scale``
in ``llmm_config`` and nowhere else.

Exit codes of the entry points (``run_main``): 2 = bad input (one ``error: ...`` line naming the problem and the
fix, before anything is written), 3 = training diverged (a non-finite loss; the last good checkpoint is kept).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import PartialState

REPO_ROOT = Path(__file__).resolve().parent
CONFIGS = REPO_ROOT / "configs"
logger = logging.getLogger("llmm")


def setup_logging() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    with open(path) as handle:
        return yaml.safe_load(handle)


def table_rows(table: dict) -> list[dict]:
    """Rows with the defaults filled in; raises on a setting the table does not declare (in ``keys``, ``defaults``
    or ``columns``, the settings only rows give) and if two rows share the same key columns."""
    keys, seen, rows = table["keys"], set(), []
    allowed = {*keys, *table.get("defaults", {}), *table.get("columns", []), "source"}
    for row in table["rows"]:
        unknown = sorted(set(row) - allowed)
        if unknown:
            raise ValueError(f"table row {dict((k, row.get(k)) for k in keys)} has unknown setting(s) {unknown}: "
                             "fix the name, or declare the column under 'columns' (row-only) or 'defaults'")
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"table row {row} lacks key column(s) {missing}")
        key = tuple(row[k] for k in keys)
        if key in seen:
            raise ValueError(f"duplicate table row for {dict(zip(keys, key))}")
        seen.add(key)
        rows.append({**table.get("defaults", {}), **row})
    return rows


def select_row(table: dict, **selection) -> dict:
    """The one row whose key columns equal ``selection``; a missing row lists the rows that exist."""
    keys = table["keys"]
    unknown = set(selection) - set(keys)
    if unknown:
        raise ValueError(f"unknown table key(s) {sorted(unknown)}; this table is keyed by {keys}")
    for row in table_rows(table):
        if all(row[k] == v for k, v in selection.items()):
            return row
    existing = sorted({tuple(row[k] for k in keys) for row in table_rows(table)}, key=str)
    raise ValueError(f"no row for {selection} in the table; rows ({', '.join(keys)}): {existing}")


def add_setting_flags(parser: argparse.ArgumentParser, table: dict) -> None:
    """One ``--name`` flag per setting of the table (default None: the table decides)."""
    names = dict.fromkeys([*table.get("defaults", {}), *(k for row in table["rows"] for k in row)])
    for name in names:
        if name in table["keys"] or any(a.dest == name for a in parser._actions):
            continue
        defaults = table.get("defaults", {})
        sample = defaults[name] if name in defaults else next(row[name] for row in table["rows"] if name in row)
        kind = {bool: _parse_bool, int: int, float: float}.get(type(sample), str)
        parser.add_argument(f"--{name}", type=kind, default=None, help=f"override the table's {name}")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def resolve_settings(table: dict, args: argparse.Namespace) -> dict:
    """Table row selected by the key flags, then every flag that was given on the command line."""
    selection = {k: getattr(args, k) for k in table["keys"]}
    settings = select_row(table, **selection)
    settings.update({k: v for k, v in vars(args).items() if v is not None})
    return settings


def llmm_config(settings: dict, target_modules: list[str], **extra):
    """LlmmConfig from resolved settings; the one place K -> k and llmmscale -> scale."""
    from peft import LoftQConfig

    from llmm import LlmmConfig

    init = settings.get("init", "loftq")
    loftq = {}
    if init == "loftq":
        loftq = dict(init_lora_weights="loftq",
                     loftq_config=LoftQConfig(loftq_bits=settings["bits"], loftq_iter=settings["loftq_iter"]),
                     loftq_method=settings["quant"], loftq_compensate_scaling=settings.get("compensate_scaling", True),
                     **{name: settings[name] for name in ("loftq_svd", "loftq_svd_oversampling", "loftq_svd_iters")
                        if name in settings})  # the tables use LlmmConfig's names for these
    return LlmmConfig(
        r=settings["rank"], lora_alpha=settings["lora_alpha"], lora_dropout=settings.get("lora_dropout", 0.0),
        target_modules=target_modules, k=settings["K"], scale=settings["llmmscale"],
        eval_noise=settings.get("eval_noise", "mean"), scaled_gradient=settings.get("scaled_gradient", True),
        **loftq, **extra,
    )


def check_adapter_settings(settings: dict) -> None:
    """K, llmmscale, rank, lora_alpha, bits and quant in range, checked before anything is loaded or written
    (LlmmConfig checks them too, but only once the model is in memory)."""
    from llmm.quant import ALLOWED_BITS, ALLOWED_METHODS

    def integer(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    rules = {
        "K": (lambda v: integer(v) and v >= 0, "an integer >= 0 (directions per factor; 0 = plain LoRA/LoftQ)"),
        "llmmscale": (lambda v: v > 0, "> 0 (the noise std is 1/sqrt(llmmscale))"),
        "rank": (lambda v: integer(v) and v >= 1, "an integer >= 1"),
        "lora_alpha": (lambda v: v > 0, "> 0"),
        "bits": (lambda v: v in ALLOWED_BITS, f"one of {ALLOWED_BITS}"),
        "quant": (lambda v: v in ALLOWED_METHODS, f"one of {ALLOWED_METHODS}"),
    }
    for name, (ok, rule) in rules.items():
        if name in settings and not ok(settings[name]):
            raise ValueError(f"{name} = {settings[name]!r} is out of range: it must be {rule}; fix --{name} or the "
                             "table row")


def default_targets(model_config, explicit: list[str] | None = None) -> list[str]:
    """Target modules: an explicit list wins, else the row for ``model_type`` in configs/targets.yaml."""
    if explicit:
        return list(explicit)
    table = read_yaml(CONFIGS / "targets.yaml")
    model_type = getattr(model_config, "model_type", None)
    if model_type not in table:
        raise ValueError(f"no default target modules for model_type {model_type!r} in configs/targets.yaml "
                         f"(known: {sorted(table)}); pass --target_modules")
    return list(table[model_type])


def head_modules(model) -> list[str]:
    """The task head's modules (classifier, pooler), which stay full precision: neither quantized nor adapted.

    Top-level children beside the backbone that hold parameters, plus a pooler kept inside the backbone (BERT)."""
    heads = [name for name, child in model.named_children()
             if name != model.base_model_prefix and any(True for _ in child.parameters())]
    if "pooler" not in heads and getattr(model.base_model, "pooler", None) is not None:
        heads.append("pooler")
    return heads


def inside(name: str, modules: list[str]) -> bool:
    """Whether the module path ``name`` lies in (or is) one of ``modules`` (matched by path component)."""
    return any(part in modules for part in name.split("."))


def check_output_dir(path: str | Path, overwrite: bool = False, resume: bool = False) -> None:
    """An existing non-empty ``path`` is an error unless overwriting or resuming (nothing is written here)."""
    path = Path(path)
    if path.is_file():
        raise FileExistsError(f"output directory {str(path)!r} is a file: choose another --output_dir")
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resume):
        raise FileExistsError(f"output directory {str(path)!r} exists and is not empty: choose another, or pass "
                              "--overwrite (replace) / --resume_from_checkpoint (continue)")


def prepare_output_dir(path: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Create ``path``; an existing non-empty directory is an error unless overwriting or resuming."""
    path = Path(path)
    check_output_dir(path, overwrite, resume)
    if path.is_dir() and overwrite and not resume:
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def make_output_dir(path: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """``prepare_output_dir`` on the main process only, the others waiting for it (torchrun / accelerate launch)."""
    state = PartialState()
    if state.is_main_process:
        prepare_output_dir(path, overwrite, resume)
    state.wait_for_everyone()
    return Path(path)


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically (temporary file + rename): a crash leaves the old file or none, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, payload) -> None:
    """Write JSON atomically (temporary file + rename)."""
    write_text(path, json.dumps(payload, indent=2, default=str))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_file(path: str | Path, what: str) -> None:
    if not Path(path).exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")


def require_cuda_for(option: str, device: str | None = None) -> None:
    """CUDA-only options fail early on a machine without CUDA."""
    if not torch.cuda.is_available() and (device is None or device.startswith("cuda")):
        raise ValueError(f"{option} needs CUDA, and torch.cuda.is_available() is False: drop the option")


def versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    import llmm

    return {"llmm": llmm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite (scripts.training.LlmmTrainer raises it; exit code 3)."""


def run_main(main) -> None:
    """Run an entry point; bad input (exit code 2) and a diverged training (exit code 3) become one clear line."""
    setup_logging()
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError, TrainingDiverged) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(3 if isinstance(error, TrainingDiverged) else 2) from None


def plot_curves(path: str | Path, panels: dict[str, dict[str, tuple[list, list]]], xlabel: str) -> None:
    """Save a PNG with one panel per entry of ``panels`` ({panel title: {line label: (xs, ys)}})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for axis, (title, lines) in zip(axes[0], panels.items()):
        for label, (xs, ys) in lines.items():
            axis.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=label)
        axis.set_title(title)
        axis.set_xlabel(xlabel)
        axis.grid(alpha=0.3)
        if len(lines) > 1:
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt", ".parquet")


def looks_local(name_or_path: str) -> bool:
    """True for a local path (absolute, ./ ../ ~, a data file's suffix, or more than one /), False for a hub id
    like ``org/name``."""
    return (name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.endswith(DATA_SUFFIXES)
            or os.path.sep in name_or_path.strip("/").split("/", 1)[-1])


def check_model_path(name_or_path: str) -> None:
    """A model given as a local path (not a hub id like ``org/name``) must exist."""
    if looks_local(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist: pass a local directory or a hub id")


def check_data_paths(**flags) -> None:
    """Each given data flag (``data_dir="glue_data/CoLA"``, ...; lists allowed) that names a local path must exist."""
    for flag, values in flags.items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value and looks_local(value) and not Path(value).expanduser().exists():
                raise FileNotFoundError(f"--{flag} {value!r} does not exist: pass an existing file or directory")


def load_pretrained(loader, name_or_path: str, **kwargs):
    """``loader.from_pretrained`` for a hub id or a local directory, with a clear error when neither loads."""
    check_model_path(name_or_path)
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except OSError as error:
        raise FileNotFoundError(f"could not load {name_or_path!r} as a local directory or from the hub "
                                f"({str(error).splitlines()[0]})") from error
