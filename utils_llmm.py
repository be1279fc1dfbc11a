"""Helpers the entry points in scripts/ share: hyperparameter tables, settings resolution, run directories, I/O.
The training pieces (resume, one noise stream per process, stop on a non-finite loss) are in scripts/training.py.

A table in configs/ is YAML with ``keys`` (the columns that select a row), ``defaults`` (values every row
inherits) and ``rows`` (one experiment each, naming its ``source``). Precedence: defaults, then the row, then
command-line flags that were given. The paper's names K and llmmscale map to LlmmConfig's ``k`` and ``scale``
in ``llmm_config`` and nowhere else.

Exit codes of the entry points (``run_main``): 2 = bad input or an environment fault (one ``error: ...`` line naming
the problem, the file and the fix; bad input is found before anything is written), 3 = training diverged (a
non-finite loss or gradient; the last good checkpoint is kept). Output directories are locked, replaced only when
they are recognisably llmm's, and published atomically (llmm.outdirs).
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import PartialState

from llmm import outdirs

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
        if name in table["keys"] or name == "source" or any(a.dest == name for a in parser._actions):
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


def check_settings(settings: dict) -> None:
    """Every setting with a declared range (llmm.config.SETTING_RULES, the schema LlmmConfig uses too) is in it;
    checked before any model or data is loaded and before anything is written. None means "not set"."""
    from llmm.config import setting_error

    for name, value in settings.items():
        rule = None if value is None else setting_error(name, value)
        if rule:
            raise ValueError(f"{name} = {value!r} is out of range: it must be {rule}; fix --{name} or the table row "
                             "in configs/")


check_adapter_settings = check_settings  # the name the entry points use


def check_init_targets(init_dir: str | Path, init_targets, given: list[str] | None) -> None:
    """An _init.sh directory fixes the adapted modules (its LoftQ means); a --target_modules that differs is an
    error, not silently ignored."""
    if given and set(given) != set(init_targets or ()):
        raise ValueError(f"--target_modules {sorted(given)} differ from the targets of the _init.sh adapter "
                         f"{str(init_dir)!r} ({sorted(init_targets or ())}): drop --target_modules (the directory "
                         "decides), or make a directory with those targets (_init.sh --target_modules ...)")


INIT_DIR_LOFTQ = ("quant", "bits", "loftq_iter", "loftq_svd", "loftq_svd_oversampling", "loftq_svd_iters",
                  "compensate_scaling")


def adopt_init_dir_settings(model_dir: str | Path, settings: dict, given: set[str]) -> None:
    """An _init.sh directory fixes how its backbone was quantized: its LoftQ settings (quantize_report.json) replace
    the table's in ``settings`` (so settings.json and the results' cell say what was run), and a flag in ``given``
    that asks for another value is an error, not silently ignored. A directory without a report is left alone."""
    report = Path(model_dir) / "quantize_report.json"
    if not report.is_file():
        return
    made = dict(json.loads(report.read_text(encoding="utf-8")).get("settings", {}))
    made.setdefault("loftq_svd", "exact")  # directories made before the truncated SVD existed
    made["compensate_scaling"] = not made.get("reference_scaling", False)
    for name in INIT_DIR_LOFTQ:
        if name not in made or name not in settings:
            continue
        if name in given and settings[name] != made[name]:
            raise ValueError(f"{str(model_dir)!r} was quantized with {name}={made[name]!r} but --{name} "
                             f"{settings[name]!r} was given: drop --{name} (the directory decides), or quantize "
                             "again with _init.sh")
        settings[name] = made[name]


def model_type_row(file: str, model_config, fix: str) -> list[str]:
    """The row of ``configs/<file>`` for the checkpoint's ``model_type``; a missing row names ``fix``."""
    table = read_yaml(CONFIGS / file)
    model_type = getattr(model_config, "model_type", None)
    if model_type not in table:
        raise ValueError(f"no row for model_type {model_type!r} in configs/{file} (known: {sorted(table)}): {fix}")
    return list(table[model_type])


def default_targets(model_config, explicit: list[str] | None = None) -> list[str]:
    """Target modules: an explicit list wins, else the row for ``model_type`` in configs/targets.yaml."""
    if explicit:
        return list(explicit)
    return model_type_row("targets.yaml", model_config, "pass --target_modules")


def default_embedding_targets(model_config) -> list[str]:
    """The embedding tables the GLUE protocol quantizes and adapts: the row for ``model_type`` in
    configs/embedding_targets.yaml."""
    return model_type_row("embedding_targets.yaml", model_config, "add a row, or turn quantize_embeddings off")


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
    """``path`` may become this run's directory (nothing is written here): not a file, not in use by another
    process; if it exists and is not empty, only with ``resume`` (continue it) or ``overwrite`` (replace it, and only
    if it is recognisably an llmm directory that is not ``.``, a parent of it, a repository, $HOME or /)."""
    path = Path(path) if str(path).strip() else None
    if path is None:
        raise ValueError("--output_dir is the empty string: pass a directory name")
    if resume:
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"output directory {str(path)!r} is a file: choose another --output_dir")
        if outdirs.locked_by_other(path):
            raise outdirs.DirectoryLocked(f"{str(path)!r} is in use by another process: wait for it to finish")
        return
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {str(path)!r} exists and is not empty: choose another, or pass "
                              "--overwrite (replace) / --resume_from_checkpoint (continue)")
    outdirs.check_new_dir(path, overwrite)


def prepare_output_dir(path: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Lock ``path`` for the rest of this process, check it again (check_output_dir), replace it if overwriting,
    and create it with the run marker (which makes it recognisably llmm's for a later --overwrite)."""
    if str(path).strip() == "":
        raise ValueError("--output_dir is the empty string: pass a directory name")
    path = Path(path)
    check_output_dir(path, overwrite, resume)
    outdirs.acquire(path)  # held until the process ends (run_main gives it back)
    check_output_dir(path, overwrite, resume)  # again, now that no other process can change it
    if path.is_dir() and any(path.iterdir()) and overwrite and not resume:
        outdirs.remove_run_dir(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / outdirs.RUN_MARKER).touch()
    return path


def make_output_dir(path: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """``prepare_output_dir`` on the main process only, the others waiting for it (torchrun / accelerate launch);
    the main process holds the directory's lock."""
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
    """The training loss, gradients or parameters became NaN or infinite (scripts.training.LlmmTrainer raises it;
    exit code 3)."""


OS_FIXES = {
    errno.EACCES: "permission denied: check its permissions or choose another path",
    errno.EPERM: "operation not permitted: check its permissions or choose another path",
    errno.EROFS: "read-only file system: choose a writable directory",
    errno.ENOSPC: "no space left on device: free space or write elsewhere, then run again (with "
                  "--resume_from_checkpoint for a training run: complete checkpoints are kept)",
    errno.EDQUOT: "disk quota exceeded: free space or write elsewhere, then run again (with --resume_from_checkpoint "
                  "for a training run)",
    errno.EISDIR: "is a directory: pass a file",
    errno.ENOTDIR: "a part of the path is a file, not a directory: fix the path",
}


def disk_full(error: BaseException) -> bool:
    """A write that failed for lack of space: an OSError ENOSPC, or torch.save's / safetensors' wrapped form."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    return any(sign in text for sign in ("No space left on device", "StorageFull", "code: 28,",
                                         "PytorchStreamWriter failed writing file"))


def error_line(error: BaseException) -> str:
    """The one line that run_main prints for ``error``: the problem, the file, the fix."""
    from safetensors import SafetensorError

    if disk_full(error):
        where = f"{error.filename!r}: " if isinstance(error, OSError) and error.filename else ""
        return f"{where}{OS_FIXES[errno.ENOSPC]} ({' '.join(str(error).split())[:200]})"
    if isinstance(error, OSError) and error.errno in OS_FIXES:
        where = f"{error.filename!r}" if error.filename else "a file"
        detail = error.strerror if error.strerror and error.strerror != os.strerror(error.errno) else ""
        return f"{where}: {OS_FIXES[error.errno]}" + (f" ({detail})" if detail else "")
    if isinstance(error, SafetensorError):
        return (f"a .safetensors file could not be read ({error}): it is truncated or corrupt; write it again "
                "(re-run the command that made it) or re-download it")
    if isinstance(error, UnicodeDecodeError):
        return f"a file is not UTF-8 text ({error}): convert it to UTF-8"
    if isinstance(error, json.JSONDecodeError):
        return f"a JSON file is malformed ({error}): fix it or write it again"
    message = str(error).strip()
    return message.splitlines()[0] if message else type(error).__name__


def run_main(main) -> None:
    """Run an entry point; bad input and environment faults (exit code 2) and a diverged training (exit code 3)
    become one ``error:`` line and no traceback (``--debug`` on the command line shows the traceback instead).
    Locks on output directories are given back at the end."""
    from safetensors import SafetensorError

    debug = "--debug" in sys.argv[1:]
    if debug:
        sys.argv.remove("--debug")
    setup_logging()
    try:
        main()
    except (ValueError, OSError, SafetensorError, TrainingDiverged, RuntimeError) as error:
        if debug or (isinstance(error, RuntimeError) and not isinstance(error, TrainingDiverged)
                     and not disk_full(error)):
            raise  # a RuntimeError other than a full disk is a bug: show the traceback
        print(f"error: {error_line(error)}", file=sys.stderr)
        raise SystemExit(3 if isinstance(error, TrainingDiverged) else 2) from None
    finally:
        outdirs.release_all()


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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spm.model", "vocab.txt", "vocab.json")
TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt")


def check_model_path(name_or_path: str, tokenizer: bool = True) -> None:
    """A model given as a local path (not a hub id like ``org/name``) must be a readable directory with
    config.json, a tokenizer (if ``tokenizer``) and complete .safetensors files (headers checked, which catches a
    truncated file). Nothing is loaded."""
    path = Path(name_or_path).expanduser()
    if not looks_local(name_or_path) and not path.exists():
        return  # a hub id
    if not path.exists():
        raise FileNotFoundError(f"model path {name_or_path!r} does not exist: pass a local directory or a hub id")
    if not path.is_dir():
        raise ValueError(f"model path {name_or_path!r} is a file: pass the directory that holds config.json")
    if not os.access(path, os.R_OK | os.X_OK):
        raise PermissionError(f"model directory {name_or_path!r} is not readable: check its permissions")
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {name_or_path!r} has no config.json: pass a directory written by "
                         "save_pretrained (or an _init.sh directory)")
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"model directory {name_or_path!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
                         "save one into it with tokenizer.save_pretrained, or pass a directory that has one")
    check_safetensors(path)


def check_safetensors(folder: str | Path) -> None:
    """Every .safetensors file in ``folder`` opens (its header matches its size): a truncated or corrupt file is
    an error naming it."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except SafetensorError as error:
            raise ValueError(f"{str(file)!r} is truncated or corrupt ({error}): write it again (re-run the command "
                             "that made it) or copy / download it again") from error


def check_text_file(path: str | Path) -> None:
    """A local data file is UTF-8 text with something in it (read in chunks; nothing is kept)."""
    import codecs

    decoder, empty, offset = codecs.getincrementaldecoder("utf-8")(), True, 0
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                raise ValueError(f"data file {str(path)!r} is not UTF-8 text (byte {error.object[error.start]:#04x} "
                                 f"near offset {offset + error.start}): convert it to UTF-8, e.g. with iconv -t "
                                 "UTF-8") from None
            empty = empty and not text.strip()
            offset += len(chunk)
            if not chunk:
                break
    if empty:
        raise ValueError(f"data file {str(path)!r} is empty: pass a file with at least one record")


def check_data_paths(**flags) -> None:
    """Each given data flag (``data_dir="glue_data/CoLA"``, ...; lists allowed) that names a local path must exist;
    its text files (a directory's too) must be non-empty UTF-8."""
    for flag, values in flags.items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if not value or not looks_local(value) and not Path(value).expanduser().exists():
                continue
            path = Path(value).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"--{flag} {value!r} does not exist: pass an existing file or directory")
            files = [path] if path.is_file() else [p for p in sorted(path.iterdir()) if p.is_file()]
            for file in files:
                if file.suffix in TEXT_SUFFIXES:
                    check_text_file(file)


def load_pretrained(loader, name_or_path: str, **kwargs):
    """``loader.from_pretrained`` for a hub id or a local directory, with a clear error when neither loads."""
    from safetensors import SafetensorError

    check_model_path(name_or_path, tokenizer=loader.__name__ == "AutoTokenizer")
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except (OSError, SafetensorError) as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise  # permission denied, full disk...: run_main names the file and the fix
        detail = " ".join(str(error).split())[:300]
        raise FileNotFoundError(f"could not load {name_or_path!r} with {loader.__name__} as a local directory or "
                                f"from the hub: {detail}") from error
