"""The hyperparameter tables of configs/ (YAML with ``keys``, ``defaults`` and ``rows``) and the per-model_type
rows (targets, embedding tables).

A table's ``keys`` are the columns that select a row, ``defaults`` the values every row inherits, ``rows`` one
experiment each, naming its ``source``. Precedence: defaults, then the row, then command-line flags that were given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from llmm.run import schema

REPO_ROOT = Path(__file__).resolve().parents[3]
CONFIGS = REPO_ROOT / "configs"


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key named twice in one mapping is an error (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        twice = sorted({str(key) for key in keys if keys.count(key) > 1})
        if twice:
            raise ValueError(f"{node.start_mark.name}, line {node.start_mark.line + 1}: {', '.join(twice)} named twice "
                             "in one mapping: keep one")
        return super().construct_mapping(node, deep=deep)


# A keyed table's top-level blocks: {name: (its type, its items' type)}; variants: configs/mcq.yaml's named options.
TABLE_BLOCKS = {"keys": (list, str), "columns": (list, str), "defaults": (dict, None), "rows": (list, dict),
                "variants": (dict, dict)}
KINDS, ITEMS = {list: "a list", dict: "a mapping"}, {str: "names", dict: "mappings"}


def read_yaml(path: str | Path) -> dict:
    """A YAML file holding one mapping; a directory, bad YAML or no mapping is one error naming the file and the fix."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"config file {str(path)!r} is a directory, not a file: pass the YAML file")
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    with open(path) as handle:
        try:
            data = yaml.load(handle, Loader=UniqueKeyLoader)
        except yaml.YAMLError as error:
            mark, start = getattr(error, "problem_mark", None), getattr(error, "context_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(error, "problem", None) or " ".join(str(error).split())
            context = f", {error.context} at line {start.line + 1}" if start and error.context else ""
            raise ValueError(f"{path}{where}: malformed YAML ({problem}{context}): fix the syntax (a bracket, brace "
                             "or quote left open, an indent)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds {'nothing' if data is None else repr(data)[:60]}: it must hold a YAML "
                         "mapping (name: value lines)")
    return data


def check_names(mapping: dict, known, where: str) -> None:
    """An unknown key of ``mapping`` is one error naming ``where``, the key and the closest known one."""
    for name in mapping:
        if name not in known:
            raise ValueError(f"{where} has an unknown key {name!r}: fix or remove it "
                             f"({schema.closest_hint(name, known)})")


def check_blocks(data: dict, blocks: dict, file: str, required=()) -> None:
    """The top-level keys of a YAML file: each one of ``blocks`` ({name: (type, items' type)}) with a value of that
    type, the ``required`` ones present; else one error naming the file, the key and the fix."""
    check_names(data, blocks, file)
    for name in required:
        if name not in data:
            raise ValueError(f"{file} has no {name!r}: it must hold {' and '.join(required)}")
    for name, value in data.items():
        kind, item = blocks[name]
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        wrong = [value] if not isinstance(value, kind) else [one for one in items if item and not isinstance(one, item)]
        if wrong:
            raise ValueError(f"{file}: {name} {'is' if wrong[0] is value else 'holds'} {repr(wrong[0])[:80]}: it "
                             f"must be {KINDS[kind]}" + (f" of {ITEMS[item]}" if item else ""))


def read_keyed(path: str | Path) -> dict:
    """A keyed table (``keys`` and ``rows``, optional ``columns``, ``defaults``, ``variants``), each block of its
    type; an unknown block is one error naming the closest."""
    table = read_yaml(path)
    check_blocks(table, TABLE_BLOCKS, Path(path).name, required=("keys", "rows"))
    return table


def read_table(path: str | Path, blocks=schema.BLOCKS) -> dict:
    """A settings table whose defaults and rows name only fields of ``blocks`` (or key columns; an unknown or old name
    is one error naming the closest or new one), each value in its field's range."""
    table, file = read_keyed(path), Path(path).name
    known = {*schema.fields_of(*blocks), *table["keys"], "source"}
    for index, row in enumerate([table.get("defaults", {}), *table["rows"]]):
        where = "defaults" if index == 0 else {k: row.get(k) for k in table["keys"]}
        for name, value in row.items():
            if name in schema.RENAMED and name not in known and schema.RENAMED[name] in known:
                raise ValueError(f"{file}: {where} names {name!r}, which is now {schema.RENAMED[name]!r} (Hugging "
                                 "Face's name): rename it")
            schema.check_row_keys([name], known, file, where)
            rule = schema.setting_error(name, value, blocks)
            if rule and isinstance(value, str) and schema.is_number_text(value):
                rule += f" (YAML reads {value} as text: write it with a dot, e.g. 1.0e-4)"
            if rule:
                raise ValueError(f"{file}: {where} has {name} = {value!r}: it must be {rule}")
    return table


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
    raise ValueError(f"no row for {selection} in the table; rows ({', '.join(keys)}): {existing}. Name one, or add "
                     "a row for it to the table's YAML file (its settings are the experiment's)")


def add_setting_flags(parser: argparse.ArgumentParser, table: dict, blocks=schema.BLOCKS, plumbing_blocks=None,
                      also=(), required=(), row_choices=()) -> None:
    """One ``--name`` flag (default None: the table decides) per setting the table names, run-plumbing field of
    ``plumbing_blocks`` (default ``blocks``) and field in ``also`` (input paths, debug limits), typed and described by
    its field; plus old names (schema.add_flags) and the key columns: ``required`` ones must be given, ``row_choices``
    ones take only the values the rows have."""
    fields = schema.fields_of(*blocks)
    have = {action.dest for action in parser._actions}
    for key in table["keys"]:
        if key in fields and key not in have:
            choices = (sorted({row[key] for row in table["rows"]}, key=str) if key in row_choices
                       else fields[key].metadata["choices"])
            parser.add_argument(f"--{key}", type=schema.kind_of(fields[key]), default=None, required=key in required,
                                choices=choices, help=f"{fields[key].metadata['help']} (selects a row of the table)")
    names = [*table.get("defaults", {}), *(k for row in table["rows"] for k in row)]
    plumbing = schema.role_names(schema.RUN, blocks if plumbing_blocks is None else plumbing_blocks)
    wanted = {name for name in [*names, *plumbing, *also] if name not in table["keys"] and name != "source"}
    schema.add_flags(parser, blocks, only=wanted)
    for action in parser._actions:  # a field's hand-written flag (not a key): its choices checked with the others
        if action.dest in fields and action.choices is not None and action.dest not in table["keys"]:
            action.help = f"{action.help or ''} (one of {', '.join(map(str, action.choices))})"
            action.choices = None


def offered_defaults(blocks, args: argparse.Namespace) -> dict:
    """The defaults of every setting the entry point offers (a flag in ``args``: its table's vocabulary, its inputs)
    and of the run-plumbing fields of ``blocks`` (what a table need not name: --report_to). A run records each, given
    or not, so its settings.json and cell hold every setting it offers (a row that leaves lora_alpha out trains at,
    and records, 16); a field the entry point does not offer (GLUE's dtype) is no part of them."""
    fields = schema.fields_of(*blocks)
    plumbing = {name: f.default for name, f in fields.items() if f.metadata["role"] == schema.RUN
                and f.default is not None}
    return {**plumbing, **{name: fields[name].default for name in vars(args) if name in fields
                           and fields[name].metadata["role"] != schema.RUN}}


def resolve_settings(table: dict, args: argparse.Namespace) -> dict:
    """Table row selected by the key flags, then every flag that was given on the command line."""
    settings = select_row(table, **{k: getattr(args, k) for k in table["keys"]})
    settings.update({k: v for k, v in vars(args).items() if v is not None})
    return settings


def model_type_row(file: str, model_config, fix: str) -> list[str]:
    """The row of ``configs/<file>`` for the checkpoint's ``model_type``; a missing row names ``fix``."""
    table = read_yaml(CONFIGS / file)
    model_type = getattr(model_config, "model_type", None)
    if model_type not in table:
        raise ValueError(f"no row for model_type {model_type!r} in configs/{file} (known: {sorted(table)}): {fix}")
    row = table[model_type]
    if not isinstance(row, list) or not all(isinstance(name, str) for name in row):
        raise ValueError(f"configs/{file}: row {model_type!r} is {row!r}: it must be a list of module names, e.g. "
                         "[q_proj, v_proj]")
    return list(row)


def default_targets(model_config, explicit: list[str] | None = None) -> list[str]:
    """Target modules: an explicit list wins, else the row for ``model_type`` in configs/targets.yaml."""
    return list(explicit) if explicit else model_type_row("targets.yaml", model_config, "pass --target_modules")


def default_embedding_targets(model_config) -> list[str]:
    """The embedding tables the GLUE protocol quantizes and adapts: configs/embedding_targets.yaml's model_type row."""
    return model_type_row("embedding_targets.yaml", model_config, "add a row, or turn quantize_embeddings off")
