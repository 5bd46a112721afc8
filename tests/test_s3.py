"""Shards on a real S3-compatible server (moto's server mode on 127.0.0.1), read through boto3."""

import json
import threading
import time
from pathlib import Path

import boto3
import pytest
import torch

from data.pipeline import ShardStream, StreamSpec
from data.s3 import S3Settings
from data.shards import check_remote, expand_shards
from tests.conftest import free_port, tandem
from training.errors import UserError

BUCKET = "tandem-shards"
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class MotoServer:
    """moto's S3 over HTTP on a fixed loopback port, which can be stopped and started again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def s3_server(synth_data):
    server = MotoServer()
    server.start()
    client = boto3.client("s3", endpoint_url=server.url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    for split in ("train", "test"):
        for path in sorted((synth_data / split).glob("*")):
            client.upload_file(str(path), BUCKET, f"{split}/{path.name}")
    yield server
    server.stop()


def settings(server) -> S3Settings:
    return S3Settings(endpoint_url=server.url, region="us-east-1", access_key_id="testing",
                      secret_access_key="testing", retry_seconds=30)


def keys(urls, s3: S3Settings) -> list[str]:
    spec = StreamSpec(urls=urls, batch_size=16, train=False, s3=s3)
    stream = ShardStream(spec, lambda image: torch.tensor(image.size), lambda texts: texts, image_size=None)
    return [k for batch in stream for k in batch["key"]]


def test_s3_shards_stream_like_local_ones(s3_server, synth_data):
    remote = expand_shards(f"s3://{BUCKET}/train/shard-{{00000..00003}}.tar")
    local = sorted(str(p) for p in (synth_data / "train").glob("*.tar"))
    check_remote(remote, settings(s3_server))
    assert keys(remote, settings(s3_server)) == keys(local, S3Settings())


def test_missing_bucket_and_key_name_the_url(s3_server):
    with pytest.raises(UserError, match=r"cannot read s3://no-such-bucket/x\.tar: no such"):
        check_remote(["s3://no-such-bucket/x.tar"], settings(s3_server))
    with pytest.raises(UserError, match=rf"cannot read s3://{BUCKET}/train/missing\.tar"):
        check_remote([f"s3://{BUCKET}/train/missing.tar"], settings(s3_server))


def test_cli_reports_a_missing_bucket_in_one_line(s3_server, tmp_path):
    cfg = tmp_path / "s3.toml"
    cfg.write_text(f'[data]\ntrain_shards = "s3://nobucket/shard-{{0..3}}.tar"\ns3_endpoint_url = "{s3_server.url}"\n')
    proc = tandem("train", "--config", str(cfg), "--nproc", "2", env=CREDS)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        "tandem: error: cannot read s3://nobucket/shard-0.tar: no such bucket"


@pytest.mark.slow
def test_training_from_s3_survives_a_server_restart(s3_server, synth_data, tmp_path):
    run_dir = tmp_path / "run"
    cfg = tmp_path / "s3.toml"
    cfg.write_text(f"""
[data]
train_shards = "s3://{BUCKET}/train/shard-{{00000..00003}}.tar::{synth_data}/train/shard-{{00000..00001}}.tar"
train_weights = "3::1"
s3_endpoint_url = "{s3_server.url}"
batch_size = 8
workers = 1
shuffle_buffer = 16
[train]
run_dir = "{run_dir}"
steps = 80
export = false
""")
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.Popen([sys.executable, "-m", "training.cli", "train", "--config", str(cfg), "--nproc", "2"],
                            cwd=ROOT, env={**os.environ, **CREDS}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.1)
    stopped_at = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    s3_server.stop()  # the store goes away mid-epoch, until a reader has had to retry...
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline and not any("retrying" in line for line in lines):
        time.sleep(0.1)
    s3_server.start()  # ...then comes back
    proc.wait(timeout=400)
    reader.join(timeout=10)
    stderr = "".join(lines)
    assert proc.returncode == 0, stderr[-4000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 81)) and 3 <= stopped_at < 80
    assert "retrying" in stderr  # the outage was seen and ridden out, not missed
