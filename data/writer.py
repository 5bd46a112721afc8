"""Write image-caption pairs as WebDataset shards in img2dataset's layout.

Input: a folder of images with caption sidecars (``a.jpg`` + ``a.txt``), or a table (CSV, TSV or
parquet) with an image-path and a caption column, open_clip's CSV format. Output, in a local folder
or under ``s3://bucket/prefix``::

    00000.tar          {key}.jpg / {key}.txt / {key}.json per sample
    00000_stats.json   what happened to each input row of the shard (img2dataset's per-shard stats)
    sizes.json         shard name -> samples, which open_clip reads for the dataset size
    stats.json         the totals

Shard ``i`` holds the input rows ``[i * n, (i + 1) * n)`` minus those that could not be used (an
unreadable image, a missing caption), which are counted by reason. Its bytes depend only on those
rows and the options, so shards can be written in any order, and a rerun after an interruption skips
every shard whose stats file (written after the shard, each atomically) holds the fingerprint of the
same rows and options, and yields identical output. A rerun with other rows or options rebuilds the
shards whose fingerprint differs and removes the shards beyond its own count, so the output never
mixes two runs.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from PIL import Image, ImageOps

from data import s3
from data.files import add_tar_member
from data.modes import ORIENTATION, to_8bit
from data.output import Output
from training.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_FORMAT = 1  # part of every shard's fingerprint: bump it when the same rows and options give other bytes
_SHARD_FILE = re.compile(r"^(\d+)(\.tar|_stats\.json)$")


@dataclass(frozen=True)
class Row:
    """One input sample: where its image is, its caption (None: missing) and extra metadata."""

    path: str
    caption: str | None
    extra: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class WriteOptions:
    samples_per_shard: int = 10000
    max_size: int = 0
    """Images whose longer side exceeds this are downscaled to it (0: keep the size)."""
    quality: int = 95
    """JPEG quality of re-encoded images (JPEGs that need no change are stored byte for byte)."""


# ---- input ----------------------------------------------------------------------------------------

def folder_rows(folder: str | Path) -> list[Row]:
    """Every image under ``folder`` (sorted by relative path); the caption is the sibling ``.txt``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"input folder not found: {folder}")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    rows = []
    for image in images:
        sidecar = image.with_suffix(".txt")
        caption = _read_caption(sidecar) if sidecar.is_file() else None
        rows.append(Row(str(image), caption, (("filepath", str(image.relative_to(folder))),)))
    return rows


def _read_caption(sidecar: Path) -> str:
    """A ``.txt`` caption as UTF-8 (a BOM dropped), as tables are read; other bytes are one line."""
    try:
        return sidecar.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as error:
        raise UserError(f"{sidecar} is not UTF-8 text (byte {error.start}); re-encode the caption") from None


def _value(value):
    """A table cell for the sample's ``.json``: bytes as UTF-8 text, NaN and infinities as null.

    Parquet list and struct cells arrive as lists and dicts; their items are converted the same way,
    since ``json.dumps`` would write a nested NaN as the non-JSON token ``NaN``.
    """
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (list, tuple)):
        return [_value(item) for item in value]
    if isinstance(value, dict):
        return {key: _value(item) for key, item in value.items()}
    return value


def table_rows(path: str | Path, image_key: str = "filepath", caption_key: str = "caption",
               separator: str | None = None) -> list[Row]:
    """Rows of a CSV/TSV (``separator`` None: tab for ``.tsv``, else comma) or parquet file.

    Relative image paths are taken from the working directory, as open_clip does, else from the
    table's folder. The other columns go into each sample's ``.json``.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input table not found: {path}")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        try:
            records = pq.read_table(path).to_pylist()
        except Exception as error:  # noqa: BLE001 - pyarrow raises several unrelated types
            raise UserError(f"cannot read {path} as parquet ({error})") from None
        columns = list(records[0]) if records else pq.read_schema(path).names
    else:
        if separator is None:
            separator = "\t" if path.suffix.lower() == ".tsv" else ","
        with path.open("rb") as f:
            records, columns = _csv_records(f, path, separator)
    missing = [k for k in (image_key, caption_key) if k not in columns]
    if missing:
        raise UserError(f"{path} has no column {' or '.join(map(repr, missing))} (columns: {', '.join(columns)}); "
                        f"choose them with --csv-img-key/--csv-caption-key (and --csv-separator)")
    rows = []
    for record in records:
        record = {k: _value(v) for k, v in record.items()}
        image, caption = record[image_key], record[caption_key]
        image_path = Path(str(image)) if image is not None else Path("")
        if image is not None and not image_path.is_absolute() and not image_path.exists():
            image_path = path.parent / image_path
        extra = tuple((k, v) for k, v in record.items() if k not in (image_key, caption_key))
        rows.append(Row(str(image_path), None if caption is None else str(caption).strip(),
                        (("filepath", str(image)), *extra)))
    return rows


def _csv_records(f: BinaryIO, path: Path, separator: str) -> tuple[list[dict], list[str]]:
    """The records and columns of a UTF-8 table (a BOM is allowed); its mistakes name their line."""
    separator = {"\\t": "\t"}.get(separator, separator)  # --csv-separator '\t' arrives as two chars
    if len(separator) != 1 or separator in "\"\r\n":
        raise UserError(f"--csv-separator must be one character other than a quote or a newline ('\\t' for a "
                        f"tab), got {separator!r}")
    reader = csv.DictReader(_utf8_lines(f, path), delimiter=separator)
    records = []
    try:
        for record in reader:
            extra = record.pop(None, None)  # fields beyond the header's columns
            if extra and any(field.strip() for field in extra):
                raise UserError(f"{path} line {reader.line_num} has {len(reader.fieldnames) + len(extra)} fields "
                                f"for {len(reader.fieldnames)} columns; quote fields that contain {separator!r}")
            records.append(record)
    except csv.Error as error:
        raise UserError(f"{path} line {reader.line_num}: {error}") from None
    return records, list(reader.fieldnames or [])


def _utf8_lines(f: BinaryIO, path: Path) -> Iterator[str]:
    """The file's lines as text, decoded one by one so that a bad byte is reported with its line."""
    for number, line in enumerate(f, 1):
        try:
            yield line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path} line {number} is not UTF-8 text; save the table as UTF-8") from None


def input_rows(source: str, image_key: str = "filepath", caption_key: str = "caption",
               separator: str | None = None) -> list[Row]:
    """A folder, or a ``.csv``/``.tsv``/``.parquet`` table."""
    if Path(source).is_dir():
        return folder_rows(source)
    if Path(source).suffix.lower() in (".csv", ".tsv", ".parquet"):
        return table_rows(source, image_key, caption_key, separator)
    raise UserError(f"input must be a folder or a .csv/.tsv/.parquet file: {source}")


# ---- one sample -----------------------------------------------------------------------------------

def encode_image(data: bytes, options: WriteOptions) -> tuple[bytes, dict]:
    """JPEG bytes (the input's own when they need no change) and the sizes for the ``.json``.

    Raises ``ValueError`` when the image cannot be decoded.
    """
    try:
        image = Image.open(io.BytesIO(data))
        original = image.size
        oriented = image.getexif().get(ORIENTATION, 1) == 1  # pixels stored upright
        too_big = bool(options.max_size) and max(original) > options.max_size
        if image.format == "JPEG" and image.mode in ("RGB", "L") and oriented and not too_big:
            image.load()  # a truncated or corrupt JPEG fails here, not in the training loader
            return data, {"width": original[0], "height": original[1],
                          "original_width": original[0], "original_height": original[1]}
        image = to_8bit(image)  # a 16-bit greyscale PNG would otherwise turn white
        if too_big:  # draft decode (DCT scaling) to >= 2x the target, then a good resample
            image.thumbnail((options.max_size, options.max_size), Image.Resampling.LANCZOS)
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:  # tRNS: RGB, L and P too
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        image = image.convert("RGB")
        out = io.BytesIO()
        image.save(out, format="JPEG", quality=options.quality)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        # reasons are counted: no object addresses or byte counts that would make each one unique
        detail = re.sub(r"\s*(<[^>]*>|\([^)]*\d[^)]*\))", "", str(error))
        raise ValueError(f"undecodable image ({type(error).__name__}: {detail})") from None
    return out.getvalue(), {"width": image.width, "height": image.height,
                            "original_width": original[0], "original_height": original[1]}


def shard_bytes(rows: list[Row], shard: int, key_digits: tuple[int, int], options: WriteOptions,
                progress: Callable[[int], None] | None = None) -> tuple[bytes, dict]:
    """One shard's tar and its stats; keys are ``{shard}{index in shard}`` as img2dataset writes them."""
    shard_digits, index_digits = key_digits
    reasons: Counter = Counter()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for index, row in enumerate(rows):
            key = f"{shard:0{shard_digits}d}{index:0{index_digits}d}"
            try:
                if not row.caption:
                    raise ValueError("missing caption")
                try:
                    raw = Path(row.path).read_bytes()
                except OSError as error:
                    raise ValueError(f"cannot read image ({error.strerror or error})") from None
                jpeg, sizes = encode_image(raw, options)
            except ValueError as error:
                reasons[str(error)] += 1
            else:
                meta = {**dict(row.extra), "key": key, "caption": row.caption, "status": "success", **sizes}
                add_tar_member(tar, f"{key}.jpg", jpeg)
                add_tar_member(tar, f"{key}.txt", row.caption.encode("utf-8"))
                add_tar_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True, default=str).encode("utf-8"))
            if progress:
                progress(1)
    skipped = sum(reasons.values())
    stats = {"count": len(rows), "successes": len(rows) - skipped, "failed": skipped,
             "failures": dict(sorted(reasons.items()))}
    return buffer.getvalue(), stats


# ---- the whole job ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Job:
    """One shard to build: its rows, place and the fingerprint its stats file will carry."""

    chunk: list[Row]
    index: int
    digits: tuple[int, int]
    options: WriteOptions
    output: Output
    outdated_stats: bool = False
    """An earlier run's stats file is there: removed before the new tar is written."""

    @property
    def name(self) -> str:
        return f"{self.index:0{self.digits[0]}d}"

    @functools.cached_property
    def fingerprint(self) -> str:
        """What the shard's bytes depend on: the rows, their place, the options and this format. Image
        files are not read but checked as make and rsync check them, by size and modification time, so
        an image replaced under the same path rebuilds its shard."""
        rows = [(row.path, _file_version(row.path), row.caption, list(row.extra)) for row in self.chunk]
        described = [_FORMAT, self.index, list(self.digits), dataclasses.astuple(self.options), rows]
        return hashlib.sha256(json.dumps(described, default=str).encode()).hexdigest()


def _file_version(path: str) -> list[int] | None:
    """``[size, mtime in ns]`` of a file, None when it cannot be read (such a row is skipped anyway)."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return [status.st_size, status.st_mtime_ns]


def _plan(rows: list[Row], options: WriteOptions, output: Output) -> list[_Job]:
    per_shard = options.samples_per_shard
    chunks = [rows[i:i + per_shard] for i in range(0, len(rows), per_shard)]
    digits = (max(5, len(str(len(chunks) - 1))), len(str(per_shard - 1)))
    return [_Job(chunk, index, digits, options, output) for index, chunk in enumerate(chunks)]


def _write_one(job: _Job, progress: Callable[[int], None] | None = None) -> tuple[str, dict]:
    """Build the shard and store it, then its stats (whose fingerprint marks it complete)."""
    # The images' versions before they are read: one replaced meanwhile leaves a fingerprint that no
    # longer matches, so a rerun rebuilds the shard (taken after, it would match the new file).
    fingerprint = job.fingerprint
    data, stats = shard_bytes(job.chunk, job.index, job.digits, job.options, progress)
    stats["fingerprint"] = fingerprint
    if job.outdated_stats:
        # An earlier run's stats must not outlive its tar: a run stopped between the two writes below
        # would leave the old fingerprint beside the new tar, and a rerun of the old command keep it.
        job.output.remove(f"{job.name}_stats.json")
    job.output.put(f"{job.name}.tar", data)
    job.output.put(f"{job.name}_stats.json", json.dumps(stats, indent=2).encode())
    return job.name, stats


def _complete(job: _Job, present: set[str]) -> dict | None:
    """The stats of the shard already written from the same rows and options, else None."""
    if not {f"{job.name}.tar", f"{job.name}_stats.json"} <= present:
        return None
    saved = job.output.get(f"{job.name}_stats.json")
    try:
        stats = json.loads(saved) if saved is not None else None
    except ValueError:
        return None
    return stats if isinstance(stats, dict) and stats.get("fingerprint") == job.fingerprint else None


def _clear(output: Output, jobs: list[_Job], present: set[str], rebuilt: int) -> None:
    """Before any shard changes: drop the totals (rewritten at the end, so an interrupted rerun leaves
    none that describe other shards) and the shards of an earlier run beyond this run's count."""
    keep = {job.name for job in jobs}
    stale = sorted(n for n in present if (m := _SHARD_FILE.match(n)) and m.group(1) not in keep)
    for name in ("sizes.json", "stats.json", *stale):
        if name in present:
            output.remove(name)
    if rebuilt or stale:
        log.warning("%s held shards of other rows or options: %d rebuilt, %d files beyond this run's %d shards "
                    "removed", output.target, rebuilt, len(stale), len(jobs))


def _totals(done: dict[str, dict]) -> tuple[dict, dict]:
    """(sizes.json, stats.json) of the finished shards."""
    ordered = sorted(done.items())
    sizes = {f"{name}.tar": stats["successes"] for name, stats in ordered}
    failures: Counter = Counter()
    for _, stats in ordered:
        failures.update(stats["failures"])
    totals = {"shards": len(ordered), "count": sum(s["count"] for _, s in ordered),
              "successes": sum(sizes.values()), "failed": sum(failures.values()),
              "failures": dict(sorted(failures.items()))}
    return sizes, totals


def write_shards(rows: list[Row], out: str, options: WriteOptions = WriteOptions(), *,
                 settings: s3.S3Settings = s3.S3Settings(), workers: int = 1,
                 progress: Callable[[int], None] | None = None) -> dict:
    """Write ``rows`` as shards under ``out``; shards already complete there from the same rows and options
    are kept as they are, others rebuilt, and shards beyond this run's count removed.

    Args:
        rows: The samples, in order (see ``input_rows``).
        out: Local folder or ``s3://bucket/prefix``.
        options: Shard size and image re-encoding.
        settings: Endpoint and credentials when ``out`` is on S3.
        workers: Processes building shards in parallel (1: in this process).
        progress: Called with a number of input rows done (e.g. ``tqdm.update``).

    Returns:
        The totals also written to ``stats.json``, plus ``resumed``: shards found complete.

    Raises:
        UserError: Bad options, an unwritable target, or no row that gives a sample (then no shard is left).
    """
    if options.samples_per_shard < 1:
        raise UserError(f"samples per shard must be >= 1, got {options.samples_per_shard}")
    if not rows:
        raise UserError("no input rows")
    output = Output(out, settings)
    output.check()
    jobs = _plan(rows, options, output)
    present = set(output.names())
    done: dict[str, dict] = {}
    todo = []
    for job in jobs:
        stats = _complete(job, present)
        if stats is None:
            todo.append(dataclasses.replace(job, outdated_stats=f"{job.name}_stats.json" in present))
            continue
        done[job.name] = stats
        if progress:
            progress(len(job.chunk))
    resumed = len(done)
    _clear(output, jobs, present, rebuilt=sum(job.outdated_stats for job in todo))
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers) as pool:  # each process makes its own boto3 client (s3.client)
            for (name, stats), job in zip(pool.map(_write_one, todo), todo):
                done[name] = stats
                if progress:
                    progress(len(job.chunk))
    else:
        for job in todo:
            name, stats = _write_one(job, progress)
            done[name] = stats
    sizes, totals = _totals(done)
    if not totals["successes"]:
        for job in jobs:
            output.remove(f"{job.name}.tar")
            output.remove(f"{job.name}_stats.json")
        raise UserError(f"none of the {totals['count']} input rows gave a sample, so no shard was written: "
                        f"{json.dumps(totals['failures'])}")
    output.put("sizes.json", json.dumps(sizes, indent=2).encode())
    output.put("stats.json", json.dumps(totals, indent=2).encode())
    return {**totals, "resumed": resumed}
