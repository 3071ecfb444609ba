# syntax=docker/dockerfile:1
#
# segprop worker images: `segprop-worker`, as uid 10001. Build from the repository root (BuildKit,
# the default builder of current Docker, builds only the stages the target needs):
#
#   # CUDA (the default target): burn-cuda, CUDA 12.4 runtime with NVRTC and NCCL.
#   docker build -f deploy/docker/worker.Dockerfile -t segprop-worker:0.1.0 .
#   # CPU only (small; for clusters without GPUs, e.g. the cpu-dev overlay).
#   docker build -f deploy/docker/worker.Dockerfile --target cpu -t segprop-worker:0.1.0-cpu .
#
# Run (the CUDA image needs the NVIDIA container toolkit and a driver for CUDA 12.4, >= 550):
#
#   docker run --gpus all --shm-size 16g -e SEGPROP_TOKEN=... \
#       -e SEGPROP_COORDINATOR=http://coordinator:50051 segprop-worker:0.1.0 \
#       serve --backend cuda --devices 8 --snapshot-store grpc --artifact-store grpc
#
# FEATURES are the segprop-worker cargo features of the CUDA build: `cuda,nccl` (a gang's ranks
# talk over NCCL; libnccl2 is in the CUDA image already, loaded at run time). With `cuda` alone
# the ranks of a gang are joined by threads over host memory.
# Ports: 50061 gRPC health (grpc.health.v1), 9091 HTTP /metrics and /healthz. The work directory
# (SnapCheck spill files, the GPU kernel cache under $HOME/.cache) is /var/lib/segprop-worker.

ARG RUST_VERSION=1.95

# ---- CPU build -------------------------------------------------------------------------------

FROM rust:${RUST_VERSION}-bookworm AS builder-cpu
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY tests tests
COPY proto proto
COPY configs configs
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,id=segprop-worker-cpu-target,sharing=locked \
    cargo build --release --locked -p segprop-worker \
    && install -D -m 0755 target/release/segprop-worker /out/segprop-worker

FROM debian:bookworm-slim AS cpu
# ca-certificates: TLS to S3 stores and https coordinators; curl: the HEALTHCHECK.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 segprop \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/segprop-worker --shell /usr/sbin/nologin segprop \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/segprop-worker
COPY --from=builder-cpu /out/segprop-worker /usr/local/bin/segprop-worker
ENV HOME=/var/lib/segprop-worker \
    SEGPROP_HEALTH_LISTEN=0.0.0.0:50061 \
    SEGPROP_METRICS_LISTEN=0.0.0.0:9091
USER 10001:10001
WORKDIR /var/lib/segprop-worker
EXPOSE 50061 9091
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:9091/healthz"]
ENTRYPOINT ["segprop-worker"]
CMD ["serve"]

# ---- CUDA build (default target: last stage) -------------------------------------------------

FROM nvidia/cuda:12.4.1-devel-ubuntu22.04 AS builder-cuda
ARG RUST_VERSION
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential ca-certificates curl pkg-config \
    && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:$PATH
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
    | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}" \
    && rustc --version
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY tests tests
COPY proto proto
COPY configs configs
ARG FEATURES=cuda,nccl
# cudarc's bindings for CUDA 12.4, the version of this image and of the runtime image below (it
# would read the same from nvcc); the driver, NVRTC and NCCL are loaded at run time.
ENV CUDARC_CUDA_VERSION=12040
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,id=segprop-worker-cuda-target,sharing=locked \
    cargo build --release --locked -p segprop-worker --features "${FEATURES}" \
    && install -D -m 0755 target/release/segprop-worker /out/segprop-worker

FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04 AS cuda
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The runtime image has the CUDA libraries burn-cuda loads (NVRTC compiles its kernels) and
# libnccl2 held at the build matching its CUDA; should a base drop NCCL, it comes from the CUDA
# apt repository the image has configured. ca-certificates: TLS; curl: the HEALTHCHECK.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && if ! ldconfig -p | grep -q 'libnccl\.so\.2'; then \
        apt-get install -y --no-install-recommends libnccl2; \
    fi \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 segprop \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/segprop-worker --shell /usr/sbin/nologin segprop \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/segprop-worker
COPY --from=builder-cuda /out/segprop-worker /usr/local/bin/segprop-worker
ENV HOME=/var/lib/segprop-worker \
    SEGPROP_HEALTH_LISTEN=0.0.0.0:50061 \
    SEGPROP_METRICS_LISTEN=0.0.0.0:9091
USER 10001:10001
WORKDIR /var/lib/segprop-worker
EXPOSE 50061 9091
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:9091/healthz"]
ENTRYPOINT ["segprop-worker"]
CMD ["serve"]
