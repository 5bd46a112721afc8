"""The FastAPI app: thin routes over ``serving.service`` (decode -> predict -> encode).

The model (and index) load in the app's lifespan, on a thread, while the server already answers:
``/healthz`` is 200 from the start and ``/readyz`` is 503 until loading has finished, so an
orchestrator neither kills a pod that is loading a large model nor sends it traffic too early. Both
are 503 once loading has failed or the model thread has stopped: the pod is restarted.
"""

# No ``from __future__ import annotations``: FastAPI reads the routes' annotations at runtime, and
# they name types local to create_app.
import asyncio
import errno
import hmac
import json
import logging
import socket
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Callable

import torch
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from serving import schemas
from serving.batcher import ModelStopped
from serving.engine import Engine, export_complete, load_engine
from serving.errors import BadInput, NotReady, TooLarge, Unauthorized, install_handlers
from serving.index import Index
from serving.metrics import ServingMetrics
from serving.middleware import BodyLimitMiddleware, MetricsMiddleware
from serving.service import Service
from serving.settings import MAX_BODY_MB, ServeSettings
from training.errors import UserError

log = logging.getLogger(__name__)

Loader = Callable[[], tuple[Engine, Index | None]]
WAIT_POLL_S = 5.0  # how often --wait-for-model looks for the export
ERRORS = {code: {"model": schemas.ErrorResponse} for code in (400, 401, 404, 413, 422, 503)}


def load_model_and_index(settings: ServeSettings) -> tuple[Engine, Index | None]:
    """The default loader: the model from ``settings.model`` and the index from ``settings.index``."""
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    engine = load_engine(settings.model, settings.weights, settings.device, settings.precision)
    index = Index(settings.index, nprobe=settings.nprobe, ef_search=settings.ef_search) if settings.index else None
    if index is not None and index.dim != engine.embed_dim:  # checked at start-up unless the model came later
        raise UserError(f"index {settings.index} holds {index.dim}-d embeddings, the model's are {engine.embed_dim}-d")
    log.info("loaded %s (dim %d, image %dpx, %s, %s)%s", settings.model, engine.embed_dim, engine.image_size,
             engine.device, engine.precision, f" and index {settings.index} ({index.count} items, mmap={index.mmapped})"
             if index else "")
    return engine, index


class AppState:
    def __init__(self, settings: ServeSettings, metrics: ServingMetrics) -> None:
        self.settings, self.metrics = settings, metrics
        self.service: Service | None = None
        self.loaded: tuple[Engine, Index | None] | None = None
        self.error: str | None = None
        self.waiting: str | None = None  # the export directory --wait-for-model waits for
        # read at each scrape, so the gauge always says what /readyz says
        metrics.ready.set_function(lambda: float(self.service is not None and self.failure() is None))
        metrics.waiting.set_function(lambda: float(self.waiting is not None and self.failure() is None))

    def start(self, engine: Engine, index: Index | None) -> None:
        self.loaded = (engine, index)
        self.service = Service(engine, index, self.settings, self.metrics)

    def stop(self) -> None:
        """Stop the model thread and decode pool; a later lifespan starts them again."""
        if self.service is not None:
            self.service.close()
            self.service = None

    async def load(self, loader: Loader) -> None:
        try:
            if self.settings.wait_for_model and not export_complete(self.settings.model):
                self.waiting = self.settings.model
                log.info("waiting for the export at %s (--wait-for-model)", self.waiting)
                while not export_complete(self.settings.model):
                    await asyncio.sleep(WAIT_POLL_S)  # cancelled with the lifespan on shutdown
                self.waiting = None
            self.start(*await asyncio.to_thread(loader))
        except Exception as error:  # noqa: BLE001 - reported by /readyz and /healthz, and logged
            log.exception("loading failed")
            self.error = f"{type(error).__name__}: {error}"

    def failure(self) -> str | None:
        """Why this process cannot serve any more (loading failed, the model thread stopped), or None."""
        if self.error:
            return self.error
        return self.service.batcher.failure if self.service is not None else None


def create_app(settings: ServeSettings, *, loader: Loader | None = None,
               loaded: tuple[Engine, Index | None] | None = None) -> FastAPI:
    """The app; it loads with ``loader`` (default: from ``settings``) in its lifespan, or starts ``loaded``."""
    metrics = ServingMetrics()
    state = AppState(settings, metrics)
    if loaded is not None:
        state.start(*loaded)
    loader = loader or (lambda: load_model_and_index(settings))

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        task = None
        if state.service is None and state.loaded is not None:
            state.start(*state.loaded)
        elif state.service is None:
            task = asyncio.create_task(state.load(loader))
        try:
            yield
        finally:
            if task is not None and not task.done():
                task.cancel()
            state.stop()

    app = FastAPI(title="Tandem serving", version="1", lifespan=lifespan,
                  description="Zero-shot classification, embeddings and image-text retrieval with a CLIP model.")
    app.state.tandem = state
    install_handlers(app)
    bearer = HTTPBearer(auto_error=False, description="TANDEM_API_TOKEN, when the server has one")

    def authorized(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        token = settings.api_token
        # The header's bytes arrive decoded as latin-1; encoded back they are what the client sent, and
        # a UTF-8 client sends TANDEM_API_TOKEN's UTF-8 bytes (a non-ASCII token matches too).
        if token and not (credentials and hmac.compare_digest(credentials.credentials.encode("latin-1"),
                                                              token.encode("utf-8"))):
            raise Unauthorized("missing or wrong bearer token")

    def service() -> Service:
        if state.service is None:
            raise NotReady(f"model failed to load: {state.error}" if state.error else "model is still loading")
        if failure := state.failure():  # the model thread stopped: every later request, a search by embedding too
            raise ModelStopped(failure)
        return state.service

    async def only_fields(request: Request, *allowed: str) -> None:
        """A multipart route's form holds only its declared fields: FastAPI drops others unseen, and a
        misspelt ``topk`` would silently not apply (unknown JSON fields are 422 by the schemas)."""
        extra = sorted(set((await request.form()).keys()) - set(allowed))
        if extra:
            raise RequestValidationError([{"loc": ("body", name), "msg": "Extra inputs are not permitted"}
                                          for name in extra])

    Svc = Annotated[Service, Depends(service)]
    v1 = dict(dependencies=[Depends(authorized)], responses=ERRORS)

    @app.get("/healthz", response_model=schemas.Health, response_model_exclude_none=True,
             responses={503: {"model": schemas.Health}})
    async def healthz():
        """Liveness: 200 while the process works (503 if loading failed or the model thread stopped: restart it)."""
        if failure := state.failure():
            return JSONResponse({"status": "failed", "detail": failure}, 503)
        return {"status": "ok"}

    @app.get("/readyz", response_model=schemas.Health, response_model_exclude_none=True,
             responses={503: {"model": schemas.Health}})
    async def readyz():
        """Readiness: 200 once the model (and index) are loaded, 503 before and after a failure."""
        if failure := state.failure():
            return JSONResponse({"status": "failed", "detail": failure}, 503)
        if state.waiting:
            return JSONResponse({"status": "waiting", "detail": f"for the export at {state.waiting}"}, 503)
        if state.service is None:
            return JSONResponse({"status": "loading"}, 503)
        return {"status": "ready"}

    @app.get("/metrics", dependencies=[Depends(authorized)], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, 401: ERRORS[401]})
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/embed", response_model=schemas.EmbedResponse, **v1)
    async def embed(body: schemas.EmbedRequest, svc: Svc):
        """L2-normalised embeddings of texts and/or base64 images."""
        return _json(await svc.embed("/v1/embed", body.texts, body.images))

    @app.post("/v1/embed/upload", response_model=schemas.EmbedResponse, **v1)
    async def embed_upload(request: Request, svc: Svc, images: Annotated[list[UploadFile] | None, File()] = None,
                           texts: Annotated[list[str] | None, Form()] = None):
        """Like /v1/embed, with images as multipart files and texts as form fields."""
        await only_fields(request, "images", "texts")
        images = images or []
        body = _validate(schemas.EmbedRequest, texts=texts or [], images=["-"] * len(images))
        return _json(await svc.embed("/v1/embed/upload", body.texts, await _read(images, settings)))

    @app.post("/v1/classify", response_model=schemas.ClassifyResponse, **v1)
    async def classify(body: schemas.ClassifyRequest, svc: Svc):
        """Zero-shot: per image, every label's probability and cosine score."""
        return _json(await svc.classify("/v1/classify", body, body.images))

    @app.post("/v1/classify/upload", response_model=schemas.ClassifyResponse, **v1)
    async def classify_upload(request: Request, svc: Svc, images: Annotated[list[UploadFile], File()],
                              labels: Annotated[list[str], Form()],
                              templates: Annotated[list[str] | None, Form()] = None,
                              top_k: Annotated[int | None, Form()] = None):
        """Like /v1/classify, with images as multipart files and labels/templates as form fields."""
        await only_fields(request, "images", "labels", "templates", "top_k")
        options = {"labels": labels, "top_k": top_k, **({"templates": templates} if templates else {})}
        body = _validate(schemas.ClassifyRequest, images=["-"] * len(images), **options)
        return _json(await svc.classify("/v1/classify/upload", body, await _read(images, settings)))

    @app.post("/v1/search", response_model=schemas.SearchResponse, **v1)
    async def search(body: schemas.SearchRequest, svc: Svc):
        """The k most similar indexed items to a text, an image or an embedding, among those matching the filter."""
        return _json(await svc.search("/v1/search", body, text=body.text, image=body.image,
                                      embedding=body.embedding))

    @app.post("/v1/search/upload", response_model=schemas.SearchResponse, **v1)
    async def search_upload(request: Request, svc: Svc, image: Annotated[UploadFile, File()],
                            k: Annotated[int, Form()] = 10,
                            filter: Annotated[str | None, Form(description="JSON object, as in /v1/search")] = None):
        """Like /v1/search with an image query uploaded as a multipart file."""
        await only_fields(request, "image", "k", "filter")
        try:
            where = json.loads(filter) if filter else None
        except json.JSONDecodeError as error:
            raise RequestValidationError([{"loc": ("body", "filter"), "msg": f"not JSON: {error}"}]) from None
        except (ValueError, RecursionError) as error:  # an integer over Python's digit limit, deep nesting
            # 400, as the JSON routes answer a body that json cannot parse
            raise BadInput(f"filter cannot be parsed ({type(error).__name__})") from None
        body = _validate(schemas.SearchOptions, k=k, filter=where)
        return _json(await svc.search("/v1/search/upload", body, image=(await _read([image], settings))[0]))

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=app.router.routes)
    return app


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")


def _validate(model: type, **fields):
    """Form fields through the same pydantic model as the JSON body (422 the same way)."""
    try:
        return model.model_validate(fields)
    except ValidationError as error:
        raise RequestValidationError(
            [{"loc": ("body", *e["loc"]), "msg": e["msg"]} for e in error.errors()]) from None


async def _read(files: list[UploadFile], settings: ServeSettings) -> list[bytes]:
    out = []
    for upload in files:
        data = await upload.read(settings.max_body_bytes + 1)
        if len(data) > settings.max_body_bytes:
            raise TooLarge("uploaded file over the body limit")
        out.append(data)
    return out


def check_settings(settings: ServeSettings) -> None:
    """Refuse an out-of-range flag or a wrong ``--model``/``--weights``/``--index`` with one line, before the
    server starts."""
    from serving.engine import check_model, check_precision, export_complete, model_embed_dim, resolve_device
    from serving.index import read_manifest
    # Bounds far beyond any sensible value, so that a typo (or inf, or NaN: no comparison holds for it)
    # is a one-line error here rather than an overflow inside the server
    limits = [("--max-batch-size", settings.max_batch_size, 1, 65536),
              ("--workers", settings.workers, 1, 1024),
              ("--max-wait-ms", settings.max_wait_ms, 0, 60_000),
              ("--threads", settings.threads, 0, 1024),
              ("--max-pixels", settings.max_pixels, 1, 2**40),
              ("--label-cache", settings.label_cache, 1, 100_000),
              ("--nprobe", settings.nprobe, 1, 2**20),
              ("--ef-search", settings.ef_search, 1, 2**20)]
    for flag, value, low, high in limits:
        if not low <= value <= high:
            raise UserError(f"{flag} must be from {low} to {high}, got {value}")
    if not 1 <= settings.max_body_bytes <= MAX_BODY_MB * 2**20:
        raise UserError(f"--max-body-mb must be > 0 and at most {MAX_BODY_MB}")
    check_precision(settings.precision, resolve_device(settings.device))
    if settings.wait_for_model and settings.weights:
        raise UserError("--wait-for-model waits for an export directory; a model name with --weights is there already")
    # With --wait-for-model an export that is not there yet is checked (and the index's dimension
    # against it) when it appears.
    later = settings.wait_for_model and not export_complete(settings.model)
    if later and Path(settings.model).exists() and not Path(settings.model).is_dir():
        raise UserError(f"--model {settings.model} is a file; --wait-for-model waits for an export directory")
    name = None if later else check_model(settings.model, settings.weights)[0]
    if settings.index:
        manifest = read_manifest(settings.index)
        dim = model_embed_dim(name) if name else None
        if dim is not None and int(manifest["dim"]) != dim:
            raise UserError(f"index {settings.index} holds {manifest['dim']}-d embeddings, the model's are {dim}-d")


def check_listen(host: str, port: int) -> None:
    """``host:port`` can be listened on now, bound as asyncio's ``create_server`` (under uvicorn) binds
    it: every address the host resolves to ("" is all interfaces), IPv6 sockets IPv6-only, SO_REUSEADDR,
    and address families this machine lacks skipped."""
    try:
        infos = set(socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE))
    except socket.gaierror as error:
        raise UserError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    opened = []
    try:
        for family, kind, proto, _, address in infos:
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # a family or protocol this machine does not have
                continue
            opened.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRNOTAVAIL:  # the family is not enabled here (asyncio skips it too)
                    continue
                raise UserError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    finally:
        for sock in opened:
            sock.close()


def serve(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, access_log: bool = False) -> None:
    """Run the app under uvicorn in this process until interrupted."""
    import uvicorn

    check_settings(settings)
    # --max-pixels is checked on each image's header before decoding; PIL's own guard (about 89M pixels
    # warns, twice that raises at open) would otherwise override a higher cap.
    Image.MAX_IMAGE_PIXELS = None
    check_listen(host, port)  # before the model loads: a port in use is one line, not uvicorn's exit 3
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    uvicorn.run(create_app(settings), host=host, port=port, access_log=access_log, log_level="info",
                timeout_graceful_shutdown=10)
