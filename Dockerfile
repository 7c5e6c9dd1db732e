# syntax=docker/dockerfile:1
#
# The sttm-pipeline image: Python, Ray, torch, the pinned dependencies and this project,
# run as a non-root user. One image serves every node of a cluster (the Ray head, the GPU
# workers, the Ray Jobs submitter and the cluster launcher's containers): Ray needs the
# same Ray and Python versions everywhere.
#
# Two variants of the same build, chosen with VARIANT; the tags are the ones that
# infra/ names (infra/build-image.sh builds and tags both):
#
#   docker build -t ghcr.io/sttm-pipeline/sttm-pipeline:0.1.0 .                                # CUDA (default)
#   docker build --build-arg VARIANT=cpu -t ghcr.io/sttm-pipeline/sttm-pipeline:0.1.0-cpu .    # CPU-only clusters
#
# tests/test_infra.py keeps this file, the lock file and the manifests in step.

# cuda | cpu
ARG VARIANT=cuda

# CUDA variant: NVIDIA's CUDA base image (the CUDA runtime and the NVIDIA_* settings that
# the NVIDIA container runtime reads). torch's wheel brings its own cuBLAS, cuDNN and NCCL,
# so the "base" flavour, not "runtime", avoids shipping those libraries twice. CUDA 13.0
# is what torch 2.13's wheel is built for; NVIDIA_REQUIRE_CUDA in this base makes a node
# whose driver is too old refuse the container at start instead of failing mid-job.
FROM nvidia/cuda:13.0.0-base-ubuntu24.04 AS base-cuda

# CPU variant: the same Ubuntu without CUDA.
FROM ubuntu:24.04 AS base-cpu

# uv only installs a standalone CPython 3.11 (Ubuntu 24.04 ships 3.12; the lock file was
# resolved and tested on 3.11); the packages are installed with pip.
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM base-${VARIANT}
ARG VARIANT
# The torch release CI tests with (.ci/run); the CPU variant takes its +cpu build.
ARG TORCH_VERSION=2.13.0
ARG PYTHON_VERSION=3.11

LABEL org.opencontainers.image.title="sttm-pipeline" \
      org.opencontainers.image.description="STTM token-merging preprocessing pipeline on Ray (decode, encode, merge, Parquet token store)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.sttm-pipeline.image.repository="ghcr.io/sttm-pipeline/sttm-pipeline" \
      io.sttm-pipeline.image.variant="${VARIANT}"

# wget: KubeRay's health probes call the raylet and dashboard with it.
# rsync, openssh-client: the cluster launcher (`ray up`) copies its bootstrap files into
# the container with rsync, and the head's autoscaler reaches new workers over ssh.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates wget rsync openssh-client \
 && rm -rf /var/lib/apt/lists/*

# The non-root user, uid 1000 / gid 100 ("users") like Ray's own images, so the
# manifests' runAsUser and file ownership match. Ubuntu 24.04 images already have a user
# "ubuntu" with uid 1000; it goes first.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && useradd --create-home --uid 1000 --gid 100 --shell /bin/bash ray

COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN uv python install --no-cache "${PYTHON_VERSION}" \
 && uv venv --no-cache --seed --python-preference only-managed --python "${PYTHON_VERSION}" /opt/venv

# Dependencies before the source, so a code change reuses this (large) layer. Every
# package is pinned by infra/requirements-lock.txt; torch by TORCH_VERSION, whose own
# metadata pins its CUDA libraries. The CPU build of torch is only on PyTorch's index.
COPY infra/requirements-lock.txt /tmp/requirements-lock.txt
RUN case "${VARIANT}" in \
      cuda) torch="torch==${TORCH_VERSION}"; index="" ;; \
      cpu)  torch="torch==${TORCH_VERSION}+cpu"; index="--extra-index-url https://download.pytorch.org/whl/cpu" ;; \
      *)    echo "VARIANT must be cuda or cpu, got '${VARIANT}'" >&2; exit 1 ;; \
    esac \
 && pip install --no-cache-dir ${index} "${torch}" -r /tmp/requirements-lock.txt \
 && rm /tmp/requirements-lock.txt

# The project itself (no dependency resolution: everything is already pinned above), and
# a copy of the repository at /app so that jobs/configs/*.yaml are at hand.
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir --no-deps /app \
 && rm -rf /app/build \
 && pip check \
 && python -c "import sttm, pipeline.run, jobs.preprocess, ray, torch, decord"

# HOME is set explicitly: the cluster launcher reads it from the image's environment.
# Model weights downloaded from the Hugging Face hub go to HF_HOME (mount a volume there
# to keep them between pods).
ENV HOME=/home/ray \
    HF_HOME=/home/ray/.cache/huggingface \
    PYTHONUNBUFFERED=1
USER 1000:100
WORKDIR /home/ray
CMD ["bash"]
