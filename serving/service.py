"""decode -> predict -> encode for each endpoint, over the engine, the batcher and the index.

Shape legend: B = images or texts of a request, C = labels, D = embed dim.

Decoding (base64, PIL, the eval transform) and tokenizing run on a pool of ``workers`` threads, the
forward passes on the batcher's model thread, so the event loop only parses JSON and waits and the
model thread only runs the model.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import numpy as np
import torch

from serving import schemas
from serving.batcher import Batcher
from serving.decode import b64decode, image_tensor
from serving.engine import Engine, ensemble, prompts
from serving.errors import BadInput, ServingError
from serving.index import RECORD_FIELDS, Index
from serving.metrics import ServingMetrics
from serving.settings import ServeSettings

log = logging.getLogger(__name__)

PROMPT_CHUNK = 128  # label prompts per model-thread call, so image batches interleave with a big label set
ImageSource = str | bytes  # base64 text, or the raw bytes of an upload
T = TypeVar("T")


class NoIndex(ServingError):
    status, code = 404, "no_index"


class Service:
    """Owns the model thread, the decode pool and the label-set cache; close() stops the threads.

    The engine and index outlive it (their memory and file mappings go with the process).
    """

    def __init__(self, engine: Engine, index: Index | None, settings: ServeSettings, metrics: ServingMetrics) -> None:
        if index is not None and index.dim != engine.embed_dim:
            raise ValueError(f"index has dimension {index.dim}, the model embeds in {engine.embed_dim}")
        self.engine, self.index, self.settings, self.metrics = engine, index, settings, metrics
        self.pool = ThreadPoolExecutor(max(settings.workers, 1), thread_name_prefix="tandem-decode")
        self.batcher = Batcher({"image": self._encode_images, "text": self._encode_tokens},
                               max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
                               on_batch=metrics.on_batch, on_depth=metrics.on_depth)
        self._labels: OrderedDict[tuple, asyncio.Future] = OrderedDict()

    def close(self) -> None:
        self.batcher.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ---- model thread ----

    def _encode_images(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(self.engine.encode_images(torch.stack(images)))

    def _encode_tokens(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(self.engine.encode_tokens(torch.stack(tokens)))

    # ---- the three stages' building blocks ----

    async def _in_pool(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _decode_one(self, source: ImageSource, what: str) -> torch.Tensor:
        data = b64decode(source, what) if isinstance(source, str) else source
        if not data:
            raise BadInput(f"{what} is empty")
        return image_tensor(data, self.engine.transform, self.engine.image_size, self.settings.max_pixels, what)

    async def decode_images(self, sources: list[ImageSource], name: str = "images") -> list[torch.Tensor]:
        """Decoded in parallel on the pool; errors name the field (``images[3]``, or ``image``)."""
        what = [name if name == "image" else f"{name}[{i}]" for i in range(len(sources))]
        return list(await asyncio.gather(*(self._in_pool(self._decode_one, s, w) for s, w in zip(sources, what))))

    async def _batched(self, kind: str, payloads: list) -> torch.Tensor:
        futures = [asyncio.wrap_future(f) for f in self.batcher.submit(kind, payloads)]
        return torch.stack(await asyncio.gather(*futures))

    async def embed_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        """``[B, D]``, each image a separate item of the cross-request batches."""
        return await self._batched("image", images)

    async def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """``[B, D]``, tokenized on the pool, each text a separate item of the cross-request batches."""
        tokens = await self._in_pool(self.engine.tokenize, texts)
        return await self._batched("text", list(tokens))

    async def label_features(self, labels: list[str], templates: list[str]) -> torch.Tensor:
        """``[C, D]`` zero-shot classifier of a label set; computed once, then from the LRU cache."""
        key = (tuple(labels), tuple(templates))
        task = self._labels.get(key)
        if task is not None:
            self._labels.move_to_end(key)
            self.metrics.label_cache.labels("hit").inc()
        else:
            self.metrics.label_cache.labels("miss").inc()
            task = self._labels[key] = asyncio.ensure_future(self._compute_labels(labels, templates))
            while len(self._labels) > max(self.settings.label_cache, 1):
                self._labels.popitem(last=False)
        try:
            # shielded: a client that goes away must not cancel what other requests wait on
            return await asyncio.shield(task)
        except Exception:
            if self._labels.get(key) is task:
                del self._labels[key]
            raise

    async def _compute_labels(self, labels: list[str], templates: list[str]) -> torch.Tensor:
        texts, parts = prompts(labels, templates), []
        for start in range(0, len(texts), PROMPT_CHUNK):
            tokens = await self._in_pool(self.engine.tokenize, texts[start : start + PROMPT_CHUNK])
            parts.append(await asyncio.wrap_future(self.batcher.call(lambda t=tokens: self.engine.encode_tokens(t))))
        return ensemble(torch.cat(parts), len(templates))

    # ---- endpoints ----

    async def embed(self, route: str, texts: list[str], images: list[ImageSource]) -> bytes:
        with self.metrics.stage(route, "decode"):
            tensors = await self.decode_images(images) if images else []
        with self.metrics.stage(route, "predict"):
            text_features, image_features = await asyncio.gather(
                self.embed_texts(texts) if texts else _none(), self.embed_images(tensors) if tensors else _none())
        with self.metrics.stage(route, "encode"):
            return schemas.EmbedResponse(
                dim=self.engine.embed_dim,
                text_embeddings=text_features.tolist() if text_features is not None else [],
                image_embeddings=image_features.tolist() if image_features is not None else [],
            ).model_dump_json().encode()

    async def classify(self, route: str, request: schemas.LabelSet, images: list[ImageSource]) -> bytes:
        with self.metrics.stage(route, "decode"):
            tensors = await self.decode_images(images)
        with self.metrics.stage(route, "predict"):
            label_features, image_features = await asyncio.gather(
                self.label_features(request.labels, request.templates), self.embed_images(tensors))
            probabilities, scores = self.engine.classify(image_features, label_features)
        with self.metrics.stage(route, "encode"):
            top_k = min(request.top_k or len(request.labels), len(request.labels))
            best_p, best_i = probabilities.topk(top_k, dim=1)
            results = []
            for row_p, row_i, row_s in zip(best_p.tolist(), best_i.tolist(), scores.tolist()):
                ranked = [schemas.LabelScore(label=request.labels[i], probability=p, score=row_s[i])
                          for p, i in zip(row_p, row_i)]
                results.append(schemas.Prediction(label=ranked[0].label, labels=ranked))
            return schemas.ClassifyResponse(logit_scale=self.engine.logit_scale,
                                            results=results).model_dump_json().encode()

    async def search(self, route: str, request: schemas.SearchOptions, *, text: str | None = None,
                     image: ImageSource | None = None, embedding: list[float] | None = None) -> bytes:
        if self.index is None:
            raise NoIndex("no index loaded: start the server with --index INDEX_DIR (see `tandem index`)")
        with self.metrics.stage(route, "decode"):
            tensors = await self.decode_images([image], name="image") if image is not None else []
            query = self._embedding_query(embedding) if embedding is not None else None
        with self.metrics.stage(route, "predict"):
            if text is not None:
                query = (await self.embed_texts([text])).numpy()
            elif tensors:
                query = (await self.embed_images(tensors)).numpy()
            hits = (await self._in_pool(self.index.search, query, request.k, request.filter))[0]
        with self.metrics.stage(route, "encode"):
            return await self._in_pool(self._encode_hits, hits)

    def _embedding_query(self, embedding: list[float]) -> np.ndarray:
        if len(embedding) != self.engine.embed_dim:
            raise BadInput(f"embedding has dimension {len(embedding)}, the model's is {self.engine.embed_dim}")
        query = np.asarray([embedding], dtype=np.float32)
        norm = float(np.linalg.norm(query))
        if not np.isfinite(norm) or norm == 0.0:
            raise BadInput("embedding must be a non-zero vector of finite values")
        return query / norm

    def _encode_hits(self, hits: list[tuple[int, float]]) -> bytes:
        results = []
        for item, score in hits:
            record = self.index.record(item)
            # An index written before `tandem index` kept only string urls may hold any JSON there
            # (the sample's json is still whole in meta)
            text = {name: value if isinstance(value := record.get(name), str) else None
                    for name in RECORD_FIELDS}
            meta = record.get("meta")
            results.append(schemas.Hit(id=item, score=score, meta=meta if isinstance(meta, dict) else {}, **text))
        return schemas.SearchResponse(results=results).model_dump_json().encode()


async def _none() -> None:
    return None
