"""Prometheus metrics of the server, in a registry of its own (one per app, so tests can make many).

Every request is counted by route template and status; latency is recorded per route and per
stage (decode -> predict -> encode); the batcher reports its batch sizes and queue depths.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tandem_serve_requests", "HTTP requests by route template and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("tandem_serve_request_seconds", "Whole-request latency",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.stage_latency = Histogram("tandem_serve_stage_seconds", "Latency of decode, predict and encode",
                                       ["route", "stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("tandem_serve_batch_size", "Items per forward pass of the batcher",
                                    ["kind"], buckets=BATCH_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("tandem_serve_queue_depth", "Items waiting for the model thread",
                                 ["kind"], registry=self.registry)
        self.label_cache = Counter("tandem_serve_label_cache", "Label-set embedding cache lookups",
                                   ["result"], registry=self.registry)
        self.ready = Gauge("tandem_serve_ready", "1 once the model (and index) are loaded",
                           registry=self.registry)
        self.waiting = Gauge("tandem_serve_waiting_for_model",
                             "1 while --wait-for-model waits for the export (training has not written it yet)",
                             registry=self.registry)

    @contextmanager
    def stage(self, route: str, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage_latency.labels(route, stage).observe(time.perf_counter() - start)

    def on_batch(self, kind: str, size: int) -> None:
        self.batch_size.labels(kind).observe(size)

    def on_depth(self, kind: str, depth: int) -> None:
        self.queue_depth.labels(kind).set(depth)
