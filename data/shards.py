"""Shard lists: brace expansion, existence checks, sample counts, and opening a shard's bytes."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from braceexpand import braceexpand

from data import s3
from training.errors import UserError


def split_sources(spec: str) -> list[str]:
    """``::`` separates several shard lists (sources), as in open_clip's ``--train-data``."""
    return [p.strip() for p in spec.split("::") if p.strip()]


def expand_shards(spec: str) -> list[str]:
    """``a/{000..009}.tar::s3://b/x-{0..3}.tar`` -> the list of shard URLs.

    Local shards are checked to exist and be non-empty here; S3 shards by ``check_remote``.
    """
    urls: list[str] = []
    for part in split_sources(spec):
        try:
            urls.extend(braceexpand(part))
        except ValueError as error:
            raise UserError(f"bad shard pattern '{part}': {error}") from None
    if not urls:
        raise UserError(f"no shards given (shard list '{spec}' is empty)")
    local = [u for u in urls if not s3.is_s3(u)]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"shard not found: {missing[0]}{more}")
    empty = [u for u in local if Path(u).stat().st_size == 0]
    if empty:
        raise UserError(f"shard is empty: {empty[0]}")
    return urls


def check_remote(urls: list[str], settings: s3.S3Settings) -> None:
    """Reach the store once (the first S3 shard) so a missing bucket or bad credentials fail early."""
    remote = [u for u in urls if s3.is_s3(u)]
    if remote and s3.check(remote[0], settings) == 0:
        raise UserError(f"shard is empty: {remote[0]}")


def open_shard(url: str, settings: s3.S3Settings | None = None) -> dict:
    """The source record webdataset's tar expander reads: ``{"url", "stream"}``."""
    if s3.is_s3(url):
        return {"url": url, "stream": s3.open_url(url, settings or s3.S3Settings())}
    return {"url": url, "stream": open(url, "rb")}


def count_samples(urls: list[str]) -> int:
    """Samples in the shards: from ``sizes.json`` beside them when it lists them all, else by reading."""
    total = 0
    sizes_cache: dict[Path, dict] = {}
    for url in urls:
        if s3.is_s3(url):
            continue  # counted by sizes.json only where it is local; the count is informational
        path = Path(url)
        sizes_file = path.parent / "sizes.json"
        if sizes_file not in sizes_cache:
            sizes_cache[sizes_file] = json.loads(sizes_file.read_text()) if sizes_file.is_file() else {}
        if path.name in sizes_cache[sizes_file]:
            total += int(sizes_cache[sizes_file][path.name])
        else:
            total += _count_in_tar(path)
    return total


def _count_in_tar(path: Path) -> int:
    keys = set()
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if member.isreg():
                    keys.add(member.name.rsplit("/", 1)[-1].split(".", 1)[0])
    except (tarfile.TarError, EOFError, OSError):
        pass  # a truncated shard counts what it has; the loader skips the rest
    return len(keys)
