"""Read data: local JSON / JSON-lines files into a list of records, with errors that name the file and line; hub
datasets and dataset directories through ``datasets``, with one error naming the source and the fix."""

from __future__ import annotations

import json
from pathlib import Path


def read_json_records(path: str | Path) -> list[dict]:
    """Records of a .json file (a list of objects, or {"data": [...]}) or of JSON lines (one object per line, also
    for a .json file that is not one JSON document). Every record must be a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    records = None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
            records = data["data"] if isinstance(data, dict) and isinstance(data.get("data"), list) else data
        except json.JSONDecodeError:
            pass  # not one JSON document: read it as JSON lines
        if records is not None and not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of objects, got {type(records).__name__}")
    if records is None:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: malformed JSON ({error.msg}); fix or remove the "
                                     "line (JSON lines: one object per line)") from None
    for index, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise ValueError(f"{path}: record {index} is a {type(record).__name__}, expected a JSON object")
    return records


def not_a_directory(path) -> str:
    """Why ``path``, expected to be a directory, is none: "is a file, not a directory" or "does not exist"."""
    return "is a file, not a directory" if Path(path).exists() else "does not exist"


def load_dataset(source: str, config_name: str | None = None, fix: str = "pass a hub id this machine can reach, a "
                 "dataset directory whose data files share their columns, or a .json/.jsonl file"):
    """``datasets.load_dataset(source, config_name)``; its failure (offline, no data files, files whose columns
    differ, ...) is one ValueError naming the source and ``fix``, the cause chained."""
    import datasets

    try:
        return datasets.load_dataset(source, config_name)
    except MemoryError:
        raise
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        named = f"{source!r}" + (f" ({config_name})" if config_name else "")
        raise ValueError(f"cannot load {named} as a dataset ({type(error).__name__}: {first_line}); {fix}") from error
