"""A FAISS index of image embeddings and its metadata, memory-mapped, searched with filters inside.

Shape legend: Q = queries, D = embed dim, k = results per query, N = items in the index.

The directory (written by ``tandem index``, see ``training/indexing.py``) holds:

- ``index.json``: the manifest (``count``, ``dim``, ``kind``, the model it was built with);
- ``index.faiss``: inner-product FAISS index (Flat, IVF or HNSW) over L2-normalised embeddings,
  so scores are cosines; read with ``IO_FLAG_MMAP_IFC`` (the vectors stay on disk, paged in);
- ``meta.jsonl`` + ``meta.offsets.npy``: one JSON record per id (``key``, ``caption``, ``url``,
  ``meta``) and its byte offset, so a hit's record is one ``pread`` and nothing is loaded up front.

A metadata filter selects ids before the search, so ``k`` results come from the matching items (a
post-filter would return fewer than ``k`` or none when the filter is selective):

- up to ``EXACT_IDS`` matching items are searched exactly: their stored vectors times the query.
  An approximate index cannot be trusted with them: IVF visits ``nprobe`` of its lists, which hold
  a few of them or none, and HNSW's graph walk loses them among the items it must skip; and the
  exact scores of a few thousand vectors cost less than any index search;
- more matching items go to FAISS as an ``IDSelector`` in the search parameters; should a query come
  back with fewer than ``k`` hits, the search is repeated with ``nprobe`` (IVF) or ``efSearch``
  (HNSW) four times larger. Once a search would score about as many items as match (IVF: the
  ``nprobe`` lists' share of the items; HNSW: ``efSearch``), the matching items are scored exactly
  instead, ``EXACT_BATCH`` vectors at a time: that costs no more, and nothing can be missed. A broad
  filter on a large HNSW index so never widens into a walk of the whole graph.

A field's value -> ids table comes from one scan of ``meta.jsonl``; the scan also records which
fields exist at all, so a filter on any other name is answered without a scan, and the tables of at
most ``POSTINGS_FIELDS`` fields are kept.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
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
EXACT_IDS = 8192  # filters matching at most this many items are searched exactly (<= 32 MB of 1024-d vectors)
WIDEN = 4  # a filtered search short of k hits is repeated with nprobe / efSearch this many times larger
EXACT_BATCH = 8192  # vectors scored at a time when many matching items are searched exactly
POSTINGS_FIELDS = 32  # fields whose value -> ids table is kept (least recently used goes first)

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
    try:
        data = json.loads(manifest.read_text())
    except (ValueError, OSError) as error:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{manifest} is not a readable index manifest ({error})") from None
    missing = [k for k in ("count", "dim", "kind") if not isinstance(data, dict) or k not in data]
    if missing:
        raise UserError(f"{manifest} is not an index manifest written by `tandem index` (no {', '.join(missing)})")
    return data


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
        self._postings: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._fields: set[str] | None = None  # every field some record has, known after the first scan
        self._postings_lock = threading.Lock()  # held for lookups only, never for a scan
        self._scan_lock = threading.Lock()
        self._direct_map_lock = threading.Lock()
        self._direct_map = not isinstance(self.index, faiss.IndexIVF)  # IVF needs one to reconstruct

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
        """value -> ids for one field, built by one scan of the metadata (one scan at a time)."""
        found = self._cached(field)
        if found is None:
            with self._scan_lock:
                found = self._cached(field)  # another request may have scanned it meanwhile
                if found is None:
                    found, fields = self._scan(field)
                    with self._postings_lock:
                        self._fields = fields
                        self._postings[field] = found
                        while len(self._postings) > POSTINGS_FIELDS:
                            self._postings.popitem(last=False)
        return found

    def _cached(self, field: str) -> dict[str, np.ndarray] | None:
        with self._postings_lock:
            if self._fields is not None and field not in self._fields:
                return {}
            found = self._postings.get(field)
            if found is not None:
                self._postings.move_to_end(field)
            return found

    def _scan(self, field: str) -> tuple[dict[str, np.ndarray], set[str]]:
        """(value -> ids of ``field``, the names of all fields) from one pass over ``meta.jsonl``."""
        lists: dict[str, list[int]] = {}
        fields = set(RECORD_FIELDS)
        with open(self.path / META_FILE, "rb") as lines:
            for item, line in enumerate(lines):
                record = json.loads(line)
                meta = record.get("meta")
                if isinstance(meta, dict):
                    fields.update(meta)
                value = record_value(record, field)
                if value is not None and not isinstance(value, (dict, list)):
                    lists.setdefault(value_key(value), []).append(item)
        return {v: np.asarray(ids, np.int64) for v, ids in lists.items()}, fields

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """``[len(ids), D]`` stored vectors (an IVF index builds its id -> list map on the first call)."""
        if not self._direct_map:
            with self._direct_map_lock:
                if not self._direct_map:
                    faiss.extract_index_ivf(self.index).make_direct_map()
                    self._direct_map = True
        return self.index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))

    def _exact(self, queries: np.ndarray, k: int, ids: np.ndarray) -> list[list[tuple[int, float]]]:
        """The ``k`` best of the sorted ``ids`` by exact cosine, ``EXACT_BATCH`` vectors at a time; ties
        in id order, as FAISS's flat search."""
        best_ids = np.empty((len(queries), 0), np.int64)
        best_scores = np.empty((len(queries), 0), np.float32)
        for start in range(0, len(ids), EXACT_BATCH):
            batch = ids[start:start + EXACT_BATCH]
            scores = np.concatenate([best_scores, queries @ self.vectors(batch).T], axis=1)
            candidates = np.concatenate([best_ids, np.broadcast_to(batch, (len(queries), len(batch)))], axis=1)
            # stable: the kept ids all precede this batch's, so equal scores stay in id order
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            best_ids = np.take_along_axis(candidates, order, axis=1)
            best_scores = np.take_along_axis(scores, order, axis=1)
        return [[(int(i), float(s)) for i, s in zip(row_ids, row_scores)]
                for row_ids, row_scores in zip(best_ids, best_scores)]

    def _params(self, selector: faiss.IDSelector | None, widen: int) -> tuple[faiss.SearchParameters | None, int]:
        """Search parameters ``widen`` times wider than configured, and about how many items a search
        with them scores (IVF: its lists' share of the items; HNSW: efSearch; flat: all)."""
        if isinstance(self.index, faiss.IndexIVF):
            nprobe = min(self.nprobe * widen, self.index.nlist)
            visits = -(-self.count * nprobe // self.index.nlist)
            return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe), visits
        if isinstance(self.index, faiss.IndexHNSW):
            ef = min(max(self.ef_search, 1) * widen, self.count)
            return faiss.SearchParametersHNSW(sel=selector, efSearch=ef), ef
        return (faiss.SearchParameters(sel=selector) if selector is not None else None), self.count

    def search(self, queries: np.ndarray, k: int, where: dict | None = None) -> list[list[tuple[int, float]]]:
        """``[Q, D]`` normalised queries -> per query up to ``k`` (id, cosine), best first.

        With a filter, ``k`` hits whenever ``k`` items match (see the module's docstring).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        ids = self.matching_ids(where) if where else None
        k = min(k, self.count if ids is None else len(ids))
        if k == 0:
            return [[] for _ in range(len(queries))]
        if ids is not None and len(ids) <= EXACT_IDS:
            return self._exact(queries, k, ids)
        selector = faiss.IDSelectorBatch(ids) if ids is not None else None
        widen = 1
        while True:
            params, visits = self._params(selector, widen)
            if ids is not None and visits >= len(ids):  # as costly as scoring every match: do that
                return self._exact(queries, k, ids)
            scores, found = self.index.search(queries, k, params=params)
            hits = [[(int(i), float(s)) for i, s in zip(row_ids, row_scores) if i >= 0]
                    for row_ids, row_scores in zip(found, scores)]
            if ids is None or min(map(len, hits)) >= k:
                return hits
            widen *= WIDEN  # ends: visits reaches the item count, which is at least len(ids)
