# syntax=docker/dockerfile:1
#
# segprop coordinator image: `segprop-coord` (the coordinator daemon and the job CLI) on Debian
# bookworm-slim, as uid 10001. Build from the repository root:
#
#   docker build -f deploy/docker/coordinator.Dockerfile -t segprop-coordinator:0.1.0 .
#
# Run (state and artifacts in /var/lib/segprop; give it a volume to keep them):
#
#   docker run -e SEGPROP_TOKEN=... -p 50051:50051 -p 9090:9090 \
#       -v segprop:/var/lib/segprop segprop-coordinator:0.1.0
#
# The default config is deploy/docker/coordinator.yaml (in the image at
# /etc/segprop/coordinator.yaml); Kubernetes mounts its own over /etc/segprop. Example job specs
# from configs/jobs/ are in /usr/share/segprop/jobs, in step with this binary's spec version.
# Ports: 50051 gRPC (JobService, ClusterService, SnapshotService; grpc.health.v1 without a
# token), 9090 HTTP /metrics and /healthz.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# Only what the workspace needs to build (every member's manifest must be present).
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY tests tests
COPY proto proto
COPY configs configs
# target/ is a cache mount, so the binary is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked -p segprop-coordinator --bin segprop-coord \
    && install -D -m 0755 target/release/segprop-coord /out/segprop-coord

FROM debian:bookworm-slim AS runtime
# ca-certificates: TLS to S3 stores; curl: the HEALTHCHECK below.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 segprop \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/segprop --shell /usr/sbin/nologin segprop \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/segprop /var/lib/segprop/state /var/lib/segprop/artifacts
COPY --from=builder /out/segprop-coord /usr/local/bin/segprop-coord
COPY deploy/docker/coordinator.yaml /etc/segprop/coordinator.yaml
COPY configs/jobs /usr/share/segprop/jobs
USER 10001:10001
WORKDIR /var/lib/segprop
EXPOSE 50051 9090
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:9090/healthz"]
ENTRYPOINT ["segprop-coord"]
CMD ["serve", "--config", "/etc/segprop/coordinator.yaml"]
