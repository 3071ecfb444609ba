//! What the worker that leased a task is sent ([`Dispatch`]): which attempt, what to do, and
//! where its inputs are. The coordinator builds it from the job; the worker runs it; the wire
//! form is `segprop.v1.Assignment` (converted in `segprop_proto::domain`).

use super::{Artifact, Checkpoint, Job, JobId, Task, TaskKind, TaskStatus};

/// One attempt at a task (its lease's epoch): what a worker quotes in every message about it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Attempt {
    pub job_id: JobId,
    pub task_index: u32,
    /// The lease's fencing token.
    pub epoch: u64,
}

/// What the task does.
#[derive(Debug, Clone, PartialEq)]
pub enum Work {
    /// Trains the plan entry [`Dispatch::stage_index`].
    TrainStage,
    /// SnapCheck's advance step.
    Advance(Advance),
    /// Assembles the model; the metrics of every succeeded stage, in order.
    Export { stage_metrics: Vec<Artifact> },
}

/// SnapCheck's advance step: shard `shard` of `S[to] = F_{from:to}(S[from])` (`from = 0`: the
/// full prefix forward after stage 1), its blobs marked with `fingerprint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advance {
    pub from: u32,
    pub to: u32,
    pub shard: u32,
    pub fingerprint: String,
}

/// The stored SnapCheck snapshots `S[depth]` a task reads (depth 0: none), in `shards` shards
/// (an advance writes its depth in as many) whose blobs carry `fingerprint`; `complete`: every
/// shard is stored (no waiting).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshots {
    pub depth: u32,
    pub shards: u32,
    pub fingerprint: String,
    pub complete: bool,
}

/// One task as its worker is sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct Dispatch {
    pub attempt: Attempt,
    pub work: Work,
    /// The plan entry the task belongs to.
    pub stage_index: u32,
    pub spec_yaml: String,
    /// The job's key prefix in the artifact and snapshot stores.
    pub job_dir: String,
    /// The state after the previous stage (none for the first).
    pub input_state: Option<Artifact>,
    /// A checkpoint of an earlier attempt to resume from.
    pub resume_from: Option<Checkpoint>,
    pub checkpoint_every_steps: u64,
    pub snapshots: Snapshots,
    /// W3C trace context of the job's submission (empty: not traced).
    pub traceparent: String,
}

impl Dispatch {
    /// The kind's name in logs and spans.
    pub fn kind_name(&self) -> &'static str {
        match self.work {
            Work::TrainStage => "train_stage",
            Work::Advance(_) => "advance_snapshots",
            Work::Export { .. } => "export",
        }
    }

    /// The stored snapshots the task reads, if it reads any (an export reads none).
    pub fn reads_snapshots(&self) -> Option<&Snapshots> {
        let s = &self.snapshots;
        (s.depth > 0 && s.shards > 0 && !matches!(self.work, Work::Export { .. })).then_some(s)
    }
}

impl Job {
    /// What the worker needs to run task `index` under lease `epoch`; `job_dir` is the job's
    /// key prefix in the stores.
    pub fn dispatch(&self, index: u32, epoch: u64, job_dir: String) -> Dispatch {
        let task = &self.tasks[index as usize];
        // SnapCheck: the depth the task reads from the snapshot store (0 = none). A training
        // stage reads the newest depth planned before it; a shard reads its `from`.
        let newest_depth = self.tasks[..index as usize]
            .iter()
            .rev()
            .find_map(|t| match t.kind {
                TaskKind::AdvanceSnapshots { to, .. } => Some(to),
                _ => None,
            });
        let (stage_index, depth, work) = match &task.kind {
            TaskKind::TrainStage { stage_index, .. } => {
                (*stage_index, newest_depth.unwrap_or(0), Work::TrainStage)
            }
            TaskKind::AdvanceSnapshots {
                stage_index,
                from,
                to,
                shard,
                ..
            } => (
                *stage_index,
                *from,
                Work::Advance(Advance {
                    from: *from,
                    to: *to,
                    shard: *shard,
                    fingerprint: self.snapshot_fingerprint(*to),
                }),
            ),
            TaskKind::Export => (
                0,
                0,
                Work::Export {
                    stage_metrics: self
                        .tasks
                        .iter()
                        .filter(|t| t.status == TaskStatus::Succeeded)
                        .filter_map(|t| t.metrics.clone())
                        .collect(),
                },
            ),
        };
        let input_shards = self.shards_of(depth);
        let shards = match &task.kind {
            TaskKind::AdvanceSnapshots { shards, .. } => *shards,
            _ => u32::try_from(input_shards.len()).unwrap_or(u32::MAX),
        };
        Dispatch {
            attempt: Attempt {
                job_id: self.id.clone(),
                task_index: index,
                epoch,
            },
            work,
            stage_index,
            spec_yaml: self.spec_yaml.clone(),
            job_dir,
            input_state: self.state_before(index).cloned(),
            resume_from: task.checkpoint.clone(),
            checkpoint_every_steps: self.checkpoint_every_steps,
            snapshots: Snapshots {
                depth,
                shards,
                fingerprint: if depth > 0 {
                    self.snapshot_fingerprint(depth)
                } else {
                    String::new()
                },
                complete: input_shards
                    .iter()
                    .all(|t| t.status == TaskStatus::Succeeded),
            },
            traceparent: self.traceparent.clone(),
        }
    }

    /// The state a task starts from: the output of the latest succeeded training stage before
    /// it.
    fn state_before(&self, index: u32) -> Option<&Artifact> {
        self.tasks[..index as usize]
            .iter()
            .rev()
            .find(|t| {
                t.status == TaskStatus::Succeeded && matches!(t.kind, TaskKind::TrainStage { .. })
            })
            .and_then(|t| t.outputs.first())
    }

    /// The shards that write `S[depth]` (in task order).
    fn shards_of(&self, depth: u32) -> Vec<&Task> {
        self.tasks
            .iter()
            .filter(|t| matches!(t.kind, TaskKind::AdvanceSnapshots { to, .. } if to == depth))
            .collect()
    }

    /// The fingerprint stored with `S[depth]`: the checksum of the committed state its shards
    /// started from (so a snapshot of other weights can never be read as this one).
    fn snapshot_fingerprint(&self, depth: u32) -> String {
        self.shards_of(depth)
            .first()
            .and_then(|t| self.state_before(t.index))
            .map(|a| a.checksum.clone())
            .unwrap_or_default()
    }
}
