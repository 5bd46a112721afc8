"""The bench scripts run both sides on CPU, briefly, and end with their JSON line (figures not asserted).
bench/serve.py runs on tandem-tiny here; its measured figures are for ViT-B-32, minutes on this CPU."""

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_step_bench_runs_tandem_and_open_clip():
    proc = subprocess.run([sys.executable, "bench/step.py", "--model", "tandem-tiny", "--batch", "8", "--steps", "2",
                           "--warmup", "1", "--rounds", "1", "--precision", "fp32"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["model"] == "tandem-tiny" and result["batch"] == 8 and result["loss_finite"]
    assert result["precision"] == "fp32 (DeepSpeed)" and result["open_clip_precision"] == "fp32"
    assert result["samples_per_s"] > 0 and result["open_clip_samples_per_s"] > 0
    assert "round 1: tandem" in proc.stdout and "round 1: open_clip" in proc.stdout


def last_json(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_loss_bench_runs_tandem_and_open_clip():
    result = last_json(["bench/loss.py", "--batches", "256", "--rounds", "1"])
    assert result["world"] > 0 and result["tiled_peak_mib_at_65536"] is None  # not measured at 256 only
    for impl in ("tiled", "open_clip"):
        assert result[f"{impl}_peak_mib_at_256"] > 0 and result[f"{impl}_time_s_at_256"] > 0, result


@pytest.mark.slow
def test_data_bench_runs_tandem_and_open_clip():
    result = last_json(["bench/data.py", "--samples", "512", "--per-shard", "128", "--batch-size", "32",
                        "--rounds", "1"])
    assert result["samples"] == 512 and result["samples_per_s"] > 0 and result["open_clip_samples_per_s"] > 0
    assert len(result["ratio_per_round"]) == 1 and result["cpu_ms_per_sample"] > 0


@pytest.mark.slow
def test_serve_bench_runs_the_batched_server_and_its_peers():
    result = last_json(["bench/serve.py", "--model", "tandem-tiny", "--requests", "24", "--threads", "1",
                        "--offline-seconds", "0.2", "--soak-seconds", "3"])
    assert result["model"] == "tandem-tiny (random init)" and result["max_batch_size"] == 32
    for key in ("rps_c1", "rps_c8", "rps_c32", "rps_one_at_a_time_c32", "offline_images_per_s",
                "ratio_vs_offline", "ratio_vs_one_at_a_time", "soak_requests"):
        assert result[key] > 0, (key, result)
    assert result["mean_batch_c32"] >= 1 and result["soak_rss_end_mib"] > 0
