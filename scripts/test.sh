#!/usr/bin/env bash
# The project's test command (README, `just test`, .ci/run): formatting, lints, the GPU build
# paths compile, then every test. Needs python3 with numpy (the HF import reference).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

echo "== cargo check --features cuda (GPU paths compile; no GPU needed)"
cargo check -p segprop-worker -p segprop-bench --features cuda

echo "== cargo test"
cargo test --workspace
