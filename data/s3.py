"""Streaming shards from S3 or any S3-compatible store (MinIO, Ceph, SeaweedFS) with boto3.

Endpoint, region and credentials come from the config, else the environment (``AWS_ENDPOINT_URL``,
``AWS_REGION`` or ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ...), else boto3's standard chain. A read that fails mid-shard (the server
restarted, a connection reset) is resumed with a ranged GET from the byte it stopped at, with
exponential backoff, so a store that goes away for a while pauses training instead of ending it. What no
retry can change (a missing key, refused or absent credentials, a store silent past ``retry_seconds``)
is a ``StoreError``: one line naming the shard, never a skipped shard.
"""

from __future__ import annotations

import io
import logging
import os
import time
from dataclasses import dataclass
from functools import lru_cache

import boto3
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

from training.errors import UserError

log = logging.getLogger(__name__)

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


class StoreError(UserError):
    """A problem with the store or its settings that no retry changes. ``message`` keeps the line:
    webdataset appends the stream and URL to ``args`` of any exception that passes through its tar reader."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def client(settings: S3Settings):
    """One boto3 client per process and settings (boto3 clients are thread-safe, not fork-safe: a
    DataLoader worker forked after a check must not share the parent's pooled connections)."""
    return _client(settings, os.getpid())


@lru_cache(maxsize=8)
def _client(settings: S3Settings, pid: int):
    endpoint = settings.endpoint_url
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise StoreError(f"S3 endpoint URL '{endpoint}' must start with http:// or https://")
    kwargs = {
        "config": BotoConfig(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=30),
    }
    if settings.endpoint_url:
        kwargs["endpoint_url"] = settings.endpoint_url
    # botocore reads only AWS_DEFAULT_REGION; AWS_REGION is what the AWS CLI v2, the other SDKs and
    # EKS pod identity set, and it wins over AWS_DEFAULT_REGION there, as here.
    region = settings.region or os.environ.get("AWS_REGION", "")
    if region:
        kwargs["region_name"] = region
    if settings.access_key_id:
        kwargs["aws_access_key_id"] = settings.access_key_id
        kwargs["aws_secret_access_key"] = settings.secret_access_key
    try:
        return boto3.session.Session().client("s3", **kwargs)
    except ValueError as error:  # AWS_ENDPOINT_URL=localhost:9000, an unknown region format...
        raise StoreError(f"cannot reach S3 with these settings: {error} (an endpoint URL starts with http:// "
                         "or https://)") from None


def error_code(error: Exception) -> str:
    """The store's error code of a ``ClientError`` ("NoSuchKey", "403"...), "" for any other error."""
    return str(error.response.get("Error", {}).get("Code", "")) if isinstance(error, ClientError) else ""


def check(url: str, settings: S3Settings) -> int:
    """Size of the object; a missing bucket or key or bad credentials is a one-line UserError."""
    bucket, key = split_url(url)
    try:
        return int(client(settings).head_object(Bucket=bucket, Key=key)["ContentLength"])
    except ClientError as error:
        code = error_code(error)
        if code in ("404", "NoSuchKey", "NoSuchBucket"):
            code = "NoSuchKey" if _bucket_exists(bucket, settings) else "NoSuchBucket"
        elif code == "403":  # a HEAD answer has no body: a 1-byte GET says which credential is wrong
            code = _get_error_code(bucket, key, settings) or code
        raise UserError(f"cannot read {url}: {REASONS.get(code, code or 'error')}") from None
    except BotoCoreError as error:
        raise UserError(f"cannot read {url}: {fatal_reason(error) or error}") from None


def read_small(url: str, settings: S3Settings) -> bytes | None:
    """A small object's bytes (a ``sizes.json``), None when it is absent or cannot be read."""
    bucket, key = split_url(url)
    try:
        return client(settings).get_object(Bucket=bucket, Key=key)["Body"].read()
    except (ClientError, BotoCoreError):
        return None


REASONS = {
    "NoSuchBucket": "no such bucket",
    "NoSuchKey": "no such key",
    "InvalidAccessKeyId": "the store does not know this access key id (check the credentials)",
    "SignatureDoesNotMatch": "the secret access key does not match the access key id (check the credentials)",
    "AccessDenied": "access denied (check the credentials and the bucket policy)",
    "403": "access denied (check the credentials)",
    "404": "not found",
    # boto3 refreshes the credentials it can refresh (instance roles, web identity) before they
    # expire; a token that has expired anyway was given statically, and no retry renews it
    **dict.fromkeys(("ExpiredToken", "ExpiredTokenException"),
                    "the session token has expired (renew AWS_SESSION_TOKEN or the credentials)"),
    "InvalidToken": "the store rejects the session token (check AWS_SESSION_TOKEN)",
    **dict.fromkeys(("PreconditionFailed", "412"),
                    "the object changed while it was being read (it was overwritten mid-shard)"),
}
_FATAL_CODES = {*REASONS, "InvalidBucketName"}  # what no retry changes
# 4xx answers that a later try can pass (botocore's standard retry mode's transient and throttling
# codes): S3 answers a request it gave up waiting on with 400 RequestTimeout, throttling with 400s too.
# Every other 4xx (InvalidObjectState, AllAccessDisabled, InvalidArgument ...) is the same next time.
_RETRY_CODES = {
    "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete", "Throttling", "ThrottlingException",
    "ThrottledException", "RequestThrottledException", "TooManyRequestsException", "RequestThrottled",
    "ProvisionedThroughputExceededException", "TransactionInProgressException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "LimitExceededException", "SlowDown", "EC2ThrottledException",
    # 4xx answers that a later try can pass: a conflicting operation that S3 asks to retry, bytes
    # damaged or cut in transit, and an identity provider that failed to answer a credentials refresh
    "OperationAborted", "BadDigest", "IncompleteBody", "XAmzContentSHA256Mismatch", "IDPCommunicationError",
}
_RETRY_STATUSES = (408, 429)  # Request Timeout, Too Many Requests
_MOVED = 301  # PermanentRedirect: the bucket answers at another endpoint or region, every time
NO_CREDENTIALS = ("no credentials found (set data.s3_access_key_id and data.s3_secret_access_key, or "
                  "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")


def fatal_reason(error: Exception) -> str:
    """Why no retry can help, in words; "" for a failure worth retrying (a reset, a timeout, a 5xx)."""
    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return NO_CREDENTIALS if isinstance(error, NoCredentialsError) else f"{error} (check the credentials)"
    code = error_code(error)
    if code in _FATAL_CODES:
        return REASONS.get(code, code)
    status = _status(error)
    refused = status == _MOVED or 400 <= status < 500 and status not in _RETRY_STATUSES
    return _refusal(error, code, status) if refused and code not in _RETRY_CODES else ""


def _status(error: Exception) -> int:
    """The HTTP status of a ``ClientError``'s answer, 0 for any other error."""
    if not isinstance(error, ClientError):
        return 0
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _refusal(error: ClientError, code: str, status: int) -> str:
    """A refusal in one line: its code, status and the store's message (which says what to do)."""
    named = f"{code} (HTTP {status})" if code and code != str(status) else f"HTTP {status}"
    message = " ".join(str(error.response.get("Error", {}).get("Message") or "").split())[:200]
    return f"the store refused the request: {named}{f': {message}' if message and message != code else ''}"


def _get_error_code(bucket: str, key: str, settings: S3Settings) -> str:
    try:
        client(settings).get_object(Bucket=bucket, Key=key, Range="bytes=0-0")
    except ClientError as error:
        return error_code(error)
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
        self.etag = ""
        self.body = None

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        """GET the object from ``position`` on. A resumed read asks for that version of the object
        (``If-Match`` its ETag) and checks that the answer starts where it asked: a store or proxy
        that ignores ``Range`` sends the whole object, whose first ``position`` bytes are skipped."""
        extra = {"Range": f"bytes={self.position}-"} if self.position else {}
        if self.position and self.etag:
            extra["IfMatch"] = self.etag
        response = client(self.settings).get_object(Bucket=self.bucket, Key=self.key, **extra)
        body, length = response["Body"], int(response["ContentLength"])
        if self.size is None:
            self.size, self.etag = length, str(response.get("ETag", ""))
        if self.position:
            answered = response.get("ContentRange", "")
            if not answered and length == self.size:
                _skip(body, self.position)
            elif answered.partition(" ")[2] != f"{self.position}-{self.size - 1}/{self.size}":
                body.close()
                raise StoreError(f"cannot read {self.url}: asked for bytes {self.position}-{self.size - 1} of "
                                 f"{self.size}, the store answered {answered or f'{length} bytes'}")
        self.body = body

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
            except UserError:
                raise
            except Exception as error:  # noqa: BLE001 - every transport failure looks different
                reason = fatal_reason(error)
                if reason:
                    raise StoreError(f"cannot read {self.url}: {reason}") from None
                if time.monotonic() > deadline:
                    raise StoreError(f"cannot read {self.url}: no answer from the store for "
                                     f"{self.settings.retry_seconds:g} s ({type(error).__name__}: {error})") from None
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


def _skip(body, count: int) -> None:
    """Read and drop the first ``count`` bytes of a streaming body."""
    while count:
        chunk = body.read(min(count, 1 << 20))
        if not chunk:
            raise ConnectionError(f"the body ended {count} bytes before the resume point")
        count -= len(chunk)


def open_url(url: str, settings: S3Settings) -> io.BufferedReader:
    return io.BufferedReader(S3Reader(url, settings), buffer_size=1 << 20)
