"""Cross-request dynamic batching on one dedicated model thread.

Requests put items (one image tensor, one text) into a per-kind queue and wait on a future. The model
thread takes the kind whose oldest item has waited longest, waits at most ``max_wait_ms`` after that
item arrived for the batch to fill up to ``max_batch_size``, and runs one forward pass for all of
them. Under load the queue fills while the previous batch runs, so batches are full without waiting;
when idle a lone request waits ``max_wait_ms`` at most. The event loop never runs a forward pass.

One thread for all kinds is deliberate: two concurrent forward passes on the same cores would only
fight over them. Should that thread ever stop (an error outside a batch's handler), ``failure``
says why, everything queued and submitted later fails with ``ModelStopped`` (503), and the
server's health probes report it, so the orchestrator restarts the process rather than leave
requests waiting forever.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from serving.errors import NotReady

log = logging.getLogger(__name__)

CALL = "call"  # a kind of its own: one callable run alone (e.g. a chunk of label prompts)


@dataclass
class _Item:
    payload: Any
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


class ShuttingDown(NotReady):
    """Work submitted to, or still queued in, a batcher that is closing (answered 503)."""


class ModelStopped(NotReady):
    """Work submitted to, or still queued in, a batcher whose model thread has stopped (answered 503)."""

    code = "model_stopped"


class Batcher:
    """Groups concurrent items of one kind into one call of ``handlers[kind](payloads) -> results``.

    Args:
        handlers: per kind, a function from a list of payloads to a list of as many results.
        max_batch_size: the most items in one call (1 turns batching off).
        max_wait_ms: how long the oldest waiting item may wait for the batch to fill.
        on_batch: called with (kind, size) for every batch run (metrics).
        on_depth: called with (kind, queued items) whenever a queue changes (metrics).
    """

    def __init__(self, handlers: dict[str, Callable[[list], Sequence]], *, max_batch_size: int = 32,
                 max_wait_ms: float = 5.0, on_batch: Callable[[str, int], None] | None = None,
                 on_depth: Callable[[str, int], None] | None = None) -> None:
        if max_batch_size < 1 or not (0 <= max_wait_ms < math.inf):
            raise ValueError("max_batch_size must be >= 1 and max_wait_ms finite and >= 0")
        self.handlers = dict(handlers)
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self._on_batch = on_batch or (lambda kind, size: None)
        self._on_depth = on_depth or (lambda kind, depth: None)
        self._queues: dict[str, deque[_Item]] = {kind: deque() for kind in [*self.handlers, CALL]}
        self._cond = threading.Condition()
        self._closed = False
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._run, name="tandem-model", daemon=True)
        self._thread.start()

    def submit(self, kind: str, payloads: Sequence[Any]) -> list[Future]:
        """Queue one request's items together (they stay in order and usually share a batch)."""
        if kind not in self.handlers:
            raise KeyError(f"no handler for kind '{kind}'")
        items = [_Item(p) for p in payloads]
        self._put(kind, items)
        return [item.future for item in items]

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the model thread, alone, in arrival order with the batches."""
        item = _Item(fn)
        self._put(CALL, [item])
        return item.future

    def close(self, timeout: float = 30.0) -> None:
        """Stop taking work, finish the batch in flight, and fail whatever is still queued."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self._fail_queued(ShuttingDown("server is shutting down"))

    def _fail_queued(self, error: Exception) -> None:
        with self._cond:
            taken = [(kind, list(queue)) for kind, queue in self._queues.items()]
            for queue in self._queues.values():
                queue.clear()
        for _, items in taken:
            for item in items:
                if item.future.set_running_or_notify_cancel():
                    item.future.set_exception(error)
        for kind, _ in taken:  # after every future is answered, whatever the callback does
            self._on_depth(kind, 0)

    def _put(self, kind: str, items: list[_Item]) -> None:
        with self._cond:
            if self.failure is not None:
                raise ModelStopped(self.failure)
            if self._closed:
                raise ShuttingDown("server is shutting down")
            self._queues[kind].extend(items)
            self._on_depth(kind, len(self._queues[kind]))
            self._cond.notify_all()

    def _next_batch(self) -> tuple[str, list[_Item]] | None:
        with self._cond:
            while not self._closed and not any(self._queues.values()):
                self._cond.wait()
            if self._closed:
                return None
            kind = min((q[0].arrived, k) for k, q in self._queues.items() if q)[1]
            queue = self._queues[kind]
            limit = 1 if kind == CALL else self.max_batch_size
            deadline = queue[0].arrived + self.max_wait
            while len(queue) < limit and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, threading.TIMEOUT_MAX))
            count = min(limit, len(queue))
            self._on_depth(kind, len(queue) - count)  # first: should it raise, the items are still queued
            taken = [queue.popleft() for _ in range(count)]
        # A request whose client went away cancelled its futures: skip its items.
        return kind, [item for item in taken if item.future.set_running_or_notify_cancel()]

    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                self._process(*batch)
        except BaseException as error:  # noqa: BLE001 - reported by failure and the health probes
            log.exception("the model thread stopped")
            with self._cond:
                self.failure = f"model thread stopped ({type(error).__name__}: {error}); restart the server"
                self._closed = True
            self._fail_queued(ModelStopped(self.failure))

    def _process(self, kind: str, items: list[_Item]) -> None:
        if not items:
            return
        try:
            if kind == CALL:
                results = [items[0].payload()]
            else:
                self._on_batch(kind, len(items))
                results = self.handlers[kind]([item.payload for item in items])
                if len(results) != len(items):
                    raise RuntimeError(f"handler '{kind}' returned {len(results)} results for {len(items)}")
        except BaseException as error:  # noqa: BLE001 - handed to the waiting requests, never kills the thread
            for item in items:
                item.future.set_exception(error)
            return
        for item, result in zip(items, results):
            item.future.set_result(result)
