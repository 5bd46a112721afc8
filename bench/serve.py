"""Serving throughput: /v1/classify under concurrent load, against two peers measured in the same run.

A randomly initialised open_clip ViT-B-32 (realistic size: 88M parameters, 224 px) is exported in
Tandem's format to a temporary directory and served by ``tandem serve`` on 127.0.0.1. Clients send
one 224-px JPEG per request with a fixed set of 100 labels, at concurrency 1, 8 and 32. The peers:

- the engine's offline batched throughput (preprocessed images, batches of ``max_batch_size``, no
  HTTP), which cross-request batching should approach under load;
- the same server with batching off (``--max-batch-size 1``), i.e. one request at a time.

Prints one line per measurement and, last, a JSON line with ``rps_c32``, ``p99_ms_c32``,
``ratio_vs_offline`` and ``ratio_vs_one_at_a_time``. The machine may be shared with other work, which
can only slow a measurement down: every figure is measured in three parts and the best part counts
(``rps_overall_*`` is the plain total), the parts of the three peers at concurrency 32 are
interleaved so they see the same conditions, and ``load_avg`` (start, end) is in the JSON. Last, a
60-second load at concurrency 8 samples the batched server's resident memory every second
(``soak_rss_*``: it should stay flat).

    uv run python bench/serve.py [--requests 192] [--threads N] [--model ViT-B-32] [--precision fp32|bf16]

``--precision`` applies to all three peers alike (the servers' flag, the offline engine's autocast).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SEGMENTS = 3  # each load is run in 3 parts; req/s is the best part's (other processes only slow one down)

LABELS = [f"{color} {thing}" for color in ("red", "green", "blue", "yellow", "black", "white", "brown", "grey",
                                           "orange", "purple")
          for thing in ("cat", "dog", "car", "house", "tree", "bird", "boat", "chair", "flower", "plane")]


def export_random(name: str, out: Path) -> Path:
    """The named model (open_clip's or Tandem's config), randomly initialised, in Tandem's export format."""
    from training.export import export_state_dict
    from training.model import create_model, preprocess_config
    from training.model_config import named_model_config

    torch.manual_seed(0)
    model_cfg = named_model_config(name)
    if model_cfg is None:
        raise SystemExit(f"unknown model {name!r}")
    model = create_model(model_cfg)
    return export_state_dict(model.state_dict(), model_cfg, preprocess_config(model_cfg), out)


def jpegs(count: int, size: int = 224) -> list[bytes]:
    """Smooth random scenes (gradients and blobs) so the JPEGs have a photo-like size, ~10-20 kB."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        y, x = np.mgrid[0:size, 0:size] / size
        channels = [np.sin(rng.uniform(1, 8) * x + rng.uniform(0, 6)) * np.cos(rng.uniform(1, 8) * y)
                    for _ in range(3)]
        pixels = ((np.stack(channels, -1) + 1) * 127 + rng.normal(0, 6, (size, size, 3))).clip(0, 255)
        buffer = io.BytesIO()
        Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


class Offline:
    """The engine alone, in this process: decode once, then embed + classify batches, no HTTP."""

    def __init__(self, export: Path, images: list[bytes], precision: str = "fp32") -> None:
        from serving.decode import image_tensor
        from serving.engine import ensemble, load_engine, prompts

        self.engine = load_engine(str(export), device="cpu", precision=precision)
        self.labels = ensemble(self.engine.encode_texts(prompts(LABELS, ["a photo of a {}."])), 1)
        self.tensors = [image_tensor(data, self.engine.transform, self.engine.image_size, 10**8) for data in images]

    def images_per_s(self, batch_size: int, seconds: float = 4.0) -> float:
        """At least two batches and ``seconds``, after a warm-up batch."""
        batch = torch.stack([self.tensors[i % len(self.tensors)] for i in range(batch_size)])
        result = []

        def run() -> None:
            self.engine.classify(self.engine.encode_images(batch), self.labels)
            done, start = 0, time.perf_counter()
            while done < 2 * batch_size or time.perf_counter() - start < seconds:
                self.engine.classify(self.engine.encode_images(batch), self.labels)
                done += batch_size
            result.append(done / (time.perf_counter() - start))

        # On a thread of its own, as the server runs its forward passes: on this VM the main
        # thread's forward passes measured several times slower than another thread's.
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
        return result[0]


class Server:
    """``tandem serve`` in a subprocess, ready when /readyz says so."""

    def __init__(self, export: Path, port: int, threads: int, max_batch_size: int, max_wait_ms: float,
                 precision: str = "fp32") -> None:
        command = [sys.executable, "-m", "training.cli", "serve", "--model", str(export), "--port", str(port),
                   "--device", "cpu", "--threads", str(threads), "--max-batch-size", str(max_batch_size),
                   "--max-wait-ms", str(max_wait_ms), "--precision", precision]
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited:\n{self.log.read()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not become ready")

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


def load(url: str, bodies: list[bytes], concurrency: int, requests: int) -> tuple[float, list[float]]:
    """``requests`` POSTs from ``concurrency`` clients, each sending its next one on a response.

    Returns (wall seconds, per-request latencies in seconds). The clients are made before the clock
    starts: making one costs tens of milliseconds of this process's CPU, which at concurrency 32
    would be counted against the server in every part.
    """
    latencies: list[float] = []
    lock, taken = threading.Lock(), [0]

    def client(http: httpx.Client) -> None:
        while True:
            with lock:
                if taken[0] >= requests:
                    return
                number = taken[0]
                taken[0] += 1
            start = time.perf_counter()
            response = http.post("/v1/classify", content=bodies[number % len(bodies)],
                                 headers={"content-type": "application/json"})
            elapsed = time.perf_counter() - start
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
            with lock:
                latencies.append(elapsed)

    clients = [httpx.Client(base_url=url, timeout=600) for _ in range(concurrency)]
    threads = [threading.Thread(target=client, args=(http,)) for http in clients]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    for http in clients:
        http.close()
    if len(latencies) != requests:
        raise RuntimeError(f"only {len(latencies)} of {requests} requests succeeded")
    return wall, latencies


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def soak(server: "Server", bodies: list[bytes], concurrency: int, seconds: float) -> dict[str, float]:
    """``concurrency`` clients for ``seconds``, sampling the server's resident memory every second.

    The first tenth of the samples is the start (allocator pools and caches filled by then); the
    growth is the last sample over the start.
    """
    stop = time.monotonic() + seconds
    done, failures, lock = [0], [], threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=600) as http:
            number = 0
            while time.monotonic() < stop:
                response = http.post("/v1/classify", content=bodies[number % len(bodies)],
                                     headers={"content-type": "application/json"})
                number += 1
                with lock:
                    if response.status_code == 200:
                        done[0] += 1
                    else:
                        failures.append(response.status_code)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    samples = []
    while time.monotonic() < stop:
        samples.append(rss_mib(server.proc.pid))
        time.sleep(1.0)
    for thread in threads:
        thread.join()
    samples.append(rss_mib(server.proc.pid))
    if failures:
        raise RuntimeError(f"{len(failures)} soak requests failed: {sorted(set(failures))}")
    start = max(samples[: max(len(samples) // 10, 1)])
    return {"soak_seconds": seconds, "soak_requests": done[0], "soak_rss_start_mib": round(start, 1),
            "soak_rss_end_mib": round(samples[-1], 1), "soak_rss_max_mib": round(max(samples), 1),
            "soak_rss_growth_mib": round(samples[-1] - start, 1)}


def summary(walls: list[tuple[int, float]], latencies: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies) * 1000
    return {"rps": max(n / wall for n, wall in walls), "rps_overall": len(latencies) / sum(w for _, w in walls),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def batches(url: str) -> tuple[float, float]:
    """(images, forward passes) of the server's image batches so far, from /metrics."""
    values = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        for name in ("sum", "count"):
            if line.startswith(f'tandem_serve_batch_size_{name}{{kind="image"}}'):
                values[name] = float(line.rsplit(" ", 1)[1])
    return values.get("sum", 0.0), values.get("count", 0.0)


def main(argv: list[str] | None = None) -> int:
    from serving.settings import PRECISIONS
    from training.launch import free_port

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32", help="model config, randomly initialised (tandem-tiny: a quick run)")
    parser.add_argument("--requests", type=int, default=192, help="requests at concurrency 32 (8: a third, 1: 12)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of the model")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="of every peer alike")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--offline-seconds", type=float, default=4.0, help="each offline measurement's length")
    parser.add_argument("--soak-seconds", type=float, default=60.0,
                        help="then a load of this length at concurrency 8 on the batched server, its memory sampled")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started, load_start = time.time(), os.getloadavg()[0]
    images = jpegs(16)
    bodies = [json.dumps({"images": [base64.b64encode(j).decode()], "labels": LABELS, "top_k": 5}).encode()
              for j in images]
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        export = export_random(args.model, Path(tmp) / "model")
        batched = Server(export, free_port(), args.threads, args.max_batch_size, args.max_wait_ms, args.precision)
        single = Server(export, free_port(), args.threads, 1, 0, args.precision)
        try:
            for server in (batched, single):
                load(server.url, bodies, 1, 2)  # label-set embeddings cached, first forwards done
            offline = Offline(export, images, args.precision)
            for concurrency, requests in ((1, 12), (8, max(args.requests // 3, 8))):
                load(batched.url, bodies, concurrency, concurrency)  # warm-up round, not counted
                runs = [load(batched.url, bodies, concurrency, requests // SEGMENTS) for _ in range(SEGMENTS)]
                figures = summary([(len(t), w) for w, t in runs], [x for _, t in runs for x in t])
                report(f"batched server, concurrency {concurrency:2d}", figures)
                result.update({f"{key}_c{concurrency}": round(value, 2) for key, value in figures.items()})

            # The peers at concurrency 32, interleaved part by part so they share the machine's
            # conditions: batched server, one-at-a-time server, the engine offline at both batch sizes.
            load(batched.url, bodies, 32, 32)
            load(single.url, bodies, 32, 32)
            parts: dict[str, list] = {"batched": [], "single": [], "offline": [], "offline1": []}
            before = batches(batched.url)
            for _ in range(SEGMENTS):
                parts["batched"].append(load(batched.url, bodies, 32, args.requests // SEGMENTS))
                parts["single"].append(load(single.url, bodies, 32, args.requests // SEGMENTS))  # the same load
                parts["offline"].append(offline.images_per_s(args.max_batch_size, args.offline_seconds))
                parts["offline1"].append(offline.images_per_s(1, args.offline_seconds))
            images_in, passes = (a - b for a, b in zip(batches(batched.url), before))
            if args.soak_seconds > 0:
                result.update(soak(batched, bodies, 8, args.soak_seconds))
                print(f"soak: {result['soak_requests']} requests in {args.soak_seconds:.0f} s at concurrency 8, "
                      f"server RSS {result['soak_rss_start_mib']:.0f} -> {result['soak_rss_end_mib']:.0f} MiB "
                      f"(max {result['soak_rss_max_mib']:.0f})", flush=True)
        finally:
            batched.close()
            single.close()

    c32 = summary([(len(t), w) for w, t in parts["batched"]], [x for _, t in parts["batched"] for x in t])
    c32["mean_batch"] = images_in / max(passes, 1)
    report("batched server, concurrency 32", c32)
    baseline = summary([(len(t), w) for w, t in parts["single"]], [x for _, t in parts["single"] for x in t])
    report("one-at-a-time server (max batch 1), concurrency 32", baseline)
    best_offline, best_offline1 = max(parts["offline"]), max(parts["offline1"])
    print(f"offline engine: {best_offline:.1f} images/s at batch {args.max_batch_size}, "
          f"{best_offline1:.1f} at batch 1", flush=True)
    result.update({f"{key}_c32": round(value, 2) for key, value in c32.items()})
    result.update({
        "offline_images_per_s": round(best_offline, 2),
        "offline_images_per_s_batch1": round(best_offline1, 2),
        "rps_one_at_a_time_c32": round(baseline["rps"], 2),
        "p99_ms_one_at_a_time_c32": round(baseline["p99_ms"], 1),
        "ratio_vs_offline": round(c32["rps"] / best_offline, 3),
        "ratio_vs_one_at_a_time": round(c32["rps"] / baseline["rps"], 3),
        "model": f"{args.model} (random init)", "device": "cpu", "precision": args.precision,
        "torch_threads": args.threads,
        "max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
        "load_avg": [round(load_start, 2), round(os.getloadavg()[0], 2)], "cpu_count": os.cpu_count(),
        "seconds": round(time.time() - started, 1),
    })
    print(json.dumps(result))
    return 0


def report(what: str, figures: dict[str, float]) -> None:
    batch = f", mean batch {figures['mean_batch']:.1f}" if "mean_batch" in figures else ""
    print(f"{what}: {figures['rps']:.1f} req/s (overall {figures['rps_overall']:.1f}), p50 {figures['p50_ms']:.0f} ms, "
          f"p99 {figures['p99_ms']:.0f} ms{batch}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
