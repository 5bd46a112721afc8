# syntax=docker/dockerfile:1.7
# The serving image: `tandem serve` with the lockfile's `serve` group (FastAPI, uvicorn,
# python-multipart, faiss-cpu). DeepSpeed and WebDataset are never installed here.
#
#   docker build -f docker/serve.Dockerfile -t tandem-serve:0.1.0 .
#   docker run -p 8080:8080 -v "$PWD/runs/vitb32/export:/models/export:ro" tandem-serve:0.1.0

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM python:3.11.13-slim-bookworm AS build
COPY --from=uv /uv /usr/local/bin/uv
# The image's own CPython 3.11; the venv's interpreter links to the same path in the final stage.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3.11 \
    UV_PROJECT_ENVIRONMENT=/opt/venv
WORKDIR /src
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    --mount=type=bind,source=.python-version,target=.python-version \
    uv sync --frozen --no-default-groups --group serve --no-install-project
COPY . /src
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-default-groups --group serve --no-editable

FROM python:3.11.13-slim-bookworm
LABEL org.opencontainers.image.title="tandem-serve" \
      org.opencontainers.image.description="Tandem CLIP serving: zero-shot classification and retrieval over HTTP"
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/tandem --shell /usr/sbin/nologin tandem
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/tandem \
    XDG_CACHE_HOME=/home/tandem/.cache \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/tandem
USER 10001:10001
EXPOSE 8080
# curl is not in the slim image; Python is. urlopen raises on any non-2xx answer.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
ENTRYPOINT ["tandem", "serve"]
CMD ["--model", "/models/export", "--host", "0.0.0.0", "--port", "8080"]
