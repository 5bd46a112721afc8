"""ASGI middleware: request metrics by route template, and the request body limit."""

from __future__ import annotations

import time

from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.metrics import ServingMetrics

# Label values stay a fixed set: any other method a client invents is counted as "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
CLIENT_CLOSED = "499"  # nginx's status for a client that went away before any response was sent


class MetricsMiddleware:
    """Counts every response (including the body limit's 413s and auth's 401s) by route template.

    A request that ends with no response started is a 500 if the app raised, else (or when the
    client's disconnect was the error) the client went away: ``CLIENT_CLOSED``, not a server error.
    """

    def __init__(self, app: ASGIApp, metrics: ServingMetrics, routes: list) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    def _route(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None:
            return route.path
        for candidate in self.routes:
            if candidate.matches(scope)[0] == Match.FULL:
                return candidate.path
        return "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), CLIENT_CLOSED

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = str(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception as error:  # a cancellation (BaseException) is a client gone too
            if status == CLIENT_CLOSED and not isinstance(error, ClientDisconnect):
                status = "500"
            raise
        finally:
            route, method = self._route(scope), scope["method"]
            self.metrics.requests.labels(route, method if method in METHODS else "other", status).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes``, by Content-Length or by counting a chunked upload."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def _reject(self, send: Send) -> None:
        body = (b'{"error":{"code":"too_large","message":"request body over the limit of %d bytes"}}'
                % self.max_bytes)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            too_big = declared is not None and int(declared) > self.max_bytes
        except ValueError:
            too_big = False
        if too_big:
            await self._reject(send)
            return
        # Read the whole body here (the JSON routes need all of it anyway) so an over-long chunked
        # upload is refused before any route sees it, then replay it.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
