# convserve images. Targets (docker build --target NAME .):
#   cpu    (default, last stage) the serving image: convserve[server] on ONNX Runtime CPU, no torch
#   gpu    the serving image on the CUDA runtime with the `gpu` extra (onnxruntime-gpu), cuda provider first
#   train  a one-off job image with the `train` extra (CPU torch) that trains and exports into /models
# Every target runs as the numeric non-root user 10001, with an exec-form entrypoint so SIGTERM
# reaches the server itself and the drain (CONVSERVE_DRAIN_GRACE_SECONDS) runs.

# Base images pinned by version; bump them together with a rebuild and the compose/k8s tests.
# Without a registry (air-gapped, CI here), build the Python base from Debian's packages and pass it in:
#   scripts/debian_image.sh convserve-base/python:3.11-bookworm python3 python3-venv python-is-python3
#   docker build --network host --build-arg PYTHON_IMAGE=convserve-base/python:3.11-bookworm .
# (No `# syntax=` line: it makes BuildKit fetch a frontend image, which fails offline.)
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04
# CPU wheels of torch: PyPI's default Linux wheel bundles CUDA (several GB) that the train job never uses.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# ---- build: one virtual environment with convserve[server], copied whole into the runtime stage ----
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md LICENSE ./
COPY convserve ./convserve
COPY model_repository ./model_repository
# A non-editable install: the image carries site-packages, not the source tree.
RUN pip install --no-cache-dir "/src[server]"

# ---- gpu-build: same as build, on the CUDA image so the venv matches its Python ----
FROM ${CUDA_IMAGE} AS gpu-build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Versions of the distribution's python3 packages follow the pinned CUDA image's Ubuntu release;
# pinning them too would break the build at every Ubuntu security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md LICENSE ./
COPY convserve ./convserve
COPY model_repository ./model_repository
# `server-gpu` is `server` with onnxruntime-gpu in place of the CPU onnxruntime (never both: they
# write the same package directory).
RUN pip install --no-cache-dir "/src[server-gpu]"

# ---- gpu: the serving image on CUDA ----
FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
# python3 must be the same build as in gpu-build (the venv links to it): same image, same unpinned apt source.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 convserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin convserve
COPY --from=gpu-build /opt/venv /opt/venv
# Root-owned and not writable by uid 10001: the bundled repository is read-only to the server.
# Mount another repository over /models (read-only) to serve other models.
COPY model_repository /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CONVSERVE_HOST=0.0.0.0 \
    CONVSERVE_HTTP_PORT=8000 \
    CONVSERVE_GRPC_PORT=8001 \
    CONVSERVE_METRICS_PORT=8002 \
    CONVSERVE_MODEL_REPOSITORY=/models \
    CONVSERVE_EXECUTION_PROVIDERS=cuda,cpu
USER 10001:10001
# 8000 v2 HTTP/REST, 8001 gRPC (convserve.v1 and v2), 8002 /metrics.
EXPOSE 8000 8001 8002
# The port comes from the container's own CONVSERVE_GRPC_PORT, so `-e CONVSERVE_GRPC_PORT=...` stays healthy.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["sh", "-c", "exec convserve health --server \"127.0.0.1:${CONVSERVE_GRPC_PORT}\" --timeout 3"]
ENTRYPOINT ["convserve", "serve"]

# ---- train: a one-off job that trains and exports into the mounted /models ----
FROM ${PYTHON_IMAGE} AS train
ARG TORCH_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
# The fonts the digits model is trained on (the same list `make system-deps` installs).
COPY scripts/font-packages.txt /tmp/font-packages.txt
# Font versions follow the pinned base image's Debian release; pinning them would break at point releases.
# hadolint ignore=DL3008
RUN apt-get update \
    && xargs -a /tmp/font-packages.txt apt-get install -y --no-install-recommends \
    && rm -rf /var/lib/apt/lists/* /tmp/font-packages.txt
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY convserve ./convserve
COPY model_repository ./model_repository
RUN pip install --no-cache-dir --extra-index-url="${TORCH_INDEX_URL}" "/src[train]" \
    && groupadd --system --gid 10001 convserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin convserve
# Training writes checkpoints and plots under /tmp/runs; matplotlib needs a writable cache dir.
ENV PYTHONUNBUFFERED=1 MPLCONFIGDIR=/tmp/matplotlib
# No EXPOSE and no CONVSERVE_*_PORT: the job trains and exports, it serves nothing.
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["convserve"]
CMD ["train", "--help"]

# ---- cpu: the default serving image (last stage, so a plain `docker build .` builds it) ----
FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 convserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin convserve
COPY --from=build /opt/venv /opt/venv
# Root-owned and not writable by uid 10001: the bundled repository is read-only to the server.
# Mount another repository over /models (read-only) to serve other models.
COPY model_repository /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CONVSERVE_HOST=0.0.0.0 \
    CONVSERVE_HTTP_PORT=8000 \
    CONVSERVE_GRPC_PORT=8001 \
    CONVSERVE_METRICS_PORT=8002 \
    CONVSERVE_MODEL_REPOSITORY=/models
USER 10001:10001
# 8000 v2 HTTP/REST, 8001 gRPC (convserve.v1 and v2), 8002 /metrics.
EXPOSE 8000 8001 8002
# `convserve health` exits 0 only when the standard gRPC health service answers SERVING.
# The port comes from the container's own CONVSERVE_GRPC_PORT, so `-e CONVSERVE_GRPC_PORT=...` stays healthy.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["sh", "-c", "exec convserve health --server \"127.0.0.1:${CONVSERVE_GRPC_PORT}\" --timeout 3"]
ENTRYPOINT ["convserve", "serve"]
