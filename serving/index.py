"""A FAISS index of image embeddings and its metadata, memory-mapped, searched with filters inside.

Shape legend: Q = queries, D = embed dim, k = results per query, N = items in the index.

The directory (written by ``tandem index``, see ``training/indexing.py``) holds:

- ``index.json``: the manifest (``count``, ``dim``, ``kind``, the model it was built with);
- ``index.faiss``: inner-product FAISS index (Flat, IVF or HNSW) over L2-normalised embeddings,
  so scores are cosines; read with ``IO_FLAG_MMAP_IFC`` (the vectors stay on disk, paged in);
- ``meta.jsonl`` + ``meta.offsets.npy``: one JSON record per id (``key``, ``caption``, ``url``,
  ``meta``) and its byte offset, so a hit's record is one ``pread`` and nothing is loaded up front.

A metadata filter selects ids before the search: the matching ids go to FAISS as an ``IDSelector``
in the search parameters, so ``k`` results come from the matching items (a post-filter would return
fewer than ``k`` or none when the filter is selective).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from training.errors import UserError

log = logging.getLogger(__name__)

MANIFEST_FILE = "index.json"
INDEX_FILE = "index.faiss"
META_FILE = "meta.jsonl"
OFFSETS_FILE = "meta.offsets.npy"
RECORD_FIELDS = ("key", "caption", "url")  # top-level in a record; any other filter field is in "meta"

Scalar = str | int | float | bool


def value_key(value: Any) -> str:
    """A hashable key for a JSON scalar: ``true`` and ``1`` differ, ``1`` and ``1.0`` do not."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value, sort_keys=True)


def record_value(record: dict[str, Any], field: str) -> Any:
    return record.get(field) if field in RECORD_FIELDS else (record.get("meta") or {}).get(field)


def read_manifest(path: Path) -> dict[str, Any]:
    manifest = Path(path) / MANIFEST_FILE
    if not manifest.is_file():
        raise UserError(f"{path} is not a finished index (no {MANIFEST_FILE}; run or resume `tandem index`)")
    return json.loads(manifest.read_text())


def _read_faiss(path: Path) -> tuple[faiss.Index, bool]:
    """Memory-map where this index type supports it, else read it into memory."""
    for flags in (faiss.IO_FLAG_MMAP_IFC, faiss.IO_FLAG_MMAP):
        try:
            return faiss.read_index(str(path), flags | faiss.IO_FLAG_READ_ONLY), True
        except RuntimeError:
            continue
    return faiss.read_index(str(path)), False


class Index:
    """Search an index directory; thread-safe for concurrent searches."""

    def __init__(self, path: str | Path, *, nprobe: int = 16, ef_search: int = 64) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.dim = int(self.manifest["dim"])
        self.index, self.mmapped = _read_faiss(self.path / INDEX_FILE)
        if self.index.d != self.dim or self.index.ntotal != int(self.manifest["count"]):
            raise UserError(f"{self.path}: {INDEX_FILE} does not match {MANIFEST_FILE}; rebuild the index")
        self.count = int(self.index.ntotal)
        self.nprobe, self.ef_search = nprobe, ef_search
        self._offsets = np.load(self.path / OFFSETS_FILE, mmap_mode="r")
        self._fd = os.open(self.path / META_FILE, os.O_RDONLY)
        self._postings: dict[str, dict[str, np.ndarray]] = {}
        self._postings_lock = threading.Lock()

    def close(self) -> None:
        os.close(self._fd)

    def record(self, item: int) -> dict[str, Any]:
        """The metadata record of one id, read from disk."""
        start, end = int(self._offsets[item]), int(self._offsets[item + 1])
        return json.loads(os.pread(self._fd, end - start, start))

    def matching_ids(self, where: dict[str, Scalar | list[Scalar]]) -> np.ndarray:
        """Sorted ids whose record matches every field (a list value matches any of its values)."""
        ids: np.ndarray | None = None
        for field, wanted in where.items():
            postings = self._field_postings(field)
            values = wanted if isinstance(wanted, list) else [wanted]
            parts = [postings.get(value_key(v), np.empty(0, np.int64)) for v in values]
            found = np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)
            ids = found if ids is None else np.intersect1d(ids, found, assume_unique=True)
            if not len(ids):
                break
        return ids if ids is not None else np.arange(self.count, dtype=np.int64)

    def _field_postings(self, field: str) -> dict[str, np.ndarray]:
        """value -> ids for one field, built by one scan of the metadata on the field's first use."""
        with self._postings_lock:
            if field not in self._postings:
                lists: dict[str, list[int]] = {}
                with open(self.path / META_FILE, "rb") as lines:
                    for item, line in enumerate(lines):
                        value = record_value(json.loads(line), field)
                        if value is not None and not isinstance(value, (dict, list)):
                            lists.setdefault(value_key(value), []).append(item)
                self._postings[field] = {v: np.asarray(ids, np.int64) for v, ids in lists.items()}
            return self._postings[field]

    def _params(self, selector: faiss.IDSelector | None) -> faiss.SearchParameters | None:
        if isinstance(self.index, faiss.IndexIVF):
            return faiss.SearchParametersIVF(sel=selector, nprobe=self.nprobe)
        if isinstance(self.index, faiss.IndexHNSW):
            return faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.ef_search, 1))
        return faiss.SearchParameters(sel=selector) if selector is not None else None

    def search(self, queries: np.ndarray, k: int, where: dict | None = None) -> list[list[tuple[int, float]]]:
        """``[Q, D]`` normalised queries -> per query up to ``k`` (id, cosine), best first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        selector = None
        if where:
            ids = self.matching_ids(where)
            if not len(ids):
                return [[] for _ in range(len(queries))]
            selector = faiss.IDSelectorBatch(ids)
        k = min(k, self.count)
        if k == 0:
            return [[] for _ in range(len(queries))]
        scores, ids = self.index.search(queries, k, params=self._params(selector))
        return [[(int(i), float(s)) for i, s in zip(row_ids, row_scores) if i >= 0]
                for row_ids, row_scores in zip(ids, scores)]
