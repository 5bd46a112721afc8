"""Streaming WebDataset loader for image-caption shards (img2dataset layout).

Shape legend: B = micro-batch per rank, C = tokenizer context length, S = image side.

Each rank runs ``workers`` DataLoader workers. Worker slots are numbered ``rank * workers + role``
and every slot reads a disjoint part of the data: whole shards when there are at least as many
shards as slots, else every (slots)-th sample of all shards. A slot's stream is an endless
sequence of epochs (shards re-shuffled each epoch from the seed), so every rank yields as many
batches as the trainer asks for and no rank waits at an epoch boundary.

Everything random (shard order, shuffle buffer, augmentation) derives from (seed, slot, position),
so the stream is a pure function of its cursor: a resumed run skips the samples already consumed
without decoding them and continues with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import io
import json
import logging
import random
import zlib
from dataclasses import dataclass, field
from itertools import count
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from data.s3 import S3Settings
from data.shards import open_shard
from training.errors import UserError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_WARN_LIMIT = 10  # per worker; after that only the counts are reported


class SkipSample(Exception):
    """A sample that cannot be used (undecodable image, missing caption)."""


@dataclass
class StreamSpec:
    """What one rank streams; shared by all its workers."""

    urls: list[str]
    """Shards of the first (or only) source."""
    batch_size: int
    seed: int = 0
    rank: int = 0
    world: int = 1
    workers: int = 1
    shuffle_buffer: int = 2000
    train: bool = True
    role_offset: int = 0
    """On resume, worker w plays role (w + role_offset) % workers, so batches keep their order."""
    cursors: dict[int, int] = field(default_factory=dict)
    """Per role: samples already taken from the shuffled stream (consumed batches)."""
    start_epoch: int = 0
    """First epoch of every slot's stream (a resume whose layout changed starts a fresh epoch)."""
    more_sources: list[list[str]] = field(default_factory=list)
    """Further sources, mixed with the first sample by sample..."""
    weights: list[float] = field(default_factory=list)
    """...with these sampling weights (one per source; empty: sources are concatenated)."""
    s3: S3Settings = field(default_factory=S3Settings)


def _mix(*parts: Any) -> int:
    """A stable 32-bit seed from the parts (``hash`` of str is salted per process)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def decode_image(data: bytes, size: int | None) -> Image.Image:
    """Decode to RGB; JPEGs decode at the smallest DCT scale still >= ``size`` (draft mode)."""
    try:
        image = Image.open(io.BytesIO(data))
        if size and image.format == "JPEG":
            image.draft("RGB", (size, size))
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise SkipSample(f"undecodable image ({error})") from None


def decode_meta(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample's ``.json`` metadata ({} when absent or unreadable: it is optional)."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def decode_sample(sample: dict[str, Any], size: int | None) -> tuple[Image.Image, str]:
    image_bytes = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if image_bytes is None:
        raise SkipSample("no image")
    caption = sample.get("txt")
    if caption is None:
        raise SkipSample("no caption")
    try:
        caption = caption.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SkipSample("caption is not utf-8") from None
    if not caption:
        raise SkipSample("empty caption")
    return decode_image(image_bytes, size), caption


class _Counter:
    """Per-worker count of skipped samples and broken shards, reported with each batch."""

    def __init__(self) -> None:
        self.pending = 0
        self.warned = 0

    def skip(self, what: str, reason: str) -> None:
        self.pending += 1
        if self.warned < _WARN_LIMIT:
            self.warned += 1
            log.warning("skipping %s: %s", what, reason)

    def tar_error(self, exn: Exception) -> bool:
        self.skip("rest of shard", f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        return True

    def take(self) -> int:
        pending, self.pending = self.pending, 0
        return pending


class ShardStream(IterableDataset):
    """Batches of ``{"image": [B,3,S,S], "text": [B,C], "key": [...], "caption": [...]}``."""

    def __init__(self, spec: StreamSpec, image_transform: Callable, tokenizer: Callable, image_size: int | None):
        self.spec = spec
        self.transform = image_transform
        self.tokenizer = tokenizer
        self.image_size = image_size

    def _role(self) -> int:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return (worker + self.spec.role_offset) % self.spec.workers

    def _shards(self, urls: list[str], role: int, epoch: int, source: int) -> tuple[list[str], int, int]:
        """(this slot's shards of one source for the epoch, sample stride, sample offset)."""
        spec = self.spec
        slots, slot = spec.world * spec.workers, spec.rank * spec.workers + role
        urls = list(urls)
        if spec.train:
            random.Random(_mix(spec.seed, "shards", source, epoch)).shuffle(urls)
        if len(urls) >= slots:
            return urls[slot::slots], 1, 0
        return urls, slots, slot

    def _source(self, urls: list[str], role: int, source: int, counter: _Counter) -> Iterator[dict[str, Any]]:
        """Undecoded samples of one source for this slot, epoch after epoch (one epoch when evaluating)."""
        first = self.spec.start_epoch
        for epoch in count(first) if self.spec.train else range(first, first + 1):
            shards, stride, offset = self._shards(urls, role, epoch, source)
            streams = (open_shard(url, self.spec.s3) for url in shards)
            samples = group_by_keys(tar_file_expander(streams, handler=counter.tar_error), handler=counter.tar_error)
            produced = False
            for index, sample in enumerate(samples):
                if index % stride == offset:
                    produced = True
                    sample["__epoch__"] = epoch
                    yield sample
            if not produced:
                raise UserError(f"no samples could be read from the shards: {', '.join(shards[:3])}")

    def _raw(self, role: int, counter: _Counter) -> Iterator[dict[str, Any]]:
        """One source, or several mixed sample by sample with the configured weights."""
        sources = [self.spec.urls, *self.spec.more_sources]
        if len(sources) == 1 or not self.spec.weights:
            yield from self._source([u for urls in sources for u in urls], role, 0, counter)
            return
        streams = [self._source(urls, role, i, counter) for i, urls in enumerate(sources)]
        rng = random.Random(_mix(self.spec.seed, "mix", self.spec.rank, role))
        indices = range(len(streams))
        while True:
            yield next(streams[rng.choices(indices, weights=self.spec.weights)[0]])

    def _shuffled(self, raw: Iterator[dict], role: int) -> Iterator[dict]:
        if not self.spec.train or self.spec.shuffle_buffer <= 1:
            yield from raw
            return
        rng = random.Random(_mix(self.spec.seed, "buffer", self.spec.rank, role))
        buffer: list[dict] = []
        for sample in raw:
            buffer.append(sample)
            if len(buffer) >= self.spec.shuffle_buffer:
                index = rng.randrange(len(buffer))
                buffer[index], buffer[-1] = buffer[-1], buffer[index]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        role = self._role()
        counter = _Counter()
        stream = self._shuffled(self._raw(role, counter), role)
        position = self.spec.cursors.get(role, 0)
        for _ in range(position):  # resume: skip without decoding
            next(stream)
        batch: list[tuple] = []
        for sample in stream:
            position += 1
            try:
                image, caption = decode_sample(sample, self.image_size)
            except SkipSample as reason:
                counter.skip(f"sample {sample.get('__key__')} of {sample.get('__url__')}", str(reason))
                continue
            if self.spec.train:  # augmentation depends only on the sample's place in the stream
                # the CPU generator alone: torch.manual_seed also seeds (lazily, formatting a stack
                # trace each call) every CUDA device, which cost more than decoding the JPEG
                torch.default_generator.manual_seed(_mix(self.spec.seed, "augment", self.spec.rank, role, position))
            batch.append((self.transform(image), caption, sample["__key__"], decode_meta(sample)))
            if len(batch) == self.spec.batch_size:
                yield self._collate(batch, role, position, counter.take(), sample["__epoch__"])
                batch = []
        if batch and not self.spec.train:
            yield self._collate(batch, role, position, counter.take(), self.spec.start_epoch)

    def _collate(self, batch: list, role: int, position: int, skipped: int, epoch: int) -> dict[str, Any]:
        images, captions, keys, metas = zip(*batch)
        return {
            "image": default_collate(images),  # in a worker: stacked straight into shared memory
            "text": self.tokenizer(list(captions)),
            "caption": list(captions),
            "key": list(keys),
            "meta": list(metas),
            "role": role,
            "cursor": position,
            "epoch": epoch,
            "skipped": skipped,
        }


def make_loader(
    spec: StreamSpec, image_transform: Callable, tokenizer: Callable, image_size: int | None, *, in_process: bool = False
) -> DataLoader:
    """A DataLoader over ``spec``; its workers hand batches back strictly round-robin.

    ``in_process`` reads in the calling process (one role), for tests and tiny evaluations.
    """
    dataset = ShardStream(spec, image_transform, tokenizer, image_size)
    workers = 0 if in_process else spec.workers
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers else None,
    )
