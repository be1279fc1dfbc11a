"""The hyperparameter tables of configs/ (YAML with ``keys``, ``defaults`` and ``rows``) and the per-model_type
rows (targets, embedding tables).

A table's ``keys`` are the columns that select a row, ``defaults`` the values every row inherits, ``rows`` one
experiment each, naming its ``source``. Precedence: defaults, then the row, then command-line flags that were given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]
CONFIGS = REPO_ROOT / "configs"


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
