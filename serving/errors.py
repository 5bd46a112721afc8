"""Errors a client can cause, each with its HTTP status, and the JSON they are answered with.

Every error body is ``{"error": {"code": "...", "message": "..."}}``; a client's mistake is a 4xx,
and a 5xx means a bug in the server (the catch-all handler logs it and still answers JSON).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ServingError(Exception):
    """Base of the errors with a status; ``code`` is a stable machine-readable name."""

    status = 400
    code = "bad_request"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers


class BadInput(ServingError):
    """The request is well-formed JSON but cannot be served (undecodable image, bad dimension...)."""

    status, code = 400, "bad_input"


class Unauthorized(ServingError):
    status, code = 401, "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class TooLarge(ServingError):
    """A body over the byte limit, or an image over the pixel cap (a decompression bomb)."""

    status, code = 413, "too_large"


class NotReady(ServingError):
    status, code = 503, "not_ready"


def error_body(code: str, message: str, **extra) -> dict:
    return {"error": {"code": code, "message": message, **extra}}


def install_handlers(app: FastAPI) -> None:
    """Answer every error as JSON in one shape."""

    @app.exception_handler(ServingError)
    async def _serving(_: Request, error: ServingError) -> JSONResponse:
        return JSONResponse(error_body(error.code, error.message), error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in error.errors()]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(part) for part in first["loc"] if part != "body") or "body"
        return JSONResponse(error_body("invalid_request", f"{where}: {first['msg']}", details=details), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(f"http_{error.status_code}", str(error.detail)), error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body("internal", f"internal error ({type(error).__name__})"), 500)
