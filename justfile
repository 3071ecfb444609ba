# Everyday recipes. `just --list` shows them. (Install just with `pip install rust-just`.)

# Run the demo job on embedded defaults (tiny LLaMA, SegProp, CPU).
demo out="runs/demo":
    cargo run --release -p segprop-worker -- train --out {{out}}

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
