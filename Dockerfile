# syntax=docker/dockerfile:1
# vae-serve images, all from this one file (docs/deploy.md):
#   docker build -t vae-serve .                        CPU server (default target `runtime`, torch from the CPU index)
#   docker build -t vae-serve:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .      CUDA server, same stages
#   docker build -t vae-serve-train --target train .   offline training: `python -m model.train` + the [train] extra
# TORCH_INDEX_URL= (empty) installs TORCH_VERSION from pip's own configuration instead (a mirror, local wheels).

ARG BASE_IMAGE=python:3.11-slim

# -- base: a Python >= 3.11 with venv; python:3.11-slim has one, the nvidia/cuda images get Ubuntu's ---------------
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN if ! python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version'

# -- builder: /opt/venv with torch and the serving dependencies, nothing else ---------------------------------------
FROM base AS builder
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch alone first, from its own index (CPU or CUDA build); its dependencies come with the rest below.
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ -n "$TORCH_INDEX_URL" ]; then export PIP_INDEX_URL="$TORCH_INDEX_URL"; fi \
    && pip install --no-deps torch=="${TORCH_VERSION}"
# Dependencies before sources so a code change reuses this layer. constraints.txt pins every version (the same pins
# as a clone's `pip install -c constraints.txt`), less its torch line: TORCH_VERSION above chose the build.
COPY pyproject.toml constraints.txt ./
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > requirements.txt \
    && sed -i '/^torch==/d' constraints.txt \
    && pip install -c constraints.txt -r requirements.txt \
    && python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'
# Neither serving nor training loads torch's C++ headers, CMake files or C++ test binaries (~190 MB of the CPU wheel).
RUN t="$(python -c 'import os, torch; print(os.path.dirname(torch.__file__))')" \
    && rm -rf "$t/include" "$t/share" "$t/test" "$t"/bin/test_* "$t"/bin/*Test "$t"/bin/protoc*

# -- train-builder: the same venv plus the [train] extra (scipy, tqdm, matplotlib) ---------------------------------
FROM builder AS train-builder
RUN --mount=type=cache,target=/root/.cache/pip \
    python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["train"]))' \
        > requirements-train.txt \
    && pip install -c constraints.txt -r requirements-train.txt

# -- common runtime layout: a non-root user (uid 10001, as deploy/k8s expects), the venv first on PATH, /app ---------
FROM base AS app
RUN groupadd --system --gid 10001 vae \
    && useradd --system --uid 10001 --gid vae --home-dir /app --no-create-home --shell /usr/sbin/nologin vae
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app
WORKDIR /app

# -- train: `docker run ... vae-serve-train --dataset mnist --out /app/checkpoints/my-mnist` ------------------------
FROM app AS train
ENV VAE_DATA_ROOT=/data \
    MPLCONFIGDIR=/tmp/matplotlib
COPY --from=train-builder /opt/venv /opt/venv
# The bundled checkpoints too: whichever of compose's `api` and `train` first mounts the empty `checkpoints` volume
# fills it from its image, and `api` must find its models there after a train-first start as well.
COPY --chown=10001:10001 checkpoints ./checkpoints
COPY model ./model
RUN install -d -o vae -g vae /data
USER 10001:10001
ENTRYPOINT ["python", "-m", "model.train"]
CMD ["--help"]

# -- runtime (default target): the API server with the bundled checkpoints -----------------------------------------
FROM app AS runtime
LABEL org.opencontainers.image.title="vae-serve" \
      org.opencontainers.image.description="Variational Autoencoders behind a batched REST API"
# Settings come from VAE_ environment variables (`docker run -e VAE_PORT=9000 ...` overrides these).
ENV VAE_HOST=0.0.0.0 \
    VAE_PORT=8000 \
    VAE_MODELS_DIR=/app/checkpoints
COPY --from=builder /opt/venv /opt/venv
# Owned by the user so that a checkpoints volume seeded from here is writable by the `train` service.
COPY --chown=10001:10001 checkpoints ./checkpoints
COPY deploy/healthcheck.py ./deploy/healthcheck.py
COPY model ./model
COPY service ./service
USER 10001:10001
# HTTP (/v1, /v2 REST), and the Open Inference Protocol's gRPC service (VAE_GRPC_PORT)
EXPOSE 8000 8001
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 CMD ["python", "/app/deploy/healthcheck.py"]
# Exec form: the server is PID 1 and gets SIGTERM itself; uvicorn drains in-flight requests, then exits.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]
