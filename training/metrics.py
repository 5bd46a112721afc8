"""Per-step metrics: JSON lines in the run directory, Prometheus on rank 0, a progress display.

Only rank 0 records; the values it records are already averaged over ranks by the trainer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from training.errors import UserError

log = logging.getLogger(__name__)

GAUGES = {
    "loss": "Contrastive loss of the last step, averaged over ranks.",
    "temperature": "Softmax temperature T: CLIP's learned 1 / exp(logit_scale), an image-only method's fixed one.",
    "logit_scale": "CLIP's learned softmax scale exp(logit_scale) = 1 / temperature.",
    "lr": "Learning rate of the last step.",
    "samples_per_s": "Global training throughput since the previous log line, checkpoints and evaluations excluded.",
    "data_wait_s": "Seconds the last step waited for its batch, averaged over ranks.",
    "step": "Optimizer steps completed.",
    # image-only methods (training/unimodal): the collapse monitor
    "embedding_std": "Per-dimension std of the L2-normalised embeddings x sqrt(dim): ~1 spread, 0 collapsed.",
    "effective_rank": "Effective rank (RankMe) of the normalised embeddings of the last step.",
    "collapsed": "1 when embedding_std is below method.collapse_threshold.",
}


class Throughput:
    """Samples per second over the steps since the last reading.

    Read it after the loss has been copied to the host: on a GPU a step's own wall time counts the
    kernels it queued, not the kernels run, so only a window that ends at a host sync measures work.
    """

    def __init__(self, samples_per_step: int, clock=time.perf_counter):
        self.samples_per_step, self.clock = samples_per_step, clock
        self.restart()

    def restart(self) -> None:
        """Opens a new window: at each reading, and after a pause that is not training (a
        checkpoint, an evaluation)."""
        self.start, self.steps = self.clock(), 0

    def step(self) -> None:
        self.steps += 1

    def read(self) -> float:
        """The window's rate; opens the next window."""
        rate = self.samples_per_step * self.steps / max(self.clock() - self.start, 1e-9)
        self.restart()
        return rate


def drop_records_after(path: Path, step: int) -> None:
    """Remove the records of steps after ``step`` from a ``.jsonl`` log: a run resumed at ``step``
    trains those steps again, and would otherwise log each of them twice. Rewritten atomically."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _step_of(line) <= step]
    if len(kept) < len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)


def _step_of(line: str) -> float:
    try:
        return float(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return math.inf  # a line cut off by a kill mid-write: dropped with the steps after the checkpoint


class MetricsLogger:
    """Writes ``metrics.jsonl``, serves ``/metrics`` when ``port`` is set, and shows progress.

    Only the recording process (rank 0) has the training gauges. A process that records nothing but
    is given ``rank`` (the first process of another node) answers on the port too, with
    ``tandem_train_rank`` alone: under elastic training any pod may hold rank 0, so every pod is
    scraped, and one whose port refused the scrape would be a target down for the whole run.
    """

    def __init__(self, run_dir: Path, *, total_steps: int, start_step: int = 0, port: int = 0, enabled: bool = True,
                 rank: int | None = None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.server = None
        # another node's first process opens its endpoint at its first log() call: the step before it
        # ended in a collective, so rank 0 has its port by then, even with two "nodes" on one host
        self.rank_only = (port, rank) if not enabled and port and rank is not None else None
        if not enabled:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        if start_step:
            drop_records_after(self.path, start_step)
        self.registry = CollectorRegistry()
        # Each gauge appears with its first value: a CLIP run has no collapse monitor and BYOL no
        # temperature, and a gauge left at 0 would say "collapsed" or "T = 0". The step is there from
        # the start, so a run that hangs before its first step still shows as stalled.
        self.gauges = {"step": self._gauge("step")}
        self.gauges["step"].set(start_step)
        self.skipped = Counter("tandem_train_skipped_samples", "Samples skipped as corrupt or incomplete.",
                               registry=self.registry)
        self._rank_gauge(self.registry, 0 if rank is None else rank)
        if port:
            try:
                self.server, _ = start_http_server(port, registry=self.registry)
            except OSError as error:
                raise UserError(f"train.metrics_port {port} cannot be served: {error.strerror or error} "
                                "(another run on this node may hold it; pick another port or 0)") from None
            log.info("Prometheus metrics on port %d", port)
        self.bar = self._progress_bar(start_step)
        self.every = max(1, total_steps // 20)

    @staticmethod
    def _rank_gauge(registry: CollectorRegistry, rank: int) -> None:
        Gauge("tandem_train_rank", "Global rank of the process serving this endpoint (0 records the run).",
              registry=registry).set(rank)

    def _serve_rank_only(self, port: int, rank: int) -> None:
        registry = CollectorRegistry()
        self._rank_gauge(registry, rank)
        try:
            self.server, _ = start_http_server(port, registry=registry)
        except OSError as error:  # best effort: this endpoint only keeps the target up
            log.warning("train.metrics_port %d cannot be served by rank %d: %s", port, rank, error.strerror or error)

    def _gauge(self, key: str) -> Gauge:
        return Gauge(f"tandem_train_{key}", GAUGES[key], registry=self.registry)

    def _progress_bar(self, start_step: int):
        if not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, values: dict[str, Any], skipped: int = 0) -> None:
        if self.rank_only:
            self._serve_rank_only(*self.rank_only)
            self.rank_only = None
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if key in GAUGES:
                if key not in self.gauges:
                    self.gauges[key] = self._gauge(key)
                self.gauges[key].set(value)
        self.gauges["step"].set(step)
        if skipped:
            self.skipped.inc(skipped)
        self._show(step, values)

    def _show(self, step: int, values: dict[str, Any]) -> None:
        temperature = f"  T {values['temperature']:.3g}" if "temperature" in values else ""
        summary = f"loss {values['loss']:.4f}{temperature}  {values['samples_per_s']:.0f} samples/s"
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix_str(summary)
        elif step % self.every == 0 or step == self.total_steps:
            print(f"step {step}/{self.total_steps}  {summary}", flush=True)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()  # the port is free again (once forked loader workers have exited)
        if self.enabled and self.bar is not None:
            self.bar.close()
