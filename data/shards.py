"""Shard lists: brace expansion, existence checks, sample counts, and opening a shard's bytes."""

from __future__ import annotations

import glob
import itertools
import json
import math
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from braceexpand import braceexpand

from data import s3
from training.errors import UserError

_CHECK_THREADS = 16  # concurrent HEADs: enough to check thousands of shards in seconds
MAX_SHARDS = 5_000_000  # DataComp's 12.8B samples are 1.3M shards of 10,000
_INT_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?\}")
_NUMBERED = re.compile(r"^(.*?)(\d+)(\.tar)$")
_GLOB_CHARS = "*?["


def split_sources(spec: str) -> list[str]:
    """``::`` separates several shard lists (sources), as in open_clip's ``--train-data``."""
    return [p.strip() for p in spec.split("::") if p.strip()]


def expand_shards(spec: str) -> list[str]:
    """``a/{000..009}.tar::s3://b/x-{0..3}.tar`` -> the list of shard URLs (``~`` expanded in local paths).

    Local shards are checked to exist and be non-empty here; S3 shards by ``check_remote``.
    """
    urls: list[str] = []
    for part in split_sources(spec):
        # braceexpand materialises ranges, and products nested in a brace list, before its outer lazy
        # product: refuse a pattern whose ranges multiply past the limit before expanding it (an upper
        # bound: ranges that are alternatives add rather than multiply).
        bound = math.prod(abs(int(end) - int(start)) // max(abs(int(step or 1)), 1) + 1
                          for start, end, step in _INT_RANGE.findall(part))
        if bound > MAX_SHARDS:
            raise UserError(f"shard pattern '{part}' names more than {MAX_SHARDS:,} shards; check its ranges")
        try:
            names = itertools.islice(braceexpand(part), MAX_SHARDS + 1 - len(urls))
            urls.extend(u if s3.is_s3(u) else os.path.expanduser(u) for u in names)
        except ValueError as error:
            raise UserError(f"bad shard pattern '{part}': {error}") from None
        if len(urls) > MAX_SHARDS:  # a mistyped range would otherwise expand until memory runs out
            raise UserError(f"shard list '{spec}' names more than {MAX_SHARDS:,} shards; check its ranges")
    if not urls:
        raise UserError(f"no shards given (shard list '{spec}' is empty)")
    local = [u for u in urls if not s3.is_s3(u)]
    missing = [u for u in local if not Path(u).is_file()]
    if missing:
        raise UserError(_not_found(missing))
    empty = [u for u in local if Path(u).stat().st_size == 0]
    if empty:
        raise UserError(f"shard is empty: {empty[0]}")
    return urls


def _not_found(missing: list[str]) -> str:
    """Why the first of the missing local shards is not one: a folder, an unexpanded glob, or absent."""
    first = missing[0]
    if Path(first).is_dir():
        return (f"{first} is a folder, not a shard; name its shards with a brace pattern, "
                f"e.g. {_brace_pattern(sorted(glob.glob(os.path.join(glob.escape(first), '*.tar'))), first)}")
    if any(char in first for char in _GLOB_CHARS):
        return (f"{first}: globs (*, ?, [...]) in shard patterns are not expanded; name the shards with a "
                f"brace pattern, e.g. {_brace_pattern(sorted(glob.glob(first)), os.path.dirname(first) or '.')}")
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    return f"shard not found: {first}{more}"


def _brace_pattern(paths: list[str], folder: str) -> str:
    """A brace pattern naming exactly ``paths`` when they are one run of numbered .tar files in one folder
    (``shard-00000.tar`` ... ``shard-00009.tar`` -> ``shard-{00000..00009}.tar``), else the pattern's form."""
    parts = [_NUMBERED.match(os.path.basename(p)) for p in paths]
    if paths and all(parts) and len({os.path.dirname(p) for p in paths}) == 1:
        digits = [m.group(2) for m in parts]
        numbers = sorted(map(int, digits))
        padded = len(set(map(len, digits))) == 1  # shard-00007.tar: the range keeps the width
        unpadded = all(d == str(int(d)) for d in digits)  # shard-7.tar ... shard-12.tar
        if (len({m.group(1) for m in parts}) == 1 and (padded or unpadded)
                and numbers == list(range(numbers[0], numbers[0] + len(numbers)))):
            width = len(digits[0]) if padded else 0
            first, last = (str(n).zfill(width) for n in (numbers[0], numbers[-1]))
            return os.path.join(os.path.dirname(paths[0]), f"{parts[0].group(1)}{{{first}..{last}}}.tar")
    clean = not any(char in folder for char in _GLOB_CHARS)
    return os.path.join(folder if clean else "", "shard-{00000..00009}.tar")


def check_remote(urls: list[str], settings: s3.S3Settings) -> None:
    """Every S3 shard exists and is non-empty, so a missing one fails before training, not as a gap in it.

    The first is checked alone (a missing bucket or bad credentials is then one line, not one per
    shard), the rest with concurrent HEADs.
    """
    remote = list(dict.fromkeys(u for u in urls if s3.is_s3(u)))
    if not remote:
        return
    first, rest = remote[0], remote[1:]
    if not s3.check(first, settings):
        raise UserError(f"shard is empty: {first}")
    if not rest:
        return

    def problem(url: str) -> str | None:
        try:
            return None if s3.check(url, settings) else f"shard is empty: {url}"
        except UserError as error:
            return str(error)

    with ThreadPoolExecutor(min(_CHECK_THREADS, len(rest))) as pool:
        problems = [p for p in pool.map(problem, rest) if p]
    if problems:
        more = len(problems) - 1
        more = f" (and {more} more shard{'s' if more > 1 else ''})" if more else ""
        raise UserError(f"{problems[0]}{more}")


def open_shard(url: str, settings: s3.S3Settings | None = None) -> dict:
    """The source record webdataset's tar expander reads: ``{"url", "stream"}``.

    A local shard that cannot be opened (deleted, unmounted, unreadable since the run started) is a
    ``StoreError``, as a missing S3 key is: one line naming it, never a skipped shard.
    """
    if s3.is_s3(url):
        return {"url": url, "stream": s3.open_url(url, settings or s3.S3Settings())}
    try:
        return {"url": url, "stream": open(url, "rb")}
    except OSError as error:
        reason = (error.strerror or type(error).__name__).lower()
        raise s3.StoreError(f"cannot read {url}: {reason}") from None


def count_samples(urls: list[str], settings: s3.S3Settings | None = None) -> int | None:
    """Samples in the shards, None when a shard's count is unknown.

    Each shard is counted from the ``sizes.json`` beside it (local, or on S3 when ``settings`` are
    given); a local shard it does not list, from its ``{shard}_stats.json`` (img2dataset's
    ``successes``), else by reading its headers. An S3 shard missing from ``sizes.json`` is unknown:
    streaming it just to count is not worth it.
    """
    total = 0
    sizes: dict[str, dict[str, int]] = {}
    for url in urls:
        folder, _, name = url.rpartition("/")
        if folder not in sizes:
            sizes[folder] = _sizes_beside(url, settings)
        if name in sizes[folder]:
            total += sizes[folder][name]
        elif s3.is_s3(url):
            return None
        else:
            successes = _successes(Path(url))
            total += _count_in_tar(Path(url)) if successes is None else successes
    return total


def check_sizes(urls: list[str]) -> None:
    """A local ``sizes.json`` beside the shards that is not a name -> count object is a one-line error
    (cheap: for the checks that run before training starts)."""
    for url in {str(Path(u).parent): u for u in urls if not s3.is_s3(u)}.values():
        _sizes_beside(url, None)


def _sizes_beside(url: str, settings: s3.S3Settings | None) -> dict[str, int]:
    """The ``sizes.json`` in the shard's folder ({} when there is none, or it is on S3 out of reach)."""
    if s3.is_s3(url):
        where = f"{url.rpartition('/')[0]}/sizes.json"
        text = None if settings is None else s3.read_small(where, settings)
    else:
        where = str(Path(url).with_name("sizes.json"))
        text = Path(where).read_bytes() if Path(where).is_file() else None
    if text is None:
        return {}
    try:
        sizes = json.loads(text)
        if not isinstance(sizes, dict):
            raise ValueError("not an object of shard name -> sample count")
        return {str(name): int(count) for name, count in sizes.items()}
    except (ValueError, TypeError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{where} is not a valid sizes.json ({error}); fix or delete it (the shards are then "
                        "counted from their own files)") from None


def _successes(path: Path) -> int | None:
    """img2dataset's (and ``tandem data shards``') per-shard ``{shard}_stats.json`` count, if readable."""
    stats = path.with_name(f"{path.name.rsplit('.', 1)[0]}_stats.json")
    try:
        successes = json.loads(stats.read_bytes()).get("successes")
    except (OSError, ValueError, AttributeError):
        return None
    return successes if isinstance(successes, int) and successes >= 0 else None


def _count_in_tar(path: Path) -> int:
    """Samples (distinct keys) in a tar, from its headers. An uncompressed tar is opened seekable
    (``r:*`` finds no compression), so the members' data are skipped by seeking, not read: a stream
    (``r|*``) would read every byte of the shard. A compressed one is decompressed as it goes."""
    keys = set()
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isreg():
                    keys.add(member.name.rsplit("/", 1)[-1].split(".", 1)[0])
    except (tarfile.TarError, EOFError, OSError):
        pass  # a truncated shard counts what it has; the loader skips the rest
    return len(keys)
