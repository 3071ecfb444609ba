//! segprop-core: the vocabulary every other segprop crate shares.
//!
//! It owns the job spec (what a user writes in `job.yaml`) and its validation, the LLaMA shape
//! configuration and presets (pure numbers, usable by the planner without burn), and the SegProp
//! stage plan derived from a spec. It must not depend on burn, tonic, tokio or any I/O beyond
//! reading a spec file, so the coordinator and the planner can link it cheaply.

pub mod chat;
pub mod checksum;
pub mod error;
mod hf_config;
pub mod llama_config;
pub mod plan;
pub mod planner;
pub mod sched;
pub mod spec;
pub mod validate;

pub use error::SpecError;
pub use llama_config::{LlamaConfig, ModelType, RopeScaling};
pub use plan::{StageKind, StagePlan, StagePlanEntry};
pub use spec::{
    BatchSize, DataFormat, DataSpec, DecaySchedule, ExitSpec, GlobalExitSpec, HeadPolicy, JobSpec,
    LwVariant, MicroBatch, Precision, Regime, ScheduleSpec, SnapshotDtype, TaskExample, TaskSpec,
    TokenizerKind, TokenizerSpec,
};
