//! Jobs and tasks as the scheduler keeps them: what a task does, its status, its lease, the
//! artifacts and checkpoints it reported, and the job around them.

use serde::{Deserialize, Serialize};

use super::{Backend, JobId, WorkerId};

/// What a task does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TaskKind {
    /// Trains one stage of the plan.
    TrainStage { stage_index: u32, name: String },
    /// SnapCheck: once blocks `0..to` are committed (plan entry `stage_index` trained them),
    /// computes `S[to] = F_{from:to}(S[from])` for shard `shard` of `shards` of the batches and
    /// stores it for the next segment. `from == 0` is the full prefix forward after stage 1.
    AdvanceSnapshots {
        stage_index: u32,
        from: u32,
        to: u32,
        #[serde(default)]
        shard: u32,
        #[serde(default = "one")]
        shards: u32,
        name: String,
    },
    /// Assembles the trained stages into the final model.
    Export,
}

impl TaskKind {
    /// The stage's name (`stage1`, `segment-2-5`, ...), or `export`.
    pub fn name(&self) -> &str {
        match self {
            TaskKind::TrainStage { name, .. } | TaskKind::AdvanceSnapshots { name, .. } => name,
            TaskKind::Export => "export",
        }
    }
}

fn one() -> u32 {
    1
}

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// A task it runs after has not finished yet.
    Waiting,
    /// May be assigned (once `now >= not_before`).
    Ready,
    /// Leased to a worker.
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Not needed: an earlier stage exited early.
    Skipped,
}

impl TaskStatus {
    /// Succeeded, Failed, Cancelled or Skipped: the task will never change again.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            TaskStatus::Succeeded
                | TaskStatus::Failed
                | TaskStatus::Cancelled
                | TaskStatus::Skipped
        )
    }
}

/// A worker's right to run one attempt of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub worker_id: WorkerId,
    /// The fencing token: the n-th lease issued for this task has epoch n.
    pub epoch: u64,
    /// The lease is valid while `now <= expires_at` (unix milliseconds).
    pub expires_at: u64,
}

/// A file a task produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub uri: String,
    pub checksum: String,
    pub bytes: u64,
}

/// A mid-stage checkpoint a worker reported with a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Training step the checkpoint was taken after.
    pub step: u64,
    pub artifact: Artifact,
}

/// One step of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Position in the job's task list.
    pub index: u32,
    pub kind: TaskKind,
    /// Tasks (all of lower index) that must succeed or be skipped before this one may run.
    #[serde(default)]
    pub after: Vec<u32>,
    pub status: TaskStatus,
    /// Leases issued so far.
    pub attempts: u32,
    /// Attempts that failed or expired.
    pub failures: u32,
    /// Epoch of the latest lease issued (0 = never leased).
    pub epoch: u64,
    /// The current lease: `Some` iff `status == Running`.
    pub lease: Option<Lease>,
    /// Retry backoff: not assignable before this time.
    pub not_before: u64,
    /// Newest accepted mid-stage checkpoint (of any attempt); a retry resumes from it.
    pub checkpoint: Option<Checkpoint>,
    /// Set on success.
    pub outputs: Vec<Artifact>,
    /// Set on success.
    pub metrics: Option<Artifact>,
    /// Set on success: the stage record, for people and tools.
    pub result_json: Option<String>,
    /// Set on success: what the scheduler reads of the record.
    #[serde(default)]
    pub result: Option<TaskResult>,
    /// The latest failure's reason.
    pub error: Option<String>,
    /// Times this task was committed as Succeeded: never more than 1.
    pub commits: u32,
}

/// What a finished task reports that the scheduler and the CLI read (typed on the wire; the
/// whole stage record stays in [`Task::result_json`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    /// Optimizer steps the stage took (training stages).
    #[serde(default)]
    pub steps: u64,
    /// Held-out loss of the stage's network at its end.
    #[serde(default)]
    pub eval_loss: Option<f64>,
    /// SnapCheck: the estimated bytes of one stored snapshot depth (the first training stage
    /// of a SnapCheck job reports it; the snapshot budget reserves by it).
    #[serde(default)]
    pub snapshot_depth_bytes: Option<u64>,
    /// `advance_snapshots`: the depth it stored.
    #[serde(default)]
    pub snapshot_depth: Option<u32>,
    /// `advance_snapshots`: the batches it stored.
    #[serde(default)]
    pub snapshot_batches: u64,
    /// Export: held-out loss of the exported model.
    #[serde(default)]
    pub final_eval_loss: Option<f64>,
    /// Export: blocks of the exported model.
    #[serde(default)]
    pub final_num_layers: u32,
}

/// SnapCheck snapshot depths of a job by lifecycle (see [`Job::snapshot_gc`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotDepths {
    /// Depths a shard has started writing and that are not collected yet.
    pub live: Vec<u32>,
    /// Live depths no pending task can read any more: delete them now.
    pub dead: Vec<u32>,
}

impl Task {
    pub(super) fn new(index: u32, kind: TaskKind, after: Vec<u32>, status: TaskStatus) -> Self {
        Self {
            index,
            kind,
            after,
            status,
            attempts: 0,
            failures: 0,
            epoch: 0,
            lease: None,
            not_before: 0,
            checkpoint: None,
            outputs: Vec::new(),
            metrics: None,
            result_json: None,
            result: None,
            error: None,
            commits: 0,
        }
    }
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Submitted, nothing leased yet.
    Pending,
    /// At least one lease was issued.
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    /// Succeeded, Failed or Cancelled.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// A submitted training job and the state of its tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    /// Submission order: lower is scheduled first.
    pub seq: u64,
    pub name: String,
    pub regime: String,
    pub spec_yaml: String,
    /// Workers of this backend only (`cpu` or `cuda` in the stored JSON).
    pub backend: Backend,
    /// Devices one worker must have to run a task of this job.
    pub devices_per_gang: u32,
    pub checkpoint_every_steps: u64,
    pub status: JobStatus,
    pub tasks: Vec<Task>,
    /// Why the job failed.
    pub error: Option<String>,
    pub created_at: u64,
    pub finished_at: Option<u64>,
    /// SnapCheck depths whose snapshots were deleted from the store.
    #[serde(default)]
    pub snapshots_collected: Vec<u32>,
    /// The job's whole snapshot prefix was deleted once more, a lease after it ended: a shard
    /// cancelled while writing may put its last blob after the first collection.
    #[serde(default)]
    pub snapshots_swept: bool,
    /// What the submit-time pre-flight check decided (the micro-batch `batch_size: auto` got).
    #[serde(default)]
    pub preflight: Option<String>,
    /// W3C trace context of the `SubmitJob` call: every task assignment carries it, so the
    /// workers' spans join the submitter's trace. Empty when traces are not exported.
    #[serde(default)]
    pub traceparent: String,
}
