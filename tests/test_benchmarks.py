"""The benchmarks as a user starts them: --help runs nothing, and a run writes its JSON where --out says.

    pytest tests/test_benchmarks.py
"""

from __future__ import annotations

import importlib
import json
import sys

import pytest

from benchmarks import common

BENCHMARKS = ["bench_causal_cpu", "bench_core", "bench_loftq", "bench_mc", "bench_mcq", "bench_models",
              "bench_sharded", "bench_stream_init"]


def recorded() -> dict:
    return {path.name: path.stat().st_mtime_ns for path in common.RESULTS.iterdir()}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_help_runs_nothing_and_names_out(name, monkeypatch, capsys):
    """A benchmark given --help prints its flags and exits; it neither runs nor touches the recorded figures."""
    before = recorded()
    module = importlib.import_module(f"benchmarks.{name}")
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        module.main()
    assert exit_info.value.code == 0
    assert "--out" in capsys.readouterr().out
    assert recorded() == before


def test_run_writes_its_json_to_out(tmp_path, capsys):
    """bench_mc --quick with --out: the JSON lands there (folders made), reads back, and benchmarks/results is kept."""
    from benchmarks import bench_mc

    before = recorded()
    out = tmp_path / "new" / "mc.json"
    result = bench_mc.main(["--quick", "--repeats", "1", "--samples", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result["seconds"]) == {"mean_network", "sequential_own_generator", "sequential", "batched"}
    assert f"wrote {out}" in capsys.readouterr().out
    assert recorded() == before
    assert [path.name for path in out.parent.iterdir()] == ["mc.json"]  # no temporary file left beside it
