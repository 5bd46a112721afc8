"""Shards on a real S3-compatible server (moto's server mode on 127.0.0.1), read through boto3."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import pytest
import torch
from botocore.exceptions import ClientError

from data.pipeline import ShardStream, StreamSpec
from data.s3 import S3Settings, check, fatal_reason, open_url
from data.shards import check_remote, count_samples, expand_shards
from data.writer import folder_rows, write_shards
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


def test_every_shard_is_checked_and_a_shard_missing_mid_run_is_an_error_not_a_gap(s3_server):
    urls = expand_shards(f"s3://{BUCKET}/train/shard-{{00000..00005}}.tar")  # 4 exist
    with pytest.raises(UserError, match=rf"^cannot read s3://{BUCKET}/train/shard-00004\.tar: no such key "
                                        r"\(and 1 more shard\)$"):
        check_remote(urls, settings(s3_server))
    # a shard deleted after the check: the reader names it instead of skipping it
    with pytest.raises(UserError, match=rf"^cannot read s3://{BUCKET}/train/shard-00004\.tar: no such key$"):
        keys(urls[3:5], settings(s3_server))
    assert count_samples(urls[:4], settings(s3_server)) == 256  # from the sizes.json beside them
    assert count_samples(urls[:4]) is None  # unknown, not 0, when the store is out of reach


def test_settings_mistakes_are_one_line_and_missing_credentials_are_not_retried(s3_server, monkeypatch):
    shard = f"s3://{BUCKET}/train/shard-00000.tar"
    with pytest.raises(UserError, match="^S3 endpoint URL 'localhost:9000' must start with http:// or https://$"):
        check_remote([shard], S3Settings(endpoint_url="localhost:9000"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "localhost:9000")
    with pytest.raises(UserError, match="^cannot reach S3 with these settings: Invalid endpoint: localhost:9000"):
        check_remote([shard], S3Settings(region="eu-west-3"))
    for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    anonymous = S3Settings(endpoint_url=s3_server.url, region="us-east-1", retry_seconds=2)
    with pytest.raises(UserError, match=rf"^cannot read {shard}: no credentials found"):
        keys([shard], anonymous)


def test_the_region_is_the_configs_else_aws_region_else_aws_default_region(monkeypatch):
    """The region a request is signed for, read from SigV4's credential scope as a server sees it: a
    MinIO or Ceph with a region of its own refuses requests signed for another. botocore alone reads
    only AWS_DEFAULT_REGION; AWS_REGION (the AWS CLI's and the other SDKs' name) wins over it."""
    scopes = []

    class Store(BaseHTTPRequestHandler):
        def do_HEAD(self):
            scopes.append(self.headers["Authorization"].split("Credential=")[1].split(",")[0])
            self.send_response(200)
            self.send_header("Content-Length", "7")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Store)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = S3Settings(endpoint_url=f"http://127.0.0.1:{server.server_port}", access_key_id="AKID",
                          secret_access_key="secret")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-west-2")
        monkeypatch.setenv("AWS_REGION", "eu-west-3")
        assert check("s3://b/k.tar", replace(base, region="ap-south-1")) == 7
        assert check("s3://b/k.tar", base) == 7
        monkeypatch.delenv("AWS_REGION")
        assert check("s3://b/k.tar", replace(base, retry_seconds=1)) == 7  # another client (cached by settings)
    finally:
        server.shutdown()
        server.server_close()
    assert [scope.split("/")[2] for scope in scopes] == ["ap-south-1", "eu-west-3", "us-west-2"], scopes


def test_cli_reports_a_missing_bucket_in_one_line(s3_server, tmp_path):
    cfg = tmp_path / "s3.toml"
    cfg.write_text(f'[data]\ntrain_shards = "s3://nobucket/shard-{{0..3}}.tar"\ns3_endpoint_url = "{s3_server.url}"\n')
    proc = tandem("train", "--config", str(cfg), "--nproc", "2", env=CREDS)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        "tandem: error: cannot read s3://nobucket/shard-0.tar: no such bucket"


AUTH_BUCKET = "tandem-private"


@pytest.fixture(scope="module")
def auth_keys(synth_data):
    """moto's S3 with IAM authentication on, in its own process: only the keys of the users created here work,
    ``{"full": S3Settings, "read_only": S3Settings}`` (the second may get objects and list buckets, no more).

    ``INITIAL_NO_AUTH_ACTION_COUNT`` is read once when moto is imported and holds for its whole process, so
    this server cannot share the test process with the ThreadedMotoServer above (which accepts any key).
    The first 6 requests (per user: create it, give it rights, create its key) pass unauthenticated.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "6"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "moto server did not start"
                time.sleep(0.1)
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="anonymous",
                           aws_secret_access_key="anonymous")
        users = {}
        for user, actions in (("full", "s3:*"), ("read_only", ["s3:GetObject", "s3:ListBucket"])):
            iam.create_user(UserName=user)
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps({
                "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
            key = iam.create_access_key(UserName=user)["AccessKey"]
            users[user] = S3Settings(endpoint_url=url, region="us-east-1", access_key_id=key["AccessKeyId"],
                                     secret_access_key=key["SecretAccessKey"], retry_seconds=5)
        from data.s3 import client

        client(users["full"]).create_bucket(Bucket=AUTH_BUCKET)
        client(users["full"]).upload_file(str(synth_data / "train" / "shard-00000.tar"), AUTH_BUCKET, "shard-0.tar")
        yield users
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def auth_server(auth_keys):
    return auth_keys["full"]


def test_read_only_credentials_stop_the_writer_in_one_line_naming_the_file(auth_keys, tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8), "red").save(tmp_path / "red.jpg")
    (tmp_path / "red.txt").write_text("a red square")
    with pytest.raises(UserError, match=rf"^cannot write s3://{AUTH_BUCKET}/out/00000\.tar: access denied"):
        write_shards(folder_rows(tmp_path), f"s3://{AUTH_BUCKET}/out", settings=auth_keys["read_only"])


def test_bad_credentials_give_one_line_naming_the_url(auth_server, tmp_path):
    shard = f"s3://{AUTH_BUCKET}/shard-0.tar"
    check_remote([shard], auth_server)  # the right key reads the shard: the failures below are the keys'
    assert len(keys([shard], auth_server)) == 64
    unknown = replace(auth_server, access_key_id="AKIAUNKNOWNUNKNOWN00", secret_access_key="nope")
    with pytest.raises(UserError, match=rf"^cannot read {shard}: the store does not know this access key id"):
        check_remote([shard], unknown)
    # through the real CLI, the key from the environment with a wrong secret
    cfg = tmp_path / "private.toml"
    cfg.write_text(f'[data]\ntrain_shards = "{shard}"\ns3_endpoint_url = "{auth_server.endpoint_url}"\n')
    env = {**CREDS, "AWS_ACCESS_KEY_ID": auth_server.access_key_id, "AWS_SECRET_ACCESS_KEY": "wrong"}
    proc = tandem("train", "--config", str(cfg), env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"tandem: error: cannot read {shard}: the secret access key does not match the access key id "
        "(check the credentials)")


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


class LoopbackStore(ThreadingHTTPServer):
    """An HTTP server on a free 127.0.0.1 port, serving from a thread of its own."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]):
        super().__init__(("127.0.0.1", 0), handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


class ResumeStore(LoopbackStore):
    """An S3 endpoint on 127.0.0.1 that drops the first GET of its one object halfway, then answers the
    resumed GET as ``mode`` says: ``ignore-range`` (200 and the whole object, as a proxy that drops
    ``Range`` does), ``wrong-range`` (206 from byte 0) or ``changed`` (412: the object was overwritten)."""

    def __init__(self, data: bytes, mode: str):
        self.data, self.mode, self.requests = data, mode, []
        super().__init__(ResumeHandler)


class ResumeHandler(QuietHandler):
    def do_GET(self) -> None:
        store, data = self.server, self.server.data
        store.requests.append({"range": self.headers.get("Range"), "if_match": self.headers.get("If-Match")})
        if len(store.requests) > 1 and store.mode == "changed":
            body = b"<Error><Code>PreconditionFailed</Code><Message>At least one precondition failed</Message></Error>"
            self.send_response(412)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        wrong = len(store.requests) > 1 and store.mode == "wrong-range"
        self.send_response(206 if wrong else 200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", '"v1"')
        if wrong:
            self.send_header("Content-Range", f"bytes 0-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if len(store.requests) == 1:  # the connection dies halfway through the first answer
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
        else:
            self.wfile.write(data)


@pytest.mark.parametrize("mode", ["ignore-range", "wrong-range", "changed"])
def test_a_resumed_read_checks_the_range_and_version_it_gets(mode):
    data = os.urandom(3 << 20)
    store = ResumeStore(data, mode)
    try:
        s3 = S3Settings(endpoint_url=store.url, region="us-east-1", access_key_id="k", secret_access_key="s",
                        retry_seconds=30)
        url = f"s3://{BUCKET}/big.tar"
        if mode == "ignore-range":  # the whole object came back: its first bytes are skipped, not repeated
            assert open_url(url, s3).read() == data
        else:  # never bytes from the wrong place or another version: one line naming the shard
            reason = "asked for bytes" if mode == "wrong-range" else "the object changed while it was being read"
            with pytest.raises(UserError, match=rf"^cannot read {url}: {reason}"):
                open_url(url, s3).read()
        first, resumed = store.requests[:2]
        assert first == {"range": None, "if_match": None}
        assert resumed["if_match"] == '"v1"' and resumed["range"].startswith("bytes=") and resumed["range"] != "bytes=0-"
    finally:
        store.shutdown()
        store.server_close()


def test_an_expired_session_token_is_not_retried():
    expired = ClientError({"Error": {"Code": "ExpiredToken", "Message": "The provided token has expired."}}, "GetObject")
    assert fatal_reason(expired).startswith("the session token has expired")


class RefusingStore(LoopbackStore):
    """An S3 endpoint on 127.0.0.1 that answers every GET with the same S3 error, counting the GETs."""

    def __init__(self, status: int, code: str, message: str):
        self.status, self.code, self.message, self.requests = status, code, message, 0
        super().__init__(RefusingHandler)


class RefusingHandler(QuietHandler):
    def do_GET(self) -> None:
        store = self.server
        store.requests += 1
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{store.code}</Code>'
                f"<Message>{store.message}</Message></Error>").encode()
        self.send_response(store.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize("status, code, message", [
    (403, "InvalidObjectState", "The operation is not valid for the object's storage class"),  # in Glacier
    (403, "AllAccessDisabled", "All access to this object has been disabled"),
    (400, "InvalidArgument", "Invalid argument"),
])
def test_a_permanent_refusal_is_one_line_naming_its_code_not_retried(status, code, message):
    store = RefusingStore(status, code, message)
    try:
        s3 = S3Settings(endpoint_url=store.url, region="us-east-1", access_key_id="k", secret_access_key="s",
                        retry_seconds=10)
        url = f"s3://{BUCKET}/archived.tar"
        with pytest.raises(UserError) as raised:
            open_url(url, s3).read()
        assert str(raised.value) == \
            f"cannot read {url}: the store refused the request: {code} (HTTP {status}): {message}"
        assert store.requests == 1  # not retried for retry_seconds, then "no answer from the store"
    finally:
        store.shutdown()
        store.server_close()


def test_which_store_answers_are_retried():
    def answer(status: int, code: str) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": "the store's words"},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    # a timeout or throttling a later try can pass, even when S3 sends it as a 400
    for status, code in ((400, "RequestTimeout"), (408, "RequestTimeout"), (429, "TooManyRequests"),
                         (400, "Throttling"), (503, "SlowDown"), (500, "InternalError"), (409, "OperationAborted"),
                         (400, "BadDigest"), (400, "IncompleteBody"), (400, "IDPCommunicationError")):
        assert fatal_reason(answer(status, code)) == "", (status, code)
    assert fatal_reason(answer(400, "AuthorizationHeaderMalformed")) == \
        "the store refused the request: AuthorizationHeaderMalformed (HTTP 400): the store's words"
    assert fatal_reason(answer(301, "PermanentRedirect")).startswith("the store refused the request: PermanentRedirect")
    assert fatal_reason(answer(403, "AccessDenied")) == "access denied (check the credentials and the bucket policy)"
