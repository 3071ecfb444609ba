# Everyday recipes. `just --list` shows them. (Install just with `pip install rust-just`.)

# The demo: coordinator + one local CPU worker + local store, the demo job watched to the end.
demo:
    cargo build --release && target/release/segprop-coord demo

# The demo job standalone (no coordinator): one process trains it.
demo-standalone out="runs/demo":
    cargo run --release -p segprop-worker -- train --out {{out}}

# A coordinator on 127.0.0.1:50051 (token from SEGPROP_TOKEN) and one local worker.
serve:
    cargo build --release && (target/release/segprop-worker serve & target/release/segprop-coord serve)

# Load test: 1,000 simulated workers against a real coordinator (docs/benchmarks.md).
loadtest:
    cargo build --release -p segprop-coordinator -p segprop-bench && target/release/segprop-bench loadtest --workers 1000 --jobs 200

# Chaos soak: jobs on real workers while workers and the coordinator are killed (docs/benchmarks.md).
chaos:
    cargo build --release -p segprop-coordinator -p segprop-worker -p segprop-bench && target/release/segprop-bench chaos --jobs 6 --workers 3 --kill-every-ms 1500 --segment-steps 60

# The test command CI runs (README): format, lints, GPU paths compile, all tests.
test:
    bash scripts/test.sh

# Run a job spec: `just train configs/jobs/tiny-lw.yaml runs/lw`
train job out:
    cargo run --release -p segprop-worker -- train {{job}} --out {{out}}

# Check a job spec and print its stage plan.
validate job:
    cargo run --release -p segprop-worker -- validate {{job}}

# The measurements behind docs/benchmarks.md (run on an idle machine).
bench what="all":
    cargo run --release -p segprop-bench -- {{what}}

# The reference training step against PyTorch eager, side by side (needs `pip install torch
# transformers`; docs/benchmarks.md, "Training throughput").
bench-peers:
    cargo run --release -p segprop-bench -- throughput --steps 12 --peers --only reference

# The GPU build: a stripped release worker with burn-cuda, to carry to a GPU host.
build-cuda:
    cargo build --release -p segprop-worker --features cuda

fmt:
    cargo fmt --all

lint:
    cargo clippy --workspace --all-targets -- -D warnings

# Regenerate the golden loss curve after an intended numerics change (say why in the commit).
golden:
    SEGPROP_PRINT_GOLDEN=1 cargo test -p segprop-train --test golden -- --nocapture
