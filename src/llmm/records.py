"""Read local JSON / JSON-lines data files into a list of records, with errors that name the file and line."""

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
