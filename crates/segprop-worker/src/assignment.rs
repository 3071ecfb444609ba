//! An assignment as the worker's tasks read it, decoded once from the wire (`convert.rs`), and
//! what a task that succeeded hands back to be reported.

use segprop_core::sched::{Artifact, Checkpoint, TaskResult};

/// Which task of the job, under which lease: what every message about it quotes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TaskRef {
    pub(crate) job_id: String,
    pub(crate) task_index: u32,
    /// The lease's fencing token.
    pub(crate) epoch: u64,
}

/// What the task does.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Work {
    /// Trains the plan entry [`Assignment::stage_index`].
    TrainStage,
    /// SnapCheck's advance step.
    Advance(Advance),
    /// Assembles the model; the metrics of every succeeded stage, in order.
    Export { stage_metrics: Vec<Artifact> },
}

/// SnapCheck's advance step: shard `shard` of `S[to] = F_{from:to}(S[from])` (`from = 0`: the
/// full prefix forward after stage 1), its blobs marked with `fingerprint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Advance {
    pub(crate) from: u32,
    pub(crate) to: u32,
    pub(crate) shard: u32,
    pub(crate) fingerprint: String,
}

/// The stored SnapCheck snapshots `S[depth]` a task reads (depth 0: none), in `shards` shards
/// whose blobs carry `fingerprint`; `complete`: every shard is stored (no waiting).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Snapshots {
    pub(crate) depth: u32,
    pub(crate) shards: u32,
    pub(crate) fingerprint: String,
    pub(crate) complete: bool,
}

/// One task to run, checked on arrival.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Assignment {
    pub(crate) task: TaskRef,
    pub(crate) work: Work,
    /// The plan entry the task belongs to.
    pub(crate) stage_index: u32,
    pub(crate) spec_yaml: String,
    /// The job's key prefix in the artifact and snapshot stores.
    pub(crate) job_dir: String,
    /// The state after the previous stage (none for the first).
    pub(crate) input_state: Option<Artifact>,
    /// A checkpoint of an earlier attempt to resume from.
    pub(crate) resume_from: Option<Checkpoint>,
    pub(crate) checkpoint_every_steps: u64,
    pub(crate) snapshots: Snapshots,
    /// W3C trace context of the job's submission (empty: not traced).
    pub(crate) traceparent: String,
}

impl Assignment {
    /// The kind's name in logs and spans.
    pub(crate) fn kind_name(&self) -> &'static str {
        match self.work {
            Work::TrainStage => "train_stage",
            Work::Advance(_) => "advance_snapshots",
            Work::Export { .. } => "export",
        }
    }

    /// The stored snapshots the task reads, if it reads any (an export reads none).
    pub(crate) fn reads_snapshots(&self) -> Option<&Snapshots> {
        let s = &self.snapshots;
        (s.depth > 0 && s.shards > 0 && !matches!(self.work, Work::Export { .. })).then_some(s)
    }
}

/// What a task that succeeded reports.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Succeeded {
    /// `[0]`: the state after the stage, the stored depth, or the exported model.
    pub(crate) outputs: Vec<Artifact>,
    /// The stage's metrics.jsonl.
    pub(crate) metrics: Option<Artifact>,
    /// The stage record, for people and tools.
    pub(crate) record_json: String,
    /// What the coordinator reads of the record.
    pub(crate) result: TaskResult,
    /// The global exit criterion fired: the remaining training stages are not needed.
    pub(crate) early_exit: bool,
}
