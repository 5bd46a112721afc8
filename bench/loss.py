"""Peak memory and time of one forward + backward of each contrastive loss, 2 gloo ranks on CPU.

    uv run python bench/loss.py [--batches 4096,16384,65536] [--dim 256] [--tile-size T] [--rounds R]

Compared in the same run: Tandem's ``gather``, ``tiled`` and ``siglip`` and open_clip's
``ClipLoss(local_loss=True, gather_with_grad=True)``.

Memory: every (impl, global batch) pair runs in a fresh 2-process gloo group. Each rank builds its
inputs, runs one tiny step (thread pools, kernels and gloo buffers are runtime, not the loss),
resets its resident high-water mark (``/proc/self/clear_refs`` = 5), notes its resident size,
runs one step and reads ``VmHWM``: the peak is the growth over the inputs (which includes the
inputs' ``.grad``), the larger of the two ranks. Pairs whose estimated footprint exceeds the
available RAM are skipped and say so.

Time: for each batch up to 16,384 one group runs every implementation in turn, ``R`` rounds
(interleaved, so load from other processes falls on all of them alike), and reports each one's
median step. Above 16,384 the time is that of the memory step. Both ranks run one thread.

The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

warnings.filterwarnings("ignore", category=FutureWarning)  # open_clip's use of torch.distributed.nn
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORLD = 2
IMPLS = ("open_clip", "gather", "tiled", "siglip")
INTERLEAVED_UP_TO = 16384
MIB = 2**20


def _status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def estimate_bytes(impl: str, global_batch: int, dim: int, tile: int) -> int:
    """Rough per-rank footprint: the [B, N] matrices an implementation keeps, plus features."""
    rows = global_batch // WORLD
    features = 8 * global_batch * dim * 4
    if impl in ("open_clip", "gather"):
        # logits of both directions, their log-softmax saved for backward, and their gradients
        # (4.2 x one [B, N] fp32 matrix measured at 16,384)
        return int(4.5 * rows * global_batch * 4) + features
    return 4 * min(tile, rows) * min(tile, global_batch) * 4 + features


def _make_loss(impl: str, tile: int, rank: int):
    from training.losses import clip_loss, siglip_loss

    if impl == "open_clip":
        from open_clip.loss import ClipLoss

        loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=WORLD)
        return lambda x, y, s, b: loss(x, y, s)
    if impl == "siglip":
        return lambda x, y, s, b: siglip_loss(x, y, s, b, tile_size=tile)
    return lambda x, y, s, b: clip_loss(x, y, s, impl=impl, tile_size=tile)


def _inputs(rank: int, global_batch: int, dim: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    rows = global_batch // WORLD
    image = F.normalize(torch.randn(rows, dim, generator=g), dim=-1).requires_grad_()
    text = F.normalize(image.detach() + torch.randn(rows, dim, generator=g), dim=-1).requires_grad_()
    return [image, text, torch.tensor(math.log(1 / 0.07), requires_grad=True), torch.tensor(-10.0, requires_grad=True)]


def _step(loss_fn, inputs: list[torch.Tensor]) -> float:
    image, text, log_scale, bias = inputs
    for t in inputs:
        t.grad = None
    dist.barrier()
    start = time.perf_counter()
    loss_fn(image, text, log_scale.exp(), bias).backward()
    dist.barrier()
    return time.perf_counter() - start


def _init(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _memory_worker(rank: int, port: int, impl: str, global_batch: int, dim: int, tile: int, out) -> None:
    _init(rank, port)
    try:
        loss_fn = _make_loss(impl, tile, rank)
        inputs = _inputs(rank, global_batch, dim)
        small = [t[:64].detach().clone().requires_grad_() if t.dim() else t for t in inputs]
        _step(loss_fn, small)
        _reset_peak()
        baseline = _status("VmRSS")
        seconds = _step(loss_fn, inputs)
        out[rank] = (_status("VmHWM") - baseline, seconds)
    finally:
        dist.destroy_process_group()


def _time_worker(rank: int, port: int, impls: list[str], global_batch: int, dim: int, tile: int, rounds: int,
                 out) -> None:
    _init(rank, port)
    try:
        inputs = _inputs(rank, global_batch, dim)
        losses = {impl: _make_loss(impl, tile, rank) for impl in impls}
        for fn in losses.values():  # warm-up, untimed
            _step(fn, [t[:64].detach().clone().requires_grad_() if t.dim() else t for t in inputs])
        times: dict[str, list[float]] = {impl: [] for impl in impls}
        for _ in range(rounds):
            for impl, fn in losses.items():
                times[impl].append(_step(fn, inputs))
        out[rank] = {impl: statistics.median(t) for impl, t in times.items()}
    finally:
        dist.destroy_process_group()


def _spawn(worker, *args) -> dict:
    from training.launch import free_port

    out = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), *args, out), nprocs=WORLD, join=True)
    return dict(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="4096,16384,65536", help="global batch sizes, comma-separated")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--tile-size", type=int, default=None, help="default: the loss default")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per batch <= 16,384")
    args = parser.parse_args(argv)
    from training.losses import DEFAULT_TILE_SIZE

    tile = args.tile_size or DEFAULT_TILE_SIZE
    impls = args.impls.split(",")
    _reset_peak()  # fail early where clear_refs is not available
    results: dict[tuple[str, int], dict] = {}
    print(f"world {WORLD} (gloo, 1 thread per rank), D {args.dim}, fp32, tile {tile}; peak = per-rank resident "
          f"high-water mark over the inputs; time = forward + backward, median of {args.rounds} interleaved rounds "
          f"up to {INTERLEAVED_UP_TO:,}, one step above", flush=True)
    print(f"{'impl':>10} {'global batch':>12} {'peak MiB/rank':>14} {'s/step':>8}", flush=True)
    for batch in (int(b) for b in args.batches.split(",")):
        fitting = []
        for impl in impls:
            need = WORLD * estimate_bytes(impl, batch, args.dim, tile)
            available = _available_bytes()
            if need > 0.7 * available:
                print(f"{impl:>10} {batch:>12,} {'skipped':>14} {'-':>8}   (needs ~{need / 2**30:.0f} GiB for "
                      f"{WORLD} ranks, {available / 2**30:.0f} GiB available)", flush=True)
                continue
            fitting.append(impl)
            out = _spawn(_memory_worker, impl, batch, args.dim, tile)
            results[(impl, batch)] = {"peak_mib": max(out[r][0] for r in out) / MIB,
                                      "time_s": max(out[r][1] for r in out)}
        if batch <= INTERLEAVED_UP_TO and fitting:
            out = _spawn(_time_worker, fitting, batch, args.dim, tile, args.rounds)
            for impl in fitting:
                results[(impl, batch)]["time_s"] = max(out[r][impl] for r in out)
        for impl in fitting:
            r = results[(impl, batch)]
            print(f"{impl:>10} {batch:>12,} {r['peak_mib']:>14.1f} {r['time_s']:>8.3f}", flush=True)

    def get(impl, batch, key):
        return results.get((impl, batch), {}).get(key)

    summary = {"world": WORLD, "dim": args.dim, "tile_size": tile}
    summary |= {f"{impl}_{key}_at_{batch}": round(value, 3) for (impl, batch), r in results.items()
                for key, value in r.items()}
    tiled_65k, tiled_16k = get("tiled", 65536, "peak_mib"), get("tiled", 16384, "peak_mib")
    summary["tiled_peak_mib_at_65536"] = round(tiled_65k, 1) if tiled_65k else None
    summary["tiled_peak_growth_16k_to_65k"] = round(tiled_65k / tiled_16k, 3) if tiled_65k and tiled_16k else None
    t_tiled, t_open = get("tiled", 16384, "time_s"), get("open_clip", 16384, "time_s")
    summary["tiled_vs_open_clip_time_ratio"] = round(t_tiled / t_open, 3) if t_tiled and t_open else None
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
