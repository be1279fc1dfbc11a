"""The K directions shard with the means: a training step under FSDP1 with PEFT's wrap policy (flat
parameters, fp32 adapters over a bf16 backbone) and under FSDP2 (per decoder layer, and also on every module PEFT's
policy picks, as accelerate applies it) equals one process on the global batch.

Two CPU processes over gloo (torch.distributed.run). Both draw the same noise (seed_noise(model, 3) on each), so
sharding is the only difference: losses agree within float rounding of the gradient reduction (rtol 1e-5 in fp32;
1e-4 over a bf16 backbone, measured 7e-6 apart: one step moves the loss by about 1e-2, so the bound can tell).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from fsdp_worker import GLOBAL_BATCH, build, two_steps

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def sharded_losses(mode: str, dtype: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([*TORCHRUN, str(REPO_ROOT / "tests" / "fsdp_worker.py"), mode, dtype], cwd=REPO_ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    line = next(line for line in run.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


@pytest.mark.parametrize("mode, dtype", [("fsdp1", "float32"), ("fsdp1", "bfloat16"), ("fsdp2", "float32"),
                                         ("fsdp2_policy", "float32")])
def test_sharded_step_equals_one_process(mode, dtype):
    torch.set_num_threads(1)
    model = build(getattr(torch, dtype))
    expected = [loss.item() for loss in two_steps(model, model, GLOBAL_BATCH)]
    result = sharded_losses(mode, dtype)
    tolerance = 1e-5 if dtype == "float32" else 1e-4
    assert result["losses"] == pytest.approx(expected, rel=tolerance)
    assert result["losses"][1] != pytest.approx(result["losses"][0], rel=1e-4)  # the step changed the adapter
    if mode != "fsdp1":
        assert result["types"] == ["DTensor"]  # the directions are sharded parameters
