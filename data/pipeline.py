"""Streaming WebDataset loader for image-caption shards (img2dataset layout).

Shape legend: B = micro-batch per rank, C = tokenizer context length, S = image side.

Each rank runs ``workers`` DataLoader workers. Worker slots are numbered ``rank * workers + role``
and every slot reads a disjoint part of the data: whole shards when there are at least as many
shards as slots, else every (slots)-th sample of all shards. A slot's stream is an endless
sequence of epochs (shards re-shuffled each epoch from the seed), so every rank yields as many
batches as the trainer asks for and no rank waits at an epoch boundary.

Everything random (shard order, shuffle buffer, source mix, augmentation) derives from (seed, slot,
source, epoch, position), and each source's epoch is shuffled on its own (its shuffle buffer is
emptied at the epoch's end), so the stream is a pure function of its cursor. Every batch carries its
role's ``resume`` state: the position and, per source, the epoch and the samples of it already taken.
A resumed run given that state re-reads only the current epoch of each source up to the samples
already taken (without decoding them) and continues with exactly the batches an uninterrupted run
would have seen. A plain count for a cursor (older checkpoints) replays from ``start_epoch``.

Every batch's ``resume`` also holds the stream's layout (shuffle buffer, a fingerprint of each
source's shard list): a resume whose layout differs would re-read the epoch differently, so it starts
the next epoch instead (``restart_epoch`` in the cursor, else one past the cursor's own).

A slot that reads nothing in an epoch (its shards happen to be the broken ones), or nothing usable
(every sample skipped), warns and moves on; only data where no shard holds a (usable) sample is an
error, since an endless stream would otherwise read epoch after epoch and never fill a batch. A
``UserError`` in a DataLoader worker reaches the caller as its own one line, not wrapped in the
worker's traceback.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import random
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from data.modes import to_rgb
from data.s3 import S3Settings, StoreError
from data.shards import open_shard
from training.errors import UserError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_WARN_LIMIT = 10  # per worker; after that only the counts are reported
_MIX_BLOCK = 4096  # source draws per seed of the mix, so a resume skips at most this many draws
# Samples read per shard by the probe for a usable one, after a slot's whole epoch had none: enough
# to find one in a shard that is partly bad, few enough to probe thousands of shards before failing.
_PROBE_SAMPLES = 16
NO_IMAGE = "no image (.jpg, .jpeg, .png or .webp)"
NO_CAPTION = "no caption (.txt)"


class SkipSample(Exception):
    """A sample that cannot be used (undecodable image, missing caption). ``kind`` is the reason
    without the sample's own detail, so that reasons can be counted."""

    def __init__(self, kind: str, detail: str = ""):
        super().__init__(f"{kind} ({detail})" if detail else kind)
        self.kind = kind


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
    cursors: dict[int, int | dict] = field(default_factory=dict)
    """Per role: the ``resume`` of its last consumed batch (continues within each source's epoch), or a
    count of samples already taken (replayed from ``start_epoch``)."""
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
    """Decode to RGB, upright as its EXIF orientation says; JPEGs decode at the smallest DCT scale
    still >= ``size`` (draft mode)."""
    try:
        image = Image.open(io.BytesIO(data))
        if size and image.format == "JPEG":
            image.draft("RGB", (size, size))
        image.load()
        return to_rgb(image)
    # PIL's format plugins raise a zoo of exception types on corrupt data (a fuzzed TIFF: TypeError);
    # every one of them means this sample is unusable, never that the run should end
    except Exception as error:  # noqa: BLE001
        raise SkipSample("undecodable image", f"{type(error).__name__}: {error}") from None


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
        raise SkipSample(NO_IMAGE)
    caption = sample.get("txt")
    if caption is None:
        raise SkipSample(NO_CAPTION)
    try:
        caption = caption.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SkipSample("caption is not utf-8") from None
    if not caption:
        raise SkipSample("empty caption")
    return decode_image(image_bytes, size), caption


def _fingerprint(urls: list[str]) -> str:
    """A stable digest of a shard list (its order too: the per-epoch shuffle permutes the list)."""
    return hashlib.sha256("\n".join(urls).encode()).hexdigest()[:16]


def _hint(reasons: Counter) -> str:
    """What to do about data whose samples were all skipped for these reasons."""
    if NO_IMAGE in reasons and NO_CAPTION in reasons:  # images and captions each a sample of their own
        return ("; a sample's image and caption must lie next to each other in the tar under one key (tar "
                "the files sorted by name, not by extension, or write the shards with `tandem data shards`)")
    if NO_CAPTION in reasons:
        return "; every sample needs a .txt caption beside its image, under the same key"
    return ""


@dataclass
class _Tally:
    """One source's samples in a slot's current epoch: how many were decoded, how many were usable,
    and why the rest were skipped."""

    judged: int = 0
    usable: int = 0
    reasons: Counter = field(default_factory=Counter)


class _Counter:
    """Per-worker count of skipped samples and broken shards, reported with each batch, and the
    tally of each source's current epoch."""

    def __init__(self) -> None:
        self.pending = 0
        self.warned = 0
        self.muted = 0
        """While above 0 (a resume re-reading samples that the run before it took), skips are not counted:
        that run counted them already."""
        self.epochs: dict[int, _Tally] = {}

    def judged(self, source: int, skipped: SkipSample | None) -> None:
        tally = self.epochs.setdefault(source, _Tally())
        tally.judged += 1
        if skipped is None:
            tally.usable += 1
        else:
            tally.reasons[skipped.kind] += 1

    def skip(self, what: str, reason: str) -> None:
        if self.muted:
            return
        self.pending += 1
        if self.warned < _WARN_LIMIT:
            self.warned += 1
            log.warning("skipping %s: %s", what, reason)

    def tar_error(self, exn: Exception) -> bool:
        if isinstance(exn, StoreError):  # a missing shard or refused credentials: not a damaged shard
            raise StoreError(exn.message) from None
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
        self._readable: dict[int, bool] = {}
        """Per source: whether any shard holds a sample (probed once per worker, when a slot reads none)."""
        self._usable: dict[int, bool] = {}
        """Per source: whether any shard holds a usable sample (probed once per worker, when a slot's
        epoch had none)."""
        self.layout = {"shuffle_buffer": spec.shuffle_buffer, "shards": [_fingerprint(u) for u in self._sources()]}
        """What a resume must share with the checkpoint's run to continue its epoch (saved in ``resume``)."""

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

    def _sources(self) -> list[list[str]]:
        """The shard lists mixed by weight, or all of them as one source."""
        sources = [self.spec.urls, *self.spec.more_sources]
        return sources if len(sources) > 1 and self.spec.weights else [[u for urls in sources for u in urls]]

    def _epoch(self, urls: list[str], role: int, source: int, epoch: int, counter: _Counter) -> Iterator[dict]:
        """This slot's undecoded samples of one source and epoch, in shard order."""
        shards, stride, offset = self._shards(urls, role, epoch, source)
        streams = (open_shard(url, self.spec.s3) for url in shards)
        samples = group_by_keys(tar_file_expander(streams, handler=counter.tar_error), handler=counter.tar_error)
        read = mine = 0
        for index, sample in enumerate(samples):
            read += 1
            if index % stride == offset:
                mine += 1
                yield sample
        if not mine:
            self._nothing_read(urls, shards, read, source, epoch)

    def _nothing_read(self, urls: list[str], shards: list[str], read: int, source: int, epoch: int) -> None:
        """A slot's epoch without a sample: an error only when the data as a whole has none for it."""
        slots = self.spec.world * self.spec.workers
        if len(shards) == len(urls):  # this slot read every shard, so the judgement is already whole
            if read and not self.spec.train:  # a held-out split smaller than the readers: others have it
                return
            if read:
                raise UserError(f"the shards hold only {read} readable samples, fewer than the {slots} readers "
                                "(ranks x data.workers) that share them; use fewer workers or more data")
            readable = False
        else:
            if source not in self._readable:  # once per source and worker: a probe stops at the first sample
                self._readable[source] = any(_has_sample(url, self.spec.s3) for url in urls)
            readable = self._readable[source]
        if not readable:
            raise UserError(f"no samples could be read from any of the {len(urls)} shards "
                            f"({', '.join(urls[:3])}{', ...' if len(urls) > 3 else ''})")
        log.warning("none of the %d shards read in epoch %d (%s) held a readable sample; other shards do, "
                    "so reading goes on with the next epoch", len(shards), epoch, ", ".join(shards[:3]))

    def _nothing_usable(self, urls: list[str], role: int, source: int, epoch: int, tally: _Tally) -> None:
        """A slot's epoch whose samples were all skipped: an error unless some shard holds a usable one."""
        if source not in self._usable:  # once per source and worker: the probe stops at the first usable one
            self._usable[source] = any(self._usable_in(url) for url in urls)
        shards, _, _ = self._shards(urls, role, epoch, source)
        where = f"{', '.join(shards[:3])}{', ...' if len(shards) > 3 else ''}"
        reasons = ", ".join(f"{count} {kind}" for kind, count in tally.reasons.most_common(2))
        if not self._usable[source]:
            raise UserError(f"no usable sample in an epoch of {tally.judged} read from {len(shards)} "
                            f"shard{'s' if len(shards) > 1 else ''} ({where}): {reasons}{_hint(tally.reasons)}")
        log.warning("none of the %d samples read in epoch %d (%s) was usable (%s); other shards hold usable "
                    "ones, so reading goes on with the next epoch", tally.judged, epoch, where, reasons)

    def _usable_in(self, url: str) -> bool:
        """Whether one of the shard's first samples decodes and transforms."""
        quiet = _Counter()
        quiet.muted = 1  # a damaged shard is no usable sample, and not the batches' skip count either
        source = open_shard(url, self.spec.s3)
        with source["stream"]:
            samples = group_by_keys(tar_file_expander([source], handler=quiet.tar_error), handler=quiet.tar_error)
            for sample in itertools.islice(samples, _PROBE_SAMPLES):
                try:
                    self._decode(sample, None)
                    return True
                except SkipSample:
                    continue
        return False

    def _decode(self, sample: dict[str, Any], seed: int | None) -> tuple[torch.Tensor, str]:
        """(transformed image, caption); ``seed`` (training) seeds the augmentation."""
        image, caption = decode_sample(sample, self.image_size)
        if seed is not None:
            # the CPU generator alone: torch.manual_seed also seeds (lazily, formatting a stack trace
            # each call) every CUDA device, which cost more than decoding the JPEG
            torch.default_generator.manual_seed(seed)
        try:
            return self.transform(image), caption
        except Exception as error:  # noqa: BLE001 - a size or mode the transform's ops refuse
            raise SkipSample("image transform failed", f"{type(error).__name__}: {error}") from None

    def _shuffled(self, samples: Iterator[dict], role: int, source: int, epoch: int) -> Iterator[dict]:
        """One epoch through a shuffle buffer of its own (the sources share ``shuffle_buffer``)."""
        size = self.spec.shuffle_buffer // len(self._sources())
        if not self.spec.train or size <= 1:
            yield from samples
            return
        rng = random.Random(_mix(self.spec.seed, "buffer", self.spec.rank, role, source, epoch))
        buffer: list[dict] = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= size:
                index = rng.randrange(len(buffer))
                buffer[index], buffer[-1] = buffer[-1], buffer[index]
                yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def _source(self, urls: list[str], role: int, source: int, start: tuple[int, int],
                counter: _Counter) -> Iterator[dict[str, Any]]:
        """Shuffled undecoded samples of one source for this slot, from ``start`` = (epoch, samples of it
        already taken), epoch after epoch (one epoch when evaluating)."""
        epoch, taken = start
        while True:
            counter.epochs[source] = tally = _Tally()
            counter.muted += bool(taken)
            samples = self._shuffled(self._epoch(urls, role, source, epoch, counter), role, source, epoch)
            offset = 0
            for offset, sample in enumerate(samples, 1):
                if offset == taken:  # what is read from here on, the run before this one never read
                    counter.muted -= 1
                if offset > taken:  # a resume reads the taken ones again, without decoding them
                    sample.update(__source__=source, __epoch__=epoch, __offset__=offset)
                    yield sample
            if offset < taken:  # the epoch ended before the samples taken (its shards were rewritten)
                counter.muted -= 1
            # every sample of the epoch was decoded here (none skipped by a resume) and none was usable
            if not taken and offset and tally.judged == offset and not tally.usable:
                self._nothing_usable(urls, role, source, epoch, tally)
            if not self.spec.train:
                return
            epoch, taken = epoch + 1, 0

    def _raw(self, role: int, counter: _Counter, position: int, starts: list[tuple[int, int]]) -> Iterator[dict]:
        """One source, or several mixed sample by sample with the configured weights."""
        streams = [self._source(urls, role, i, start, counter)
                   for i, (urls, start) in enumerate(zip(self._sources(), starts))]
        if len(streams) == 1:
            yield from streams[0]
            return
        indices = range(len(streams))
        while True:  # the draws are seeded per block, so a resume need not replay them from the start
            block, within = divmod(position, _MIX_BLOCK)
            rng = random.Random(_mix(self.spec.seed, "mix", self.spec.rank, role, block))
            for source in rng.choices(indices, weights=self.spec.weights, k=_MIX_BLOCK)[within:]:
                yield next(streams[source])
            position += _MIX_BLOCK - within

    def _start(self, role: int) -> tuple[int, list[tuple[int, int]], int]:
        """(position, per source (epoch, samples taken), samples still to skip) for this role's cursor."""
        cursor, count = self.spec.cursors.get(role, 0), len(self._sources())
        fresh = [(self.spec.start_epoch, 0)] * count
        if not isinstance(cursor, dict):
            return 0, fresh, int(cursor)
        starts = [(int(epoch), int(taken)) for epoch, taken in cursor["sources"]]
        changed = "the number of data sources" if len(starts) != count else self._layout_change(cursor)
        if not changed:
            return int(cursor["position"]), starts, 0
        # the run-wide next epoch (every role starts the same one), or one past this role's own
        epoch = int(cursor.get("restart_epoch", max(epoch for epoch, _ in starts) + 1))
        if self.spec.rank == 0 and role == 0:  # one line per run, not one per worker
            log.warning("%s changed since the checkpoint: data resumes at the start of epoch %d (the rest of the "
                        "interrupted epoch is skipped, no sample repeats within an epoch)", changed, epoch)
        return int(cursor["position"]), [(epoch, 0)] * count, 0

    def _layout_change(self, cursor: dict) -> str:
        """What changed in the stream's layout since the cursor was saved, "" if nothing did.

        A cursor without a layout (from a version that saved none) counts as unchanged: the config
        is almost always the one the run had, and counting it as changed would cost every run resumed
        across the upgrade the rest of its epoch.
        """
        saved = cursor.get("layout")
        if not isinstance(saved, dict):
            return ""
        changes = []
        if saved.get("shuffle_buffer") != self.layout["shuffle_buffer"]:
            changes.append(f"data.shuffle_buffer ({saved.get('shuffle_buffer')} -> {self.layout['shuffle_buffer']})")
        if saved.get("shards") != self.layout["shards"]:
            changes.append("the list of shards")
        return " and ".join(changes)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            yield from self._batches()
        except UserError as error:
            if get_worker_info() is None:
                raise
            yield {"error": str(error)}  # torch would re-raise it with the worker's traceback as its message

    def _batches(self) -> Iterator[dict[str, Any]]:
        role = self._role()
        counter = _Counter()
        position, starts, skip = self._start(role)
        state = [list(start) for start in starts]
        stream = self._raw(role, counter, position, starts)
        counter.muted += 1  # an old-style cursor: replay without decoding (or counting skips again)
        for _ in range(skip):
            sample = next(stream)
            state[sample["__source__"]] = [sample["__epoch__"], sample["__offset__"]]
            position += 1
        counter.muted -= 1
        batch: list[tuple] = []
        for sample in stream:
            position += 1
            state[sample["__source__"]] = [sample["__epoch__"], sample["__offset__"]]
            # augmentation depends only on the sample's place in the stream
            seed = _mix(self.spec.seed, "augment", self.spec.rank, role, position) if self.spec.train else None
            try:
                image, caption = self._decode(sample, seed)
            except SkipSample as reason:
                counter.judged(sample["__source__"], reason)
                counter.skip(f"sample {sample.get('__key__')} of {sample.get('__url__')}", str(reason))
                continue
            counter.judged(sample["__source__"], None)
            batch.append((image, caption, sample["__key__"], decode_meta(sample)))
            if len(batch) == self.spec.batch_size:
                yield self._collate(batch, role, position, state, counter.take(), sample["__epoch__"])
                batch = []
        if batch and not self.spec.train:
            yield self._collate(batch, role, position, state, counter.take(), self.spec.start_epoch)

    def _collate(self, batch: list, role: int, position: int, state: list[list[int]], skipped: int,
                 epoch: int) -> dict[str, Any]:
        images, captions, keys, metas = zip(*batch)
        return {
            "image": default_collate(images),  # in a worker: stacked straight into shared memory
            "text": self.tokenizer(list(captions)),
            "caption": list(captions),
            "key": list(keys),
            "meta": list(metas),
            "role": role,
            "cursor": position,
            "resume": {"position": position, "sources": [list(s) for s in state], "layout": self.layout},
            "epoch": epoch,
            "skipped": skipped,
        }


def _has_sample(url: str, settings: S3Settings) -> bool:
    """Whether the shard's first file can be read."""
    try:
        with open_shard(url, settings)["stream"] as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            member = next((m for m in tar if m.isreg()), None)
            if member is not None:
                tar.extractfile(member).read()  # a first file cut short raises here
            return member is not None
    except (tarfile.TarError, EOFError, OSError):
        return False


class _Loader(DataLoader):
    """A DataLoader that raises a worker's ``UserError`` as the one line it was."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in super().__iter__():
            if "error" in batch:
                raise UserError(batch["error"])
            yield batch


def make_loader(
    spec: StreamSpec, image_transform: Callable, tokenizer: Callable, image_size: int | None, *, in_process: bool = False
) -> DataLoader:
    """A DataLoader over ``spec``; its workers hand batches back strictly round-robin.

    ``in_process`` reads in the calling process (one role), for tests and tiny evaluations.
    """
    dataset = ShardStream(spec, image_transform, tokenizer, image_size)
    workers = 0 if in_process else spec.workers
    return _Loader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if workers else None,
    )
