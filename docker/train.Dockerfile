# syntax=docker/dockerfile:1.7
# The training image: `tandem train` on a CUDA runtime, with the lockfile's `train` group
# (DeepSpeed, WebDataset, boto3, pyarrow) and nothing from `serve` or `dev`.
#
#   docker build -f docker/train.Dockerfile -t tandem-train:0.1.0 .
#
# torch's wheels in uv.lock carry their own CUDA 13 libraries; the base image contributes the
# NVIDIA container-toolkit settings (driver mounts, NVIDIA_REQUIRE_CUDA) for that CUDA release.
# checkov:skip=CKV_DOCKER_2: a training job serves no request; Kubernetes watches the process itself (restartPolicy OnFailure).

FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04 AS build
COPY --from=uv /uv /usr/local/bin/uv
# A uv-managed CPython (the base's Python is 3.12 and not ours) under /opt, copied to the final stage.
# DS_BUILD_OPS=0: DeepSpeed's sdist builds without compiling kernels (the trainer needs none).
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    DS_BUILD_OPS=0
WORKDIR /src
# Dependencies first, in their own layer: rebuilt only when the lockfile changes.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    --mount=type=bind,source=.python-version,target=.python-version \
    uv sync --frozen --no-default-groups --group train --no-install-project
COPY . /src
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-default-groups --group train --no-editable

FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04
LABEL org.opencontainers.image.title="tandem-train" \
      org.opencontainers.image.description="Tandem distributed CLIP training (DeepSpeed, torchrun)"
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/tandem --shell /usr/sbin/nologin tandem
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
# HOME and the caches stay writable under a read-only root: Kubernetes mounts emptyDirs on
# /home/tandem and /tmp. The run directory (checkpoints, export) is a mounted volume.
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/tandem \
    XDG_CACHE_HOME=/home/tandem/.cache \
    TRITON_CACHE_DIR=/home/tandem/.cache/triton \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/tandem
USER 10001:10001
ENTRYPOINT ["tandem", "train"]
CMD ["--config", "/etc/tandem/train.toml", "--resume", "latest"]
