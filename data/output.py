"""Where ``tandem data shards`` writes: a local folder or an S3 prefix, failing in one line naming the file."""

from __future__ import annotations

import os
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from data import s3
from data.files import atomic_write
from training.errors import UserError


class Output:
    """A local folder or an S3 prefix; every ``put`` is atomic (tmp + rename, or one PUT)."""

    def __init__(self, target: str, settings: s3.S3Settings):
        self.target, self.settings = target.rstrip("/"), settings
        self.remote = s3.is_s3(target)
        if self.remote:
            self.bucket, _, self.prefix = target[len("s3://"):].partition("/")
            self.prefix = self.prefix.strip("/")

    def check(self) -> None:
        """Fail early, in one line naming the target, when the folder or bucket cannot be written."""
        if not self.remote:
            try:
                Path(self.target).mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise UserError(f"cannot write {self.target}: {error.strerror or error}") from None
            if not os.access(self.target, os.W_OK | os.X_OK):
                raise UserError(f"cannot write {self.target}: permission denied")
            return
        try:
            s3.client(self.settings).head_bucket(Bucket=self.bucket)
        except ClientError as error:
            code = s3.error_code(error)
            if code == "403":  # a HEAD answer has no body: a listing says which credential is wrong
                try:
                    s3.client(self.settings).list_objects_v2(Bucket=self.bucket, MaxKeys=1)
                    return  # the bucket can be listed (some stores' policies refuse HEAD alone)
                except ClientError as detailed:
                    code = s3.error_code(detailed) or code
            reason = s3.REASONS.get("NoSuchBucket" if code == "404" else code, code or "error")
            raise UserError(f"cannot write {self.target}: {reason}") from None
        except BotoCoreError as error:
            reason = " ".join(str(s3.fatal_reason(error) or error).split())  # botocore's may span lines
            raise UserError(f"cannot write {self.target}: {reason}") from None

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _failed(self, verb: str, name: str, error: Exception) -> UserError:
        """One line naming the file: read-only credentials fail at the first PUT, not at ``check``."""
        if isinstance(error, OSError):
            reason = error.strerror or str(error)
        else:
            reason = s3.fatal_reason(error) or str(error)
        return UserError(f"cannot {verb} {self.target}/{name}: {reason}")

    def get(self, name: str) -> bytes | None:
        """The file's bytes, None when there is none."""
        try:
            if not self.remote:
                path = Path(self.target) / name
                return path.read_bytes() if path.is_file() else None
            return s3.client(self.settings).get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except ClientError as error:
            if s3.error_code(error) in ("404", "NoSuchKey"):
                return None
            raise self._failed("read", name, error) from None
        except (BotoCoreError, OSError) as error:
            raise self._failed("read", name, error) from None

    def put(self, name: str, data: bytes) -> None:
        try:
            if self.remote:
                s3.client(self.settings).put_object(Bucket=self.bucket, Key=self._key(name), Body=data)
            else:
                atomic_write(Path(self.target) / name, data)
        except (ClientError, BotoCoreError, OSError) as error:
            raise self._failed("write", name, error) from None

    def names(self) -> list[str]:
        """The files directly in the folder or under the prefix."""
        if not self.remote:
            return [p.name for p in Path(self.target).iterdir() if p.is_file()]
        prefix = f"{self.prefix}/" if self.prefix else ""
        try:
            pages = s3.client(self.settings).get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/")
            return [item["Key"][len(prefix):] for page in pages for item in page.get("Contents", [])]
        except (ClientError, BotoCoreError) as error:
            raise self._failed("list", "", error) from None

    def remove(self, name: str) -> None:
        try:
            if self.remote:
                s3.client(self.settings).delete_object(Bucket=self.bucket, Key=self._key(name))
            else:
                (Path(self.target) / name).unlink(missing_ok=True)
        except (ClientError, BotoCoreError, OSError) as error:
            raise self._failed("remove", name, error) from None
