"""Streaming shards from S3 or any S3-compatible store (MinIO, Ceph, SeaweedFS) with boto3.

Endpoint and credentials come from the config, else the environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), else boto3's standard chain. A read that fails mid-shard (the server
restarted, a connection reset) is resumed with a ranged GET from the byte it stopped at, with
exponential backoff, so a store that goes away for a while pauses training instead of ending it.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass
from functools import lru_cache

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError

from training.errors import UserError

log = logging.getLogger(__name__)

_FATAL_CODES = {"NoSuchBucket", "NoSuchKey", "404", "403", "AccessDenied", "InvalidAccessKeyId",
                "SignatureDoesNotMatch", "InvalidBucketName"}


@dataclass(frozen=True)
class S3Settings:
    """Where and how to reach the store; empty fields defer to the environment and boto3's chain."""

    endpoint_url: str = ""
    region: str = ""
    access_key_id: str = ""
    secret_access_key: str = ""
    retry_seconds: float = 300.0
    """How long one shard read keeps retrying a store that does not answer."""


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def split_url(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket or not key:
        raise UserError(f"malformed S3 URL '{url}' (expected s3://bucket/key)")
    return bucket, key


@lru_cache(maxsize=8)
def client(settings: S3Settings):
    """One boto3 client per process and settings (boto3 clients are thread-safe, not fork-safe)."""
    kwargs = {
        "config": BotoConfig(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=30),
    }
    if settings.endpoint_url:
        kwargs["endpoint_url"] = settings.endpoint_url
    if settings.region:
        kwargs["region_name"] = settings.region
    if settings.access_key_id:
        kwargs["aws_access_key_id"] = settings.access_key_id
        kwargs["aws_secret_access_key"] = settings.secret_access_key
    return boto3.session.Session().client("s3", **kwargs)


def _error_code(error: Exception) -> str:
    return str(error.response.get("Error", {}).get("Code", "")) if isinstance(error, ClientError) else ""


def check(url: str, settings: S3Settings) -> int:
    """Size of the object; a missing bucket or key or bad credentials is a one-line UserError."""
    bucket, key = split_url(url)
    try:
        return int(client(settings).head_object(Bucket=bucket, Key=key)["ContentLength"])
    except ClientError as error:
        code = _error_code(error)
        if code in ("404", "NoSuchKey", "NoSuchBucket"):
            code = "NoSuchKey" if _bucket_exists(bucket, settings) else "NoSuchBucket"
        elif code == "403":  # a HEAD answer has no body: a 1-byte GET says which credential is wrong
            code = _get_error_code(bucket, key, settings) or code
        raise UserError(f"cannot read {url}: {REASONS.get(code, code or 'error')}") from None
    except BotoCoreError as error:
        raise UserError(f"cannot read {url}: {error}") from None


REASONS = {
    "NoSuchBucket": "no such bucket",
    "NoSuchKey": "no such key",
    "InvalidAccessKeyId": "the store does not know this access key id (check the credentials)",
    "SignatureDoesNotMatch": "the secret access key does not match the access key id (check the credentials)",
    "AccessDenied": "access denied (check the credentials and the bucket policy)",
    "403": "access denied (check the credentials)",
}


def _get_error_code(bucket: str, key: str, settings: S3Settings) -> str:
    try:
        client(settings).get_object(Bucket=bucket, Key=key, Range="bytes=0-0")
    except ClientError as error:
        return _error_code(error)
    except BotoCoreError:
        pass
    return ""


def _bucket_exists(bucket: str, settings: S3Settings) -> bool:
    try:
        client(settings).head_bucket(Bucket=bucket)
        return True
    except ClientError:
        return False


class S3Reader(io.RawIOBase):
    """A forward-only file over one object that survives dropped connections."""

    def __init__(self, url: str, settings: S3Settings):
        super().__init__()
        self.url, self.settings = url, settings
        self.bucket, self.key = split_url(url)
        self.position = 0
        self.size: int | None = None
        self.body = None

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        extra = {"Range": f"bytes={self.position}-"} if self.position else {}
        response = client(self.settings).get_object(Bucket=self.bucket, Key=self.key, **extra)
        self.body = response["Body"]
        if self.size is None:
            self.size = int(response["ContentLength"])

    def readinto(self, buffer) -> int:
        if self.size is not None and self.position >= self.size:
            return 0
        deadline, delay = time.monotonic() + self.settings.retry_seconds, 0.5
        while True:
            try:
                if self.body is None:
                    self._open()
                data = self.body.read(len(buffer))
                break
            except Exception as error:  # noqa: BLE001 - every transport failure looks different
                if _error_code(error) in _FATAL_CODES or time.monotonic() > deadline:
                    raise
                log.warning("S3 read of %s failed at byte %d (%s); retrying in %.1fs",
                            self.url, self.position, type(error).__name__, delay)
                self.body = None
                time.sleep(delay)
                delay = min(delay * 2, 8.0)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
            self.body = None
        super().close()


def open_url(url: str, settings: S3Settings) -> io.BufferedReader:
    return io.BufferedReader(S3Reader(url, settings), buffer_size=1 << 20)
