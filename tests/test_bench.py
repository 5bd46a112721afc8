"""bench/step.py runs both sides on CPU and ends with its JSON line (its figures are not asserted)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_step_bench_runs_tandem_and_open_clip():
    proc = subprocess.run([sys.executable, "bench/step.py", "--model", "tandem-tiny", "--batch", "8", "--steps", "2",
                           "--warmup", "1", "--rounds", "1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["model"] == "tandem-tiny" and result["batch"] == 8 and result["loss_finite"]
    assert result["precision"] == "fp32 (DeepSpeed)" and result["open_clip_precision"] == "fp32"
    assert result["samples_per_s"] > 0 and result["open_clip_samples_per_s"] > 0
    assert "round 1: tandem" in proc.stdout and "round 1: open_clip" in proc.stdout
