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
rows, so shards can be written in any order, and a rerun after an interruption skips every shard
whose stats file exists (written after the shard, each atomically) and yields identical output.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PIL import Image, ImageOps

from data import s3
from data.files import add_tar_member, atomic_write
from training.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


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
        caption = sidecar.read_text(encoding="utf-8", errors="replace").strip() if sidecar.is_file() else None
        rows.append(Row(str(image), caption, (("filepath", str(image.relative_to(folder))),)))
    return rows


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
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=separator)
            records, columns = list(reader), list(reader.fieldnames or [])
    missing = [k for k in (image_key, caption_key) if k not in columns]
    if missing:
        raise UserError(f"{path} has no column {' or '.join(map(repr, missing))} (columns: {', '.join(columns)}); "
                        f"choose them with --csv-img-key/--csv-caption-key (and --csv-separator)")
    rows = []
    for record in records:
        image, caption = record[image_key], record[caption_key]
        image_path = Path(str(image)) if image is not None else Path("")
        if image is not None and not image_path.is_absolute() and not image_path.exists():
            image_path = path.parent / image_path
        extra = tuple((k, v) for k, v in record.items() if k not in (image_key, caption_key))
        rows.append(Row(str(image_path), None if caption is None else str(caption).strip(),
                        (("filepath", str(image)), *extra)))
    return rows


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
        oriented = image.getexif().get(0x0112, 1) == 1  # EXIF orientation: pixels stored upright
        too_big = bool(options.max_size) and max(original) > options.max_size
        if image.format == "JPEG" and image.mode in ("RGB", "L") and oriented and not too_big:
            image.load()  # a truncated or corrupt JPEG fails here, not in the training loader
            return data, {"width": original[0], "height": original[1],
                          "original_width": original[0], "original_height": original[1]}
        if too_big:  # draft decode (DCT scaling) to >= 2x the target, then a good resample
            image.thumbnail((options.max_size, options.max_size), Image.Resampling.LANCZOS)
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
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


# ---- output ---------------------------------------------------------------------------------------

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
            return
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            s3.client(self.settings).head_bucket(Bucket=self.bucket)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code == "403":  # a HEAD answer has no body: a listing says which credential is wrong
                try:
                    s3.client(self.settings).list_objects_v2(Bucket=self.bucket, MaxKeys=1)
                except ClientError as detailed:
                    code = str(detailed.response.get("Error", {}).get("Code", "")) or code
            reason = s3.REASONS.get("NoSuchBucket" if code == "404" else code, code or "error")
            raise UserError(f"cannot write {self.target}: {reason}") from None
        except BotoCoreError as error:
            raise UserError(f"cannot write {self.target}: {error}") from None

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def get(self, name: str) -> bytes | None:
        if not self.remote:
            path = Path(self.target) / name
            return path.read_bytes() if path.is_file() else None
        from botocore.exceptions import ClientError

        try:
            return s3.client(self.settings).get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except ClientError as error:
            if str(error.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey"):
                return None
            raise

    def exists(self, name: str) -> bool:
        if not self.remote:
            return (Path(self.target) / name).is_file()
        from botocore.exceptions import ClientError

        try:
            s3.client(self.settings).head_object(Bucket=self.bucket, Key=self._key(name))
            return True
        except ClientError as error:
            if str(error.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchKey"):
                return False
            raise

    def put(self, name: str, data: bytes) -> None:
        if self.remote:
            s3.client(self.settings).put_object(Bucket=self.bucket, Key=self._key(name), Body=data)
            return
        atomic_write(Path(self.target) / name, data)


# ---- the whole job --------------------------------------------------------------------------------

def _plan(rows: list[Row], per_shard: int) -> tuple[list[list[Row]], tuple[int, int]]:
    chunks = [rows[i:i + per_shard] for i in range(0, len(rows), per_shard)]
    return chunks, (max(5, len(str(len(chunks) - 1))), len(str(per_shard - 1)))


def _write_one(job: tuple, progress: Callable[[int], None] | None = None) -> tuple[str, dict]:
    """Build shard ``index`` and store it, then its stats (whose presence marks it complete)."""
    chunk, index, digits, options, output = job
    data, stats = shard_bytes(chunk, index, digits, options, progress)
    name = f"{index:0{digits[0]}d}"
    output.put(f"{name}.tar", data)
    output.put(f"{name}_stats.json", json.dumps(stats, indent=2).encode())
    return name, stats


def write_shards(rows: list[Row], out: str, options: WriteOptions = WriteOptions(), *,
                 settings: s3.S3Settings = s3.S3Settings(), workers: int = 1,
                 progress: Callable[[int], None] | None = None) -> dict:
    """Write ``rows`` as shards under ``out``; shards already complete there are kept as they are.

    Args:
        rows: The samples, in order (see ``input_rows``).
        out: Local folder or ``s3://bucket/prefix``.
        options: Shard size and image re-encoding.
        settings: Endpoint and credentials when ``out`` is on S3.
        workers: Processes building shards in parallel (1: in this process).
        progress: Called with a number of input rows done (e.g. ``tqdm.update``).

    Returns:
        The totals also written to ``stats.json``, plus ``resumed``: shards found complete.
    """
    if options.samples_per_shard < 1:
        raise UserError(f"samples per shard must be >= 1, got {options.samples_per_shard}")
    if not rows:
        raise UserError("no input rows")
    output = Output(out, settings)
    output.check()
    chunks, digits = _plan(rows, options.samples_per_shard)
    done: dict[str, dict] = {}
    todo = []
    for index, chunk in enumerate(chunks):
        name = f"{index:0{digits[0]}d}"
        saved = output.get(f"{name}_stats.json")
        if saved is not None and output.exists(f"{name}.tar"):
            done[name] = json.loads(saved)
            if progress:
                progress(len(chunk))
        else:
            todo.append((chunk, index, digits, options, output))
    resumed = len(done)
    if workers > 1 and len(todo) > 1:
        # boto3 clients do not survive a fork: each worker process makes its own
        with ProcessPoolExecutor(workers, initializer=s3.client.cache_clear) as pool:
            for (name, stats), job in zip(pool.map(_write_one, todo), todo):
                done[name] = stats
                if progress:
                    progress(len(job[0]))
    else:
        for job in todo:
            name, stats = _write_one(job, progress)
            done[name] = stats
    ordered = sorted(done.items())
    sizes = {f"{name}.tar": stats["successes"] for name, stats in ordered}
    failures: Counter = Counter()
    for _, stats in ordered:
        failures.update(stats["failures"])
    totals = {"shards": len(ordered), "count": sum(s["count"] for _, s in ordered),
              "successes": sum(sizes.values()), "failed": sum(failures.values()),
              "failures": dict(sorted(failures.items()))}
    output.put("sizes.json", json.dumps(sizes, indent=2).encode())
    output.put("stats.json", json.dumps(totals, indent=2).encode())
    return {**totals, "resumed": resumed}
