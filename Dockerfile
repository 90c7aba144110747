# syntax=docker/dockerfile:1
# The service's images (deploy/README.md): `docker build -t mrl-retrieval:cpu .` builds the CPU image (the last
# stage, so the default); `docker build --target gpu -t mrl-retrieval:gpu .` the GPU one (CUDA torch, faiss-gpu,
# onnxruntime-gpu). Each builder stage fills a virtual environment at /opt/venv; each final stage copies it onto a
# runtime base without compilers, pip caches or apt lists, and runs `mrl serve` as an unprivileged user.
# Configuration is by MRL_* environment variables only; the index is mounted at /index, a tuned model under /models.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# The CUDA base and the PyTorch index must agree on the CUDA major version (12 here).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_GPU_INDEX=https://download.pytorch.org/whl/cu128

# --- CPU builder: the CPU build of torch (pinned in constraints.txt), then the project with faiss-cpu, onnxruntime ---
FROM ${PYTHON_IMAGE} AS builder-cpu
ARG TORCH_CPU_INDEX
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN python -m venv /opt/venv
COPY constraints.txt ./
# torch first, from the PyTorch CPU index: from PyPI it would be a multi-GB CUDA build. Its version is constraints.txt's.
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_CPU_INDEX}" --constraint constraints.txt torch
COPY pyproject.toml README.md LICENSE ./
COPY core/ core/
COPY mrl/ mrl/
COPY training/ training/
COPY index/ index/
COPY service/ service/
COPY benchmarks/ benchmarks/
# hadolint ignore=DL3013
RUN pip install --constraint constraints.txt ".[cpu,milvus-client]" \
    && pip uninstall --yes pip

# --- GPU builder: the same on a CUDA base, with CUDA torch, faiss-gpu and onnxruntime-gpu ---
FROM ${CUDA_IMAGE} AS builder-gpu
ARG TORCH_GPU_INDEX
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive \
    PATH=/opt/venv/bin:$PATH
# The distribution's Python (3.12 on Ubuntu 24.04); apt versions follow the pinned base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY constraints.txt ./
# hadolint ignore=DL3013
RUN pip install --index-url "${TORCH_GPU_INDEX}" --constraint constraints.txt torch
COPY pyproject.toml README.md LICENSE ./
COPY core/ core/
COPY mrl/ mrl/
COPY training/ training/
COPY index/ index/
COPY service/ service/
COPY benchmarks/ benchmarks/
# hadolint ignore=DL3013
RUN pip install --constraint constraints.txt ".[gpu,milvus-client]" \
    && pip uninstall --yes pip

# --- GPU image: `docker build --target gpu` ---
FROM ${CUDA_IMAGE} AS gpu
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 mrl \
    && useradd --system --uid 10001 --gid mrl --create-home --home-dir /home/mrl mrl \
    && mkdir -p /index /models
COPY --from=builder-gpu /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/home/mrl/.cache/huggingface \
    MRL_INDEX=/index \
    MRL_HOST=0.0.0.0 \
    MRL_PORT=8000 \
    MRL_DEVICE=auto
WORKDIR /home/mrl
USER 10001:10001
EXPOSE 8000
# /healthz is liveness: 200 while the process answers, before the index is loaded too.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MRL_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["mrl"]
CMD ["serve"]

# --- CPU image: the default target ---
FROM ${PYTHON_IMAGE} AS cpu
RUN groupadd --system --gid 10001 mrl \
    && useradd --system --uid 10001 --gid mrl --create-home --home-dir /home/mrl mrl \
    && mkdir -p /index /models
COPY --from=builder-cpu /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/home/mrl/.cache/huggingface \
    MRL_INDEX=/index \
    MRL_HOST=0.0.0.0 \
    MRL_PORT=8000 \
    MRL_DEVICE=cpu
WORKDIR /home/mrl
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MRL_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["mrl"]
CMD ["serve"]
