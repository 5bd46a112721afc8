"""Samples/s of Tandem's shard loader against open_clip's WebDataset loader, same shards, same run.

    uv run python bench/data.py [--samples 2048] [--workers 2] [--batch-size 64] [--rounds 3]

Shards: ``--samples`` 512x512 JPEGs (quality 90, 4:2:0, like most web images) of coloured 1/f
("pink") noise, whose spectrum falls off like a natural photo's, so the files are of realistic
size (about 60 KB) and decode like photos. They are written as files with caption sidecars and
turned into img2dataset shards by Tandem's own writer (``data/writer.py``).

Both loaders get open_clip's 224-px training transform (``image_transform(224, is_train=True)``),
open_clip's tokenizer, the same batch size and the same number of worker processes:

- open_clip: ``open_clip_train.data.get_wds_dataset`` exactly as its trainer builds it (full
  decode with webdataset's ``pilrgb``, its shuffle buffers, one epoch), with its maintainers' fix
  for the installed webdataset's end-of-shard marker (``eof_value=None``, open_clip #935).
- Tandem: ``data.pipeline.make_loader`` as the trainer builds it (draft decode at the smallest
  DCT scale still >= 224 px, i.e. 256 px for these images).

Each loader's time runs from the first batch after ``--workers`` warm-up batches (worker start and
shuffle-buffer fill are one-off costs) to the last; rounds alternate the two loaders so load from
other processes falls on both alike; each loader reports its best round, and the JSON also lists
the ratio of each round. On a shared machine wall-clock rates move with the neighbours' load, so the bench
also reports the CPU time (user + system, main and worker processes) per sample, which does not: the
work each loader does. ``raw_decode_per_s`` is a full PIL decode of the same JPEGs on one core, the
physical reference. The last line is JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore", category=UserWarning)

SIDE = 512
CROP = 224
EXPONENT = 1.5  # amplitude ~ 1/f^1.5 (power ~ 1/f^3): ~60 KB JPEGs at 512 px, q90, as web photos


def pink_noise(rng: np.random.Generator, side: int = SIDE) -> np.ndarray:
    """An RGB image whose amplitude spectrum falls as 1/f^EXPONENT, a little steeper than natural
    photographs' 1/f, so that its JPEGs are the size of web photos'."""
    fy = np.fft.fftfreq(side)[:, None]
    fx = np.fft.rfftfreq(side)[None, :]
    amplitude = np.maximum(np.hypot(fx, fy), 1.0 / side) ** -EXPONENT
    channels = []
    mix = rng.normal(size=(3, 3)) * 0.4 + np.eye(3)  # correlated colour channels, as in photos
    base = [np.fft.irfft2(amplitude * (rng.normal(size=amplitude.shape) + 1j * rng.normal(size=amplitude.shape)),
                          s=(side, side)) for _ in range(3)]
    for row in mix:
        channel = sum(w * b for w, b in zip(row, base))
        channel = (channel - channel.mean()) / (channel.std() + 1e-8)
        channels.append(channel * rng.uniform(35, 60) + rng.uniform(90, 165))
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def build_shards(folder: Path, samples: int, per_shard: int) -> list[str]:
    """JPEG files + captions -> shards with Tandem's writer; returns the shard paths."""
    from data.writer import WriteOptions, folder_rows, write_shards

    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    bases = max(1, samples // 8)
    for i in range(samples):
        if i < bases:
            pixels = pink_noise(rng)
            np.save(images / f"base{i}.npy", pixels)
        else:  # the 8 flips/rotations of each base image: distinct files, a quarter of the synthesis time
            pixels = np.load(images / f"base{i % bases}.npy")
            pixels = np.rot90(pixels, (i // bases) % 4)
            pixels = pixels[:, ::-1] if (i // bases) >= 4 else pixels
        Image.fromarray(np.ascontiguousarray(pixels)).save(images / f"{i:06d}.jpg", quality=90)
        (images / f"{i:06d}.txt").write_text(f"a photo of texture number {i} in soft colours")
    for npy in images.glob("*.npy"):
        npy.unlink()
    write_shards(folder_rows(images), str(folder / "shards"), WriteOptions(samples_per_shard=per_shard))
    return sorted(str(p) for p in (folder / "shards").glob("*.tar"))


def raw_decode_rate(folder: Path, count: int = 256) -> float:
    """Full PIL decodes per second of the 512-px JPEGs, one core."""
    blobs = [p.read_bytes() for p in sorted((folder / "images").glob("*.jpg"))[:count]]
    start = time.perf_counter()
    for blob in blobs:
        Image.open(io.BytesIO(blob)).convert("RGB").load()
    return len(blobs) / (time.perf_counter() - start)


def _cpu_seconds(workers: list) -> float:
    """CPU time (user + system) so far of this process and the loader's worker processes."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = sum(os.times()[:2])
    for worker in workers:
        fields = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def timed(iterator, batches: int | None, warmup: int, count, workers) -> tuple[float, float, int]:
    """(samples/s, CPU ms per sample, samples timed) after ``warmup`` batches of a DataLoader iterator.

    CPU time counts every process of the loader, so it measures the work per sample even when other
    processes on the machine take turns on the cores; wall-clock samples/s is what training sees.
    """
    samples, start, cpu = 0, 0.0, 0.0
    for index in count_up(batches):
        try:
            batch = next(iterator)
        except StopIteration:
            break
        if index == warmup:  # the clock starts once this batch is in: its samples are not counted
            start, cpu = time.perf_counter(), _cpu_seconds(workers())
        elif index > warmup:
            samples += count(batch)
    wall, cpu = time.perf_counter() - start, _cpu_seconds(workers()) - cpu
    return samples / wall, 1000 * cpu / samples, samples


def count_up(limit: int | None):
    index = 0
    while limit is None or index < limit:
        yield index
        index += 1


def run_open_clip(shards: list[str], args, transform, tok) -> tuple[float, float, int]:
    import functools

    import open_clip_train.data as oc_data
    from webdataset.tariterators import tar_file_expander

    # open_clip 3.x's group_by_keys_nothrow chokes on the end-of-shard marker that webdataset >= 0.2.96
    # yields (KeyError 'fname'); eof_value=None is the fix its maintainers give (open_clip #935,
    # webdataset #384). Set before the workers fork, so they inherit it; nothing else changes.
    oc_data.tar_file_expander = functools.partial(tar_file_expander, eof_value=None)
    from open_clip_train.data import get_wds_dataset

    folder = Path(shards[0]).parent
    pattern = f"{folder}/{{{Path(shards[0]).stem}..{Path(shards[-1]).stem}}}.tar"
    ns = SimpleNamespace(train_data=pattern, val_data=None, train_num_samples=None, dataset_resampled=False,
                         train_data_upsampling_factors=None, seed=0, batch_size=args.batch_size,
                         workers=args.workers, world_size=1, distributed=False)
    data = get_wds_dataset(ns, transform, is_train=True, epoch=0, tokenizer=tok)
    loader = data.dataloader.pipeline[0]  # WebLoader wraps a DataLoader, whose workers persist
    # the same number of batches as Tandem's (one epoch), so neither side's end-of-epoch drain is timed
    result = timed(iter(data.dataloader), args.samples // args.batch_size, args.workers, lambda b: b[0].shape[0],
                   lambda: loader._iterator._workers)
    del data
    return result


def run_tandem(shards: list[str], args, transform, tok) -> tuple[float, float, int]:
    from data.pipeline import StreamSpec, make_loader

    spec = StreamSpec(urls=shards, batch_size=args.batch_size, workers=args.workers, train=True)
    loader = make_loader(spec, transform, tok, CROP)
    batches = args.samples // args.batch_size  # one epoch, as open_clip's loader gives
    # DataLoader's own iterator, whose worker processes the CPU count reads (Tandem's loader wraps it in a
    # generator that turns a worker's error into its one line; the batches are the same)
    iterator = DataLoader.__iter__(loader)
    result = timed(iterator, batches, args.workers, lambda b: b["image"].shape[0], lambda: iterator._workers)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    import open_clip

    transform = open_clip.image_transform(CROP, is_train=True)
    tok = open_clip.get_tokenizer("ViT-B-32")
    with tempfile.TemporaryDirectory(prefix="tandem-bench-data-") as tmp:
        start = time.perf_counter()
        shards = build_shards(Path(tmp), args.samples, args.per_shard)
        sizes = [os.path.getsize(p) for p in shards]
        print(f"{len(shards)} shards, {args.samples} JPEGs of {SIDE}px, mean {sum(sizes) / args.samples / 1024:.1f}"
              f" KiB, built in {time.perf_counter() - start:.1f}s", flush=True)
        raw = raw_decode_rate(Path(tmp))
        print(f"raw PIL decode, one core: {raw:.1f} images/s", flush=True)
        rates: dict[str, list[float]] = {"tandem": [], "open_clip": []}
        cpu_ms: dict[str, list[float]] = {"tandem": [], "open_clip": []}
        for round_ in range(args.rounds):
            for name, run in (("open_clip", run_open_clip), ("tandem", run_tandem)):
                rate, cpu, counted = run(shards, args, transform, tok)
                rates[name].append(rate)
                cpu_ms[name].append(cpu)
                print(f"round {round_ + 1}: {name:9s} {rate:7.1f} samples/s, {cpu:5.2f} CPU ms/sample "
                      f"({counted} samples timed, load {os.getloadavg()[0]:.1f})", flush=True)
    tandem, peer = max(rates["tandem"]), max(rates["open_clip"])
    tandem_cpu, peer_cpu = min(cpu_ms["tandem"]), min(cpu_ms["open_clip"])
    result = {
        "samples_per_s": round(tandem, 1),
        "open_clip_samples_per_s": round(peer, 1),
        "ratio_vs_open_clip": round(tandem / peer, 2),
        "ratio_per_round": [round(t / o, 2) for t, o in zip(rates["tandem"], rates["open_clip"])],
        "cpu_ms_per_sample": round(tandem_cpu, 2),
        "open_clip_cpu_ms_per_sample": round(peer_cpu, 2),
        "cpu_ratio_vs_open_clip": round(peer_cpu / tandem_cpu, 2),
        "raw_decode_per_s": round(raw, 1),
        "tandem_per_raw_decode_core": round(tandem / raw, 2),
        "samples": args.samples, "workers": args.workers, "batch_size": args.batch_size,
        "image_px": SIDE, "crop_px": CROP, "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "cuda": torch.cuda.is_available(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
