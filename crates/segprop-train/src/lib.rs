//! segprop-train: the training engine.
//!
//! It runs a job spec's regime (SegProp, layer-wise or end-to-end, DESIGN.md §2) on one device:
//! [`segprop`] holds the algorithm as the papers state it, [`engine::Trainer`] the mechanics
//! (steps, evaluation, exit criteria), [`snapcheck`] the prefix-activation cache, [`data`] the
//! corpora and tokenizers, [`metrics`] the records observers receive, and [`run`] a whole job
//! with its run directory (final model, metrics.jsonl, summary, loss plot).
//!
//! It depends on burn and segprop-model, never on gRPC or the coordinator: workers call it.

pub mod adapter;
pub mod alloc;
pub mod chat;
pub mod checkpoint;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod data;
pub mod engine;
pub mod error;
pub mod exit;
pub mod gang;
pub mod metrics;
pub mod never_whole;
pub mod params;
pub mod peak;
pub mod plot;
pub mod precision;
pub mod probe;
pub mod rank;
pub mod route;
pub mod run;
pub mod schedule;
pub mod segprop;
pub mod sharded;
pub mod snapcheck;
pub mod stage;
pub mod step;
pub mod tasks;
pub mod tokenizer;
pub mod utilization;

pub use engine::Trainer;
pub use error::TrainError;
pub use metrics::{RunSummary, TrainObserver};
pub use run::{RunOptions, run_job};

/// The CPU training backend: burn's `flex` backend (built with its SIMD, rayon and AVX-512
/// features) with autodiff, for every precision. It replaced `ndarray`, which upstream
/// deprecates, once it measured faster on our models (docs/adr/0003-cpu-backends.md,
/// docs/benchmarks.md "CPU backend choice").
pub type CpuBackend = burn::backend::Autodiff<burn::backend::Flex>;

/// The CPU backend of mixed-precision jobs (`resources.precision: bf16 | f16`): the same as
/// [`CpuBackend`] (flex has the 16-bit types), kept as its own name for the call sites that pick
/// a backend by precision.
pub type CpuHalfBackend = CpuBackend;
