"""What every benchmark shares: its --out flag and how its results JSON is written (atomically, then printed)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmm.run import fileio

RESULTS = Path(__file__).resolve().parent / "results"


def add_out(parser: argparse.ArgumentParser, default_name: str) -> None:
    parser.add_argument("--out", default=None, help=f"the results JSON (default: benchmarks/results/{default_name})")


def record(result: dict, out: str | None, default_name: str, show: bool = True) -> Path:
    """Write ``result`` to --out, else benchmarks/results/``default_name``; print it (``show``) and where it went."""
    path = Path(out) if out else RESULTS / default_name
    fileio.write_json(path, result)
    if show:
        print(json.dumps(result, indent=2))
    print(f"wrote {path}")
    return path
