"""Files of a run: atomic writes, checks of model and data paths before anything loads, loading, plots."""

from __future__ import annotations

import codecs
import json
import math
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from llmm.outdirs import resolved, umask
from llmm.run import schema

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spm.model", "vocab.txt", "vocab.json")
TEXT_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".txt")
DATA_SUFFIXES = (*TEXT_SUFFIXES, ".parquet")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def write_text(path: str | Path, text: str) -> None:
    """Write atomically (temporary file + rename): a crash leaves the old file or none, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as error:  # name the file asked for, not the temporary one
        raise OSError(error.errno, error.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private; give it the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, payload) -> None:
    write_text(path, json.dumps(payload, indent=2, default=str))


def read_text_or_empty(path: str | Path) -> str:
    """A text file's content, or "" when it is missing or unreadable (a probe, not an input)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def finite_or_null(value):
    """``value`` with each non-finite float as None, for strict JSON readers (NaN is not JSON: jq, JavaScript)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    import llmm

    return {"llmm": llmm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}


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


def real_path(value, files_only: bool = False):
    """A path (or list of paths) that exists here as its real path; anything else (a hub id, a table row; with
    ``files_only`` a name without a .json/.jsonl suffix) as it is."""
    if isinstance(value, list):
        return [real_path(v, files_only) for v in value]
    if (isinstance(value, str) and value and os.path.exists(os.path.expanduser(value))
            and not (files_only and not value.endswith((".json", ".jsonl")))):
        return str(resolved(value))
    return value


def real_inputs(record: dict, blocks) -> dict:
    """A run's settings with its local inputs (the fields of ``blocks`` declared with ``path``) as real paths: what
    settings.json and the cell record, so a later command finds them from any directory and one input is one cell.
    A field that also takes table rows (``path="rows or files"``, --ood) has only its files resolved."""
    fields = schema.fields_of(*blocks)
    return {key: real_path(value, fields[key].metadata["path"] == schema.ROWS_OR_FILES)
            if key in fields and fields[key].metadata["path"] else value for key, value in record.items()}


def looks_local(name_or_path: str) -> bool:
    """True for a local path (absolute, ./ ../ ~, a data file's suffix, or more than one /), not a hub id (org/name)."""
    return (name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.endswith(DATA_SUFFIXES)
            or os.path.sep in name_or_path.strip("/").split("/", 1)[-1])


def check_model_path(name_or_path: str, tokenizer: bool = True) -> None:
    """A model given as a local path must be a readable directory with config.json, a tokenizer (if ``tokenizer``)
    and complete .safetensors files (headers checked). Nothing is loaded."""
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
    """Every .safetensors file in ``folder`` opens (its header matches its size), else an error naming it."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt"):
                pass
        except SafetensorError as error:
            raise ValueError(f"{str(file)!r} is truncated or corrupt ({error}): write it again (re-run the command "
                             "that made it) or copy / download it again") from error


def check_text_file(path: str | Path) -> None:
    """A local data file is UTF-8 text with something in it (read in chunks; nothing is kept)."""
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


# Data flags that take one file (a directory there is an error, not a dataset).
FILE_FLAGS = ("train_file", "validation_file", "train_data", "test_data", "ood", "file")  # eval_data: its own check


def check_data_paths(**flags) -> None:
    """Each given data flag (``data_dir="glue_data/CoLA"``, ...; lists allowed) that names a local path must exist
    (a FILE_FLAGS one as a file); its text files (a directory's too) must be non-empty UTF-8."""
    for flag, values in flags.items():
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if not value or not looks_local(value) and not Path(value).expanduser().exists():
                continue
            path = Path(value).expanduser()
            if not path.exists():
                raise FileNotFoundError(f"--{flag} {value!r} does not exist: pass an existing file or directory")
            if path.is_dir() and (flag in FILE_FLAGS or str(value).endswith(TEXT_SUFFIXES)):
                raise IsADirectoryError(f"--{flag} {value!r} is a directory, not a {path.suffix or 'data'} file: "
                                        "pass the data file itself")
            for file in [path] if path.is_file() else sorted(path.iterdir()):
                if file.is_file() and file.suffix in TEXT_SUFFIXES:
                    check_text_file(file)


def load_pretrained(loader, name_or_path: str, **kwargs):
    """``loader.from_pretrained`` for a hub id or a local directory, with a clear error when neither loads."""
    check_model_path(name_or_path, tokenizer=loader.__name__ == "AutoTokenizer")
    try:
        return loader.from_pretrained(name_or_path, **kwargs)
    except (OSError, SafetensorError) as error:
        if isinstance(error, OSError) and error.errno is not None:
            raise  # permission denied, full disk...: run_main names the file and the fix
        detail = " ".join(str(error).split())[:300]
        raise FileNotFoundError(f"could not load {name_or_path!r} with {loader.__name__} as a local directory or "
                                f"from the hub: {detail}") from error
