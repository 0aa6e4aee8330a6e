# syntax=docker/dockerfile:1
#
# VALD-MD review server image (docs/DEPLOYMENT.md).
#
#   docker build --build-arg VARIANT=cuda -t vald-md:cuda .    # GPU hosts (NVIDIA driver for CUDA 13, see docs)
#   docker build --build-arg VARIANT=cpu  -t vald-md:cpu  .    # any x86-64 host
#
# Stages: `builder` makes /opt/venv (torch for the variant, then the project's dependencies, then the project
# itself, editable, pointing at /opt/vald-md); `runtime-cpu` / `runtime-cuda` differ only in environment; the final
# stage copies the venv and the files that run (app/, templates/, static/, the embedded model) and nothing else.
# Configuration is by VALD_MD_* environment variables only (app/config.py). One model process per container.

ARG VARIANT=cuda
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ARG VARIANT
# torch is pinned to the version the project is tested with; the wheel decides CPU vs CUDA:
#   cpu:  the CPU-only wheel from the PyTorch CPU index (no CUDA libraries, ~5x smaller)
#   cuda: the PyPI wheel, which for torch 2.13.0 on Linux x86-64 is the CUDA 13.0 build (cuDNN, cuBLAS and the CUDA
#         runtime come as nvidia-* / cuda-toolkit wheels); set TORCH_INDEX_URL to another PyTorch index (e.g. a
#         cu12x one, where it publishes 2.13.0) for hosts whose driver predates CUDA 13.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN case "${VARIANT}" in \
      cpu)  index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      cuda) index="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
      *)    echo "VARIANT must be 'cpu' or 'cuda', got '${VARIANT}'" >&2; exit 2 ;; \
    esac \
    && pip install --index-url "${index}" "torch==${TORCH_VERSION}" \
    && echo "torch==${TORCH_VERSION}" > /opt/constraints.txt

WORKDIR /opt/vald-md
# dependencies first (their layer survives source edits): pyproject's [project.dependencies] + the postgres extra
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['postgres']))" > /opt/requirements.txt \
    && pip install -c /opt/constraints.txt -r /opt/requirements.txt
# the project itself, editable: the app finds templates/, static/ and model_weights/ beside app/ (app/config.py
# REPO_ROOT), so the code stays at /opt/vald-md in the final image and the venv only points at it
COPY app/ app/
RUN pip install -c /opt/constraints.txt --no-deps -e . \
    && python -c "import torch, diffusers, app.cli; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    && pip uninstall -y pip

# ---------------------------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime-base
# DejaVu Sans: the annotated exports and legends render text with it (app/attribution.py, app/exports.py)
RUN apt-get update \
    && apt-get install -y --no-install-recommends fonts-dejavu-core=2.37-6 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 vald \
    && useradd --system --uid 10001 --gid vald --create-home --home-dir /home/vald --shell /usr/sbin/nologin vald \
    && mkdir -p /data /models \
    && chown vald:vald /data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    VALD_MD_DATA_DIR=/data \
    VALD_MD_PORT=8000

FROM runtime-base AS runtime-cpu
ENV VALD_MD_DEVICE=cpu

FROM runtime-base AS runtime-cuda
# what the NVIDIA Container Toolkit injects into a non-CUDA base image (python:slim): the compute libraries
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# ---------------------------------------------------------------------------------------------------------------
# the variant's stage above (hadolint does not resolve a stage name built from an ARG, hence the ignore)
# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="vald-md" \
      org.opencontainers.image.description="VALD-MD chest X-ray counterfactual review server (research use only)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.vald-md.variant="${VARIANT}"
COPY --from=builder /opt/venv /opt/venv
WORKDIR /opt/vald-md
# only what runs; code and model are root-owned and read-only to the server user
COPY app/ app/
COPY templates/ templates/
COPY static/ static/
COPY model_weights/vald-md-mini/ model_weights/vald-md-mini/
COPY model_weights/lungs-unet/ model_weights/lungs-unet/
COPY model_weights/lesion-classifier/ model_weights/lesion-classifier/
RUN python -m compileall -q app
# /data: SQLite database, uploads and run artifacts (a named volume; created vald-owned so a new volume is too).
# /models: user model folders, mounted read-only; point VALD_MD_MODEL_DIR at /models/<name> (unset = embedded).
VOLUME ["/data"]
# numeric, so that runAsNonRoot-style checks can verify it without /etc/passwd
USER 10001:10001
EXPOSE 8000
# /readyz: 200 once the model is loaded, the worker is alive and the queue has room (503 otherwise). The model
# loads in the lifespan, hence the start period. Python's urllib: the image has no curl.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('VALD_MD_PORT', '8000'), timeout=8)"]
# One process: it holds the one model copy and the one job queue (never --workers N). Binding 0.0.0.0 inside the
# container also needs VALD_MD_ALLOW_REMOTE=1 (set by docker-compose.yml / the documented `docker run`), which the
# server refuses to assume: publish the port on the host's loopback and put a TLS-terminating proxy in front.
CMD ["vald-md", "serve", "--host", "0.0.0.0"]
