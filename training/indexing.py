"""``tandem index``: embed every image of WebDataset shards into a FAISS index the server memory-maps.

Shape legend: n = items in a chunk, N = items in the index, D = embed dim.

The images stream through the evaluation loader (``data.pipeline``, ``train=False``: every sample
once, in shard order) and the model the server loads (``serving.engine.load_engine``, same eval
transform), so a served image's embedding equals its indexed one. Embeddings and metadata are written
in chunks to ``OUT/parts`` with a progress file holding the loader's cursor; running the same command
again after an interruption continues after the last finished chunk. When all chunks are there the
FAISS index and the metadata files are written (see ``serving/index.py`` for the layout) and the parts
are removed; ``index.json`` is written last, so its presence means the index is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from data.files import atomic_replace, atomic_write
from data.pipeline import StreamSpec, make_loader
from data.shards import count_samples, expand_shards
from serving.engine import check_model, load_engine
from training.model_config import EXPORT_WEIGHTS_FILE
from serving.index import INDEX_FILE, MANIFEST_FILE, META_FILE, OFFSETS_FILE
from training.errors import UserError

log = logging.getLogger(__name__)

PARTS = "parts"
PROGRESS = "progress.json"
KINDS = ("flat", "ivf", "hnsw")
IVF_TRAIN_PER_LIST = 256  # training points per IVF list (FAISS wants >= 39)


def _record(key: str, caption: str, meta: dict[str, Any]) -> dict[str, Any]:
    """A sample's metadata record; ``url`` only when the sample's json has a string there (it stays in meta)."""
    url = meta.get("url")
    return {"key": key, "caption": caption, "url": url if isinstance(url, str) else None, "meta": meta}


def _write_chunk(parts: Path, number: int, embeddings: list[np.ndarray], records: list[dict]) -> None:
    """One chunk's ``[n, D]`` embeddings and n metadata lines (the progress file is updated after)."""
    stem = parts / f"chunk-{number:05d}"
    atomic_replace(stem.with_suffix(".npy"), lambda tmp: _save_npy(tmp, np.concatenate(embeddings).astype(np.float32)))
    atomic_write(stem.with_suffix(".jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as out:  # np.save given a name would add ".npy" to one that lacks it
        np.save(out, array)


def _load_progress(parts: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The progress of an unfinished build of the same model and shards, or a fresh start."""
    path = parts / PROGRESS
    if not path.is_file():
        return {**identity, "chunks": 0, "cursor": 0, "count": 0}
    progress = json.loads(path.read_text())
    progress.setdefault("precision", "fp32")  # builds from before --precision
    if {k: progress.get(k) for k in identity} != identity:
        differs = ", ".join(k for k in identity if progress.get(k) != identity[k])
        raise UserError(f"{parts.parent} holds an unfinished index of other shards or another model (its {differs} "
                        "differ); use another --out or --overwrite")
    for stale in parts.glob("chunk-*"):  # a chunk written after the last progress update
        if int(stale.name[6:11]) >= progress["chunks"]:
            stale.unlink()
    return progress


def _embed_chunks(engine, urls: list[str], parts: Path, progress: dict[str, Any], batch_size: int,
                  chunk_size: int) -> dict[str, Any]:
    spec = StreamSpec(urls=urls, batch_size=batch_size, workers=1, train=False, cursors={0: progress["cursor"]})
    loader = make_loader(spec, engine.transform, engine.tokenizer, engine.image_size)
    total = count_samples(urls)
    bar = tqdm(total=total or None, initial=progress["cursor"], unit="img", desc="index", disable=None)
    embeddings: list[np.ndarray] = []
    records: list[dict] = []

    def flush(cursor: int) -> None:
        _write_chunk(parts, progress["chunks"], embeddings, records)
        progress.update(chunks=progress["chunks"] + 1, cursor=cursor, count=progress["count"] + len(records))
        atomic_write(parts / PROGRESS, json.dumps(progress).encode())
        log.info("chunk %d written (%d items so far)", progress["chunks"], progress["count"])
        embeddings.clear()
        records.clear()

    cursor = progress["cursor"]
    for batch in loader:
        embeddings.append(engine.encode_images(batch["image"]).numpy())
        records.extend(_record(k, c, m) for k, c, m in zip(batch["key"], batch["caption"], batch["meta"]))
        bar.update(batch["cursor"] - cursor)
        cursor = batch["cursor"]
        if len(records) >= chunk_size:
            flush(cursor)
    if records:
        flush(cursor)
    bar.close()
    return progress


def _make_index(kind: str, dim: int, count: int, nlist: int, hnsw_m: int) -> faiss.Index:
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "ivf":
        nlist = nlist or max(1, min(int(4 * math.sqrt(count)), count // 39))
        return faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    return faiss.index_factory(dim, f"HNSW{hnsw_m}", faiss.METRIC_INNER_PRODUCT)


def _training_sample(chunks: list[Path], count: int, size: int) -> np.ndarray:
    """``[min(size, N), D]`` random rows of all chunks, read chunk by chunk (never all N at once)."""
    rows = np.sort(np.random.default_rng(0).permutation(count)[:size])
    picked, start = [], 0
    for chunk in chunks:
        data = np.load(chunk.with_suffix(".npy"), mmap_mode="r")
        mine = rows[(rows >= start) & (rows < start + len(data))] - start
        picked.append(np.asarray(data[mine]))
        start += len(data)
    return np.ascontiguousarray(np.concatenate(picked), dtype=np.float32)


def _finish(out: Path, parts: Path, progress: dict[str, Any], kind: str, nlist: int, hnsw_m: int,
            model_cfg: dict | None) -> dict[str, Any]:
    """Parts -> ``index.faiss``, ``meta.jsonl``, ``meta.offsets.npy``, then ``index.json``."""
    chunks = [parts / f"chunk-{i:05d}" for i in range(progress["chunks"])]
    dim, count = progress["dim"], progress["count"]
    index = _make_index(kind, dim, count, nlist, hnsw_m)
    if not index.is_trained:
        if index.nlist > count:
            raise UserError(f"--nlist {index.nlist} is more than the {count} items to index")
        index.train(_training_sample(chunks, count, index.nlist * IVF_TRAIN_PER_LIST))
    offsets = [0]

    def add_chunks(tmp: Path) -> None:  # the index's vectors and the metadata file, chunk by chunk
        with open(tmp, "wb") as meta:
            for chunk in chunks:
                index.add(np.ascontiguousarray(np.load(chunk.with_suffix(".npy"))))
                for line in chunk.with_suffix(".jsonl").read_bytes().splitlines(keepends=True):
                    meta.write(line)
                    offsets.append(offsets[-1] + len(line))

    atomic_replace(out / META_FILE, add_chunks)
    np.save(out / OFFSETS_FILE, np.asarray(offsets, dtype=np.int64))
    atomic_replace(out / INDEX_FILE, lambda tmp: faiss.write_index(index, str(tmp)))
    manifest = {"count": count, "dim": dim, "kind": kind, "model": progress["model"],
                "weights_sha256": progress["weights_sha256"], "precision": progress["precision"], "model_cfg": model_cfg,
                "shards": progress["shards"], "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write(out / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    shutil.rmtree(parts)
    return manifest


def build_index(model: str, shards: str, out: Path, *, weights: str | None = None, kind: str = "flat",
                nlist: int = 0, hnsw_m: int = 32, batch_size: int = 256, chunk_size: int = 8192,
                device: str = "auto", precision: str = "fp32", overwrite: bool = False) -> dict[str, Any]:
    """Embed every image of ``shards`` with ``model`` into a FAISS index in ``out`` (resumable).

    ``precision`` is the forward passes' (``serving.engine``): a build is resumed only at the precision
    it was started with, so one index never mixes fp32 and bf16 embeddings.

    Returns a summary: ``out``, ``count``, ``dim``, ``kind``, ``seconds``.
    """
    if kind not in KINDS:
        raise UserError(f"unknown index kind '{kind}' (one of {', '.join(KINDS)})")
    if batch_size < 1 or chunk_size < 1:
        raise UserError("--batch-size and --chunk-size must be >= 1")
    if nlist < 0 or hnsw_m < 2:  # faiss aborts the process on an HNSW with fewer than 2 links
        raise UserError(f"--nlist must be >= 0 and --hnsw-m >= 2, got {nlist} and {hnsw_m}")
    out = Path(out)
    if (out / MANIFEST_FILE).is_file() and not overwrite:
        raise UserError(f"{out} already holds a finished index (use --overwrite to rebuild it)")
    start = time.time()
    # Every input is checked, and the model loaded, before --overwrite deletes anything: a mistyped
    # --data, --model or --weights leaves the index that is there as it was.
    urls = expand_shards(shards)
    engine = load_engine(model, weights, device, precision)
    if overwrite:  # a finished index, or the parts of an unfinished build (of any model and shards)
        for name in (MANIFEST_FILE, INDEX_FILE, META_FILE, OFFSETS_FILE, PARTS):
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink(missing_ok=True)
    parts = out / PARTS
    parts.mkdir(parents=True, exist_ok=True)
    # The weights by content: an export re-written in place, or another --weights file for the same
    # model name, must not resume an index that holds the other weights' embeddings.
    weights_file = Path(weights) if weights else Path(model) / EXPORT_WEIGHTS_FILE
    with weights_file.open("rb") as f:
        weights_sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    identity = {"model": str(Path(model).resolve()) if Path(model).exists() else model, "shards": urls,
                "dim": engine.embed_dim, "weights_sha256": weights_sha256, "precision": precision}
    progress = _load_progress(parts, identity)
    if progress["chunks"]:
        log.info("resuming %s after %d chunks (%d items)", out, progress["chunks"], progress["count"])
    progress = _embed_chunks(engine, urls, parts, progress, batch_size, chunk_size)
    if not progress["count"]:
        raise UserError(f"no images could be read from {shards}")
    import open_clip

    model_cfg = open_clip.get_model_config(check_model(model, weights)[0])
    manifest = _finish(out, parts, progress, kind, nlist, hnsw_m, model_cfg)
    return {"out": str(out), "count": manifest["count"], "dim": manifest["dim"], "kind": kind,
            "seconds": round(time.time() - start, 1)}
