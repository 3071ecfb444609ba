//! Job and task state machines and the task scheduler of the coordinator.
//!
//! A job is a small DAG of tasks: one [`TaskKind::TrainStage`] task per stage of its
//! [`StagePlan`], in plan order, the SnapCheck [`TaskKind::AdvanceSnapshots`] shards between
//! SegProp segments, then one [`TaskKind::Export`] task. A task runs once every task in its
//! `after` list succeeded or was skipped ([`plan_tasks`] builds the lists): training stages form a
//! chain, while the shards of one snapshot depth run side by side on every free worker.
//!
//! Everything here is pure: no I/O and no clocks. Time comes in as `now`, in unix milliseconds,
//! and the coordinator persists [`Job`] (it serializes to JSON) after every change.
//!
//! # Leases and fencing
//!
//! A worker runs a task under a [`Lease`]. Each lease issued for a task gets the next *epoch* of
//! that task (1, 2, ...), and every message a worker sends about a task carries the epoch it was
//! given. **Epochs, not worker ids, are the fencing token**: a message with any epoch but the
//! current lease's is refused ([`Reject::StaleEpoch`]), so a worker that lost its lease (it stopped
//! heartbeating, the task was re-leased elsewhere) can never commit a result. The worker id is a
//! second check for messages on a live connection; after a coordinator restart workers re-register
//! under new ids and [`adopt`] rebinds a still-current lease to the new id on the epoch alone.
//!
//! A lease is valid while `now <= expires_at`; [`renew`] (the heartbeat) pushes `expires_at` to
//! `now + lease_ms`, and [`expire_leases`] turns a lease with `expires_at < now` into a failed
//! attempt. A refused message ([`Reject`]) changes nothing.
//!
//! # Attempts and retries
//!
//! `attempts` counts leases issued; `failures` counts attempts that failed or expired. A retryable
//! failure makes the task `Ready` again after a backoff ([`SchedConfig::backoff`]) until `failures`
//! reaches `max_attempts`; then the task fails and so does its job (its other unfinished tasks are
//! cancelled). A retry resumes from the newest [`Checkpoint`] any attempt reported.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::plan::{StageKind, StagePlan};

/// Scheduler tuning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedConfig {
    /// How long a lease lives without a heartbeat.
    pub lease_ms: u64,
    /// Failed or expired attempts after which a task (and its job) fails.
    pub max_attempts: u32,
    /// Retry delay after the first failure; it doubles with each further failure.
    pub backoff_base_ms: u64,
    /// Upper bound of the retry delay.
    pub backoff_max_ms: u64,
    /// Byte budget of the snapshot store (`None`: unlimited). See [`Job::snapshot_reservation`].
    pub snapshot_budget_bytes: Option<u64>,
}

impl Default for SchedConfig {
    fn default() -> Self {
        Self {
            lease_ms: 10_000,
            max_attempts: 3,
            backoff_base_ms: 1_000,
            backoff_max_ms: 30_000,
            snapshot_budget_bytes: None,
        }
    }
}

impl SchedConfig {
    /// The retry delay after `failures` failures: `backoff_base_ms * 2^(failures - 1)`, capped at
    /// `backoff_max_ms`; 0 when nothing has failed.
    pub fn backoff(&self, failures: u32) -> u64 {
        if failures == 0 {
            return 0;
        }
        let factor = 1u64.checked_shl(failures - 1).unwrap_or(u64::MAX);
        self.backoff_base_ms
            .saturating_mul(factor)
            .min(self.backoff_max_ms)
    }
}

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
    pub worker_id: String,
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Set on success.
    pub result_json: Option<String>,
    /// The latest failure's reason.
    pub error: Option<String>,
    /// Times this task was committed as Succeeded: never more than 1.
    pub commits: u32,
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
    fn new(index: u32, kind: TaskKind, after: Vec<u32>, status: TaskStatus) -> Self {
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    /// Submission order: lower is scheduled first.
    pub seq: u64,
    pub name: String,
    pub regime: String,
    pub spec_yaml: String,
    /// `cpu` or `cuda`: workers of this backend only.
    pub backend: String,
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

/// A task of a new job: what it does and which tasks (by index) it runs after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedTask {
    pub kind: TaskKind,
    pub after: Vec<u32>,
}

/// How SnapCheck snapshots are produced between SegProp segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFanout {
    /// `AdvanceSnapshots` shards per depth (each takes `1/shards` of the batches).
    pub shards: u32,
    /// Streaming overlap: a segment may start once the first shard of its input depth is
    /// stored (it waits for the others' batches as it reaches them) instead of all of them.
    pub overlap: bool,
}

/// The tasks of `plan`: one `TrainStage` per entry, each after the previous one, then `Export`
/// after everything.
///
/// With `snapshots` (SegProp with SnapCheck), the input `S[start]` of every stage-2 segment is
/// produced by `shards` `AdvanceSnapshots` tasks that run side by side once blocks `0..start`
/// are committed: after stage 1 a full prefix forward (`from = 0`), later
/// `S[start] = F_{prev}(S[prev])`, which also waits for every shard of `S[prev]`. A segment
/// waits for all shards of its input, or only the first with `overlap`.
pub fn plan_tasks(plan: &StagePlan, snapshots: Option<SnapshotFanout>) -> Vec<PlannedTask> {
    let mut tasks: Vec<PlannedTask> = Vec::new();
    let index = |tasks: &Vec<PlannedTask>| u32::try_from(tasks.len()).unwrap_or(u32::MAX);
    let as_u32 = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    let mut last_stage: Option<u32> = None;
    // Shards of the newest snapshot depth (and that depth).
    let mut shards_of: Option<(u32, Vec<u32>)> = None;
    for entry in &plan.stages {
        let stage_index = as_u32(entry.index);
        let mut after: Vec<u32> = last_stage.into_iter().collect();
        if let (StageKind::Segment { start, .. }, Some(fanout), Some(prev)) =
            (entry.kind, snapshots, last_stage)
        {
            let from = shards_of.as_ref().map_or(0, |(depth, _)| *depth);
            let mut shard_after = vec![prev];
            if let Some((_, ids)) = &shards_of {
                shard_after.extend(ids);
            }
            let shards = fanout.shards.max(1);
            let mut ids = Vec::new();
            for shard in 0..shards {
                ids.push(index(&tasks));
                tasks.push(PlannedTask {
                    kind: TaskKind::AdvanceSnapshots {
                        stage_index: stage_index.saturating_sub(1),
                        from,
                        to: as_u32(start),
                        shard,
                        shards,
                        name: if shards == 1 {
                            format!("snapshots-{start}")
                        } else {
                            format!("snapshots-{start}-{}of{shards}", shard + 1)
                        },
                    },
                    after: shard_after.clone(),
                });
            }
            if fanout.overlap {
                after.push(ids[0]);
            } else {
                after.extend(&ids);
            }
            shards_of = Some((as_u32(start), ids));
        }
        last_stage = Some(index(&tasks));
        tasks.push(PlannedTask {
            kind: TaskKind::TrainStage {
                stage_index,
                name: entry.name.clone(),
            },
            after,
        });
    }
    let all = (0..index(&tasks)).collect();
    tasks.push(PlannedTask {
        kind: TaskKind::Export,
        after: all,
    });
    tasks
}

impl Job {
    /// A new `Pending` job running `tasks` (see [`plan_tasks`]): the tasks that run after
    /// nothing are `Ready`, the others `Waiting`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        seq: u64,
        name: String,
        regime: String,
        spec_yaml: String,
        backend: String,
        devices_per_gang: u32,
        checkpoint_every_steps: u64,
        tasks: Vec<PlannedTask>,
        now: u64,
    ) -> Job {
        let tasks = tasks
            .into_iter()
            .enumerate()
            .map(|(i, planned)| {
                let status = if planned.after.is_empty() {
                    TaskStatus::Ready
                } else {
                    TaskStatus::Waiting
                };
                Task::new(
                    u32::try_from(i).unwrap_or(u32::MAX),
                    planned.kind,
                    planned.after,
                    status,
                )
            })
            .collect();
        Job {
            id,
            seq,
            name,
            regime,
            spec_yaml,
            backend,
            devices_per_gang,
            checkpoint_every_steps,
            status: JobStatus::Pending,
            tasks,
            error: None,
            created_at: now,
            finished_at: None,
            snapshots_collected: Vec::new(),
            snapshots_swept: false,
            preflight: None,
            traceparent: String::new(),
        }
    }

    /// Which stored snapshot depths are live and which may be deleted. `S[d]` is read by the
    /// training stage planned right after its shards and by the shards that advance it to the
    /// next depth; once those are all finished (or the job is), nothing reads it again. With
    /// [`plan_tasks`]' ordering at most two depths are live at any time: the one a segment
    /// trains on and the one being advanced from it.
    pub fn snapshot_gc(&self) -> SnapshotDepths {
        let mut depths: Vec<u32> = Vec::new();
        for task in &self.tasks {
            if let TaskKind::AdvanceSnapshots { to, .. } = task.kind
                && task.epoch > 0
                && !depths.contains(&to)
                && !self.snapshots_collected.contains(&to)
            {
                depths.push(to);
            }
        }
        let finished = |t: &Task| t.status.is_terminal();
        let dead = depths
            .iter()
            .copied()
            .filter(|&d| {
                if self.is_terminal() {
                    return true;
                }
                let last_shard = self
                    .tasks
                    .iter()
                    .rev()
                    .find(|t| matches!(t.kind, TaskKind::AdvanceSnapshots { to, .. } if to == d))
                    .map_or(0, |t| t.index);
                let reader_done = self
                    .tasks
                    .iter()
                    .find(|t| t.index > last_shard && matches!(t.kind, TaskKind::TrainStage { .. }))
                    .is_none_or(finished);
                let advanced = self
                    .tasks
                    .iter()
                    .filter(
                        |t| matches!(t.kind, TaskKind::AdvanceSnapshots { from, .. } if from == d),
                    )
                    .all(finished);
                reader_done && advanced
            })
            .collect();
        SnapshotDepths { live: depths, dead }
    }

    /// Bytes of one stored snapshot depth of this job: the largest depth stored so far (the
    /// sum of its shards' outputs), else the estimate its first training stage reported
    /// (`snapshot_depth_bytes` in the stage's result), else `None`. Every depth holds the same
    /// batches at the same width and dtype, so one depth predicts the next.
    pub fn snapshot_depth_bytes(&self) -> Option<u64> {
        let mut by_depth: Vec<(u32, u64)> = Vec::new();
        for task in &self.tasks {
            if let TaskKind::AdvanceSnapshots { to, .. } = task.kind
                && task.status == TaskStatus::Succeeded
            {
                let bytes: u64 = task.outputs.iter().map(|a| a.bytes).sum();
                match by_depth.iter_mut().find(|(d, _)| *d == to) {
                    Some((_, total)) => *total += bytes,
                    None => by_depth.push((to, bytes)),
                }
            }
        }
        let measured = by_depth.iter().map(|(_, b)| *b).max();
        let estimated = self
            .tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Succeeded)
            .filter_map(|t| t.result_json.as_deref())
            .filter_map(|r| serde_json::from_str::<serde_json::Value>(r).ok())
            .find_map(|v| {
                v.get("snapshot_depth_bytes")
                    .and_then(serde_json::Value::as_u64)
            });
        match (measured, estimated) {
            (Some(m), Some(e)) => Some(m.max(e)),
            (m, e) => m.or(e),
        }
    }

    /// Bytes this job holds in the snapshot store budget: two depths (the most that are live
    /// at once: the one a segment trains on and the one advanced from it) from the lease of its
    /// first `advance_snapshots` shard until the job ends; 0 before and after.
    pub fn snapshot_reservation(&self) -> u64 {
        let started = self
            .tasks
            .iter()
            .any(|t| matches!(t.kind, TaskKind::AdvanceSnapshots { .. }) && t.epoch > 0);
        if self.is_terminal() || !started {
            return 0;
        }
        2 * self.snapshot_depth_bytes().unwrap_or(0)
    }

    /// Succeeded, Failed or Cancelled.
    pub fn is_terminal(&self) -> bool {
        self.status.is_terminal()
    }

    /// The live leases as (task index, lease).
    pub fn running_leases(&self) -> impl Iterator<Item = (u32, &Lease)> {
        self.tasks
            .iter()
            .filter_map(|t| t.lease.as_ref().map(|lease| (t.index, lease)))
    }

    /// Makes `Ready` every `Waiting` task whose `after` tasks all succeeded or were skipped.
    fn release_ready(&mut self) {
        let done: Vec<bool> = self
            .tasks
            .iter()
            .map(|t| matches!(t.status, TaskStatus::Succeeded | TaskStatus::Skipped))
            .collect();
        for task in &mut self.tasks {
            let ready = task
                .after
                .iter()
                .all(|&i| done.get(i as usize).copied().unwrap_or(false));
            if task.status == TaskStatus::Waiting && ready {
                task.status = TaskStatus::Ready;
            }
        }
    }

    /// Jobs stored before tasks had `after` lists were chains: task `i` ran after task `i - 1`.
    pub fn upgrade_legacy_chain(&mut self) {
        if self.tasks.len() > 1 && self.tasks.iter().all(|t| t.after.is_empty()) {
            for task in self.tasks.iter_mut().skip(1) {
                task.after = vec![task.index - 1];
            }
        }
    }

    fn task_mut(&mut self, task_index: u32) -> Option<&mut Task> {
        self.tasks.get_mut(usize::try_from(task_index).ok()?)
    }

    /// Fails task `task_index` and the job with it; cancels every other unfinished task.
    fn fail(&mut self, task_index: u32, reason: String, now: u64) -> Vec<Transition> {
        let mut name = String::new();
        for task in &mut self.tasks {
            if task.index == task_index {
                task.status = TaskStatus::Failed;
                task.lease = None;
                task.error = Some(reason.clone());
                name = task.kind.name().to_string();
            } else if !task.status.is_terminal() {
                task.status = TaskStatus::Cancelled;
                task.lease = None;
            }
        }
        self.status = JobStatus::Failed;
        self.error = Some(format!("task {name} failed: {reason}"));
        self.finished_at = Some(now);
        vec![
            Transition::TaskFailed {
                job_id: self.id.clone(),
                task_index,
                reason,
            },
            Transition::JobFinished {
                job_id: self.id.clone(),
                status: JobStatus::Failed,
            },
        ]
    }

    /// One attempt of task `task_index` failed: retry it after a backoff, or fail the job.
    fn attempt_failed(
        &mut self,
        task_index: u32,
        reason: String,
        retryable: bool,
        now: u64,
        cfg: &SchedConfig,
    ) -> Vec<Transition> {
        let Some(task) = self.task_mut(task_index) else {
            return Vec::new();
        };
        task.lease = None;
        task.failures = task.failures.saturating_add(1);
        let failures = task.failures;
        if retryable && failures < cfg.max_attempts {
            let not_before = now.saturating_add(cfg.backoff(failures));
            task.status = TaskStatus::Ready;
            task.not_before = not_before;
            task.error = Some(reason.clone());
            vec![Transition::TaskRetry {
                job_id: self.id.clone(),
                task_index,
                failures,
                not_before,
                reason,
            }]
        } else {
            self.fail(task_index, reason, now)
        }
    }
}

/// A registered worker as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerView {
    pub id: String,
    /// `cpu` or `cuda`.
    pub backend: String,
    /// Devices the worker drives.
    pub devices: u32,
    /// Tasks it can take on now.
    pub free_slots: u32,
}

/// A task leased to a worker by [`assign`]: the coordinator sends it to the worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub job_id: String,
    pub task_index: u32,
    /// The lease's epoch: the worker quotes it in every message about the task.
    pub epoch: u64,
    pub worker_id: String,
}

/// Why a worker's message about a task was refused (nothing changes when it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reject", rename_all = "snake_case")]
pub enum Reject {
    /// The job has no task of that index.
    UnknownTask,
    /// The task is not leased to anyone (waiting, ready for a retry, or finished).
    NotRunning,
    /// The lease is held by another worker.
    WrongWorker { holder: String },
    /// The epoch is not the current lease's: the lease was superseded (or never issued).
    StaleEpoch { current: u64, got: u64 },
    /// The lease expired before the message arrived.
    Expired,
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reject::UnknownTask => write!(f, "the job has no such task"),
            Reject::NotRunning => write!(f, "the task is not running (it holds no lease)"),
            Reject::WrongWorker { holder } => {
                write!(f, "the task's lease is held by worker {holder}")
            }
            Reject::StaleEpoch { current, got } if got < current => {
                write!(f, "lease epoch {got} is superseded by epoch {current}")
            }
            Reject::StaleEpoch { current, got } => write!(
                f,
                "lease epoch {got} was never issued (the current epoch is {current})"
            ),
            Reject::Expired => write!(f, "the lease has expired"),
        }
    }
}

impl std::error::Error for Reject {}

/// How an attempt ended, as its worker reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Succeeded {
        outputs: Vec<Artifact>,
        metrics: Option<Artifact>,
        result_json: String,
        /// The global exit criterion fired: the remaining training stages are not needed.
        early_exit: bool,
    },
    Failed {
        reason: String,
        /// False for errors a retry cannot fix (a bad spec, a shape mismatch).
        retryable: bool,
    },
}

/// What changed, for logs and watchers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "transition", rename_all = "snake_case")]
pub enum Transition {
    TaskLeased {
        job_id: String,
        task_index: u32,
        epoch: u64,
        worker_id: String,
    },
    TaskSucceeded {
        job_id: String,
        task_index: u32,
    },
    /// An attempt failed or expired; the task is `Ready` again from `not_before`.
    TaskRetry {
        job_id: String,
        task_index: u32,
        failures: u32,
        not_before: u64,
        reason: String,
    },
    TaskFailed {
        job_id: String,
        task_index: u32,
        reason: String,
    },
    TaskSkipped {
        job_id: String,
        task_index: u32,
    },
    JobFinished {
        job_id: String,
        status: JobStatus,
    },
}

/// Ends every lease with `expires_at < now`: the attempt counts as a failure ("lease expired
/// (worker W stopped heartbeating)"); the task is `Ready` again after a backoff, or `Failed` once
/// `failures >= max_attempts` (its job `Failed`, the job's other unfinished tasks `Cancelled`).
pub fn expire_leases(jobs: &mut [Job], now: u64, cfg: &SchedConfig) -> Vec<Transition> {
    let mut transitions = Vec::new();
    for job in jobs.iter_mut().filter(|job| !job.is_terminal()) {
        let expired: Vec<(u32, String)> = job
            .running_leases()
            .filter(|(_, lease)| lease.expires_at < now)
            .map(|(index, lease)| (index, lease.worker_id.clone()))
            .collect();
        for (task_index, worker_id) in expired {
            if job.is_terminal() {
                break;
            }
            let reason = format!("lease expired (worker {worker_id} stopped heartbeating)");
            transitions.extend(job.attempt_failed(task_index, reason, true, now, cfg));
        }
    }
    transitions
}

/// Assigns the `Ready` tasks (with `not_before <= now`) of non-terminal jobs, in ascending `seq`
/// (FIFO), to workers with a free slot, the job's backend and at least `devices_per_gang`
/// devices. Among the workers that fit, the one with the most free slots left wins (the first in
/// `workers` on a tie), which spreads tasks over workers. Each assignment takes one free slot of
/// a local copy of `workers`.
///
/// A lease gets epoch `task.epoch + 1` and expires at `now + lease_ms`; `attempts` goes up by one
/// and a `Pending` job becomes `Running`.
///
/// With a snapshot budget, a job's first `advance_snapshots` shard is held back (it stays
/// `Ready`) while the other jobs' reservations plus its own ([`Job::snapshot_reservation`])
/// exceed the budget; a job whose own reservation exceeds the whole budget fails there, with a
/// message giving both numbers. Once started, a job is never held back again, so jobs admitted
/// together cannot wait on each other.
pub fn assign(
    jobs: &mut [Job],
    workers: &[WorkerView],
    now: u64,
    cfg: &SchedConfig,
) -> (Vec<Assignment>, Vec<Transition>) {
    let mut free: Vec<u32> = workers.iter().map(|w| w.free_slots).collect();
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| jobs[i].seq);
    let mut assignments = Vec::new();
    let mut transitions = Vec::new();
    // Reservations parse stage results: only a coordinator with a budget needs them.
    let budgeted = cfg.snapshot_budget_bytes.is_some();
    let mut reserved: u64 = if budgeted {
        jobs.iter().map(Job::snapshot_reservation).sum()
    } else {
        0
    };
    for job_pos in order {
        let job = &mut jobs[job_pos];
        if job.is_terminal() {
            continue;
        }
        for task_pos in 0..job.tasks.len() {
            let task = &job.tasks[task_pos];
            if task.status != TaskStatus::Ready || task.not_before > now {
                continue;
            }
            if let (Some(budget), TaskKind::AdvanceSnapshots { .. }) =
                (cfg.snapshot_budget_bytes, &task.kind)
                && job.snapshot_reservation() == 0
            {
                let need = 2 * job.snapshot_depth_bytes().unwrap_or(0);
                if need > budget {
                    let reason = format!(
                        "SnapCheck keeps two snapshot depths of {} bytes each live ({need} \
                         bytes), more than the snapshot store budget of {budget} bytes \
                         (coordinator snapshot_budget_bytes): raise the budget, or turn \
                         SnapCheck off (segprop.snapcheck: false)",
                        need / 2
                    );
                    let index = task.index;
                    transitions.extend(job.fail(index, reason, now));
                    break;
                }
                if reserved.saturating_add(need) > budget {
                    continue;
                }
            }
            let chosen = workers
                .iter()
                .enumerate()
                .filter(|(w, worker)| {
                    free[*w] > 0
                        && worker.backend == job.backend
                        && worker.devices >= job.devices_per_gang
                })
                .max_by(|(a, _), (b, _)| free[*a].cmp(&free[*b]).then(b.cmp(a)))
                .map(|(w, _)| w);
            let Some(w) = chosen else {
                continue;
            };
            free[w] -= 1;
            let worker_id = workers[w].id.clone();
            let before = if budgeted {
                job.snapshot_reservation()
            } else {
                0
            };
            let task = &mut job.tasks[task_pos];
            task.epoch += 1;
            task.attempts = task.attempts.saturating_add(1);
            task.status = TaskStatus::Running;
            task.lease = Some(Lease {
                worker_id: worker_id.clone(),
                epoch: task.epoch,
                expires_at: now.saturating_add(cfg.lease_ms),
            });
            let (task_index, epoch) = (task.index, task.epoch);
            if job.status == JobStatus::Pending {
                job.status = JobStatus::Running;
            }
            if budgeted {
                reserved =
                    reserved.saturating_add(job.snapshot_reservation().saturating_sub(before));
            }
            assignments.push(Assignment {
                job_id: job.id.clone(),
                task_index,
                epoch,
                worker_id: worker_id.clone(),
            });
            transitions.push(Transition::TaskLeased {
                job_id: job.id.clone(),
                task_index,
                epoch,
                worker_id,
            });
        }
    }
    (assignments, transitions)
}

/// Checks that `worker_id` holds the current, unexpired lease of epoch `epoch` on the task.
///
/// The epoch is checked before the worker, so a message from a superseded attempt is reported
/// as [`Reject::StaleEpoch`] whoever holds the task now.
fn check_lease<'a>(
    job: &'a mut Job,
    task_index: u32,
    epoch: u64,
    worker_id: &str,
    now: u64,
) -> Result<&'a mut Task, Reject> {
    let task = job.task_mut(task_index).ok_or(Reject::UnknownTask)?;
    let lease = match (&task.status, &task.lease) {
        (TaskStatus::Running, Some(lease)) => lease,
        _ => return Err(Reject::NotRunning),
    };
    if lease.epoch != epoch {
        return Err(Reject::StaleEpoch {
            current: lease.epoch,
            got: epoch,
        });
    }
    if lease.worker_id != worker_id {
        return Err(Reject::WrongWorker {
            holder: lease.worker_id.clone(),
        });
    }
    if lease.expires_at < now {
        return Err(Reject::Expired);
    }
    Ok(task)
}

/// A heartbeat: `worker_id` still runs the task under lease `epoch`. Checks the lease (it
/// exists, is held by `worker_id` with that epoch and has not expired at `now`), extends it to
/// `now + lease_ms`, and records `checkpoint` if it is newer (a greater step) than the stored one.
pub fn renew(
    job: &mut Job,
    task_index: u32,
    epoch: u64,
    worker_id: &str,
    checkpoint: Option<Checkpoint>,
    now: u64,
    cfg: &SchedConfig,
) -> Result<(), Reject> {
    let task = check_lease(job, task_index, epoch, worker_id, now)?;
    if let Some(lease) = task.lease.as_mut() {
        lease.expires_at = now.saturating_add(cfg.lease_ms);
    }
    if let Some(checkpoint) = checkpoint {
        let newer = task
            .checkpoint
            .as_ref()
            .is_none_or(|stored| checkpoint.step > stored.step);
        if newer {
            task.checkpoint = Some(checkpoint);
        }
    }
    Ok(())
}

/// A worker reports the end of an attempt; the lease checks are [`renew`]'s.
///
/// On success the task is `Succeeded` (committed once: a second report is refused because the
/// lease is gone), its outputs are stored and every task whose `after` tasks are now all done
/// becomes `Ready`; with `early_exit` every waiting or ready task but `Export` is `Skipped` (a
/// running snapshot shard finishes; `Export` runs after it). When `Export`
/// succeeds the job is `Succeeded`.
///
/// On failure `failures` goes up by one; a retryable failure with `failures < max_attempts` makes
/// the task `Ready` again from `now + backoff(failures)`. Otherwise the task is `Failed`, the job
/// `Failed` with error "task NAME failed: REASON", and its other unfinished tasks `Cancelled`.
pub fn complete(
    job: &mut Job,
    task_index: u32,
    epoch: u64,
    worker_id: &str,
    outcome: Outcome,
    now: u64,
    cfg: &SchedConfig,
) -> Result<Vec<Transition>, Reject> {
    let task = check_lease(job, task_index, epoch, worker_id, now)?;
    match outcome {
        Outcome::Failed { reason, retryable } => {
            Ok(job.attempt_failed(task_index, reason, retryable, now, cfg))
        }
        Outcome::Succeeded {
            outputs,
            metrics,
            result_json,
            early_exit,
        } => {
            task.status = TaskStatus::Succeeded;
            task.lease = None;
            task.commits = task.commits.saturating_add(1);
            task.outputs = outputs;
            task.metrics = metrics;
            task.result_json = Some(result_json);
            task.error = None;
            let was_export = task.kind == TaskKind::Export;
            let mut transitions = vec![Transition::TaskSucceeded {
                job_id: job.id.clone(),
                task_index,
            }];
            if was_export {
                job.status = JobStatus::Succeeded;
                job.finished_at = Some(now);
                transitions.push(Transition::JobFinished {
                    job_id: job.id.clone(),
                    status: JobStatus::Succeeded,
                });
                return Ok(transitions);
            }
            if early_exit {
                let job_id = job.id.clone();
                for next in job.tasks.iter_mut().filter(|t| {
                    matches!(t.status, TaskStatus::Waiting | TaskStatus::Ready)
                        && t.kind != TaskKind::Export
                }) {
                    next.status = TaskStatus::Skipped;
                    transitions.push(Transition::TaskSkipped {
                        job_id: job_id.clone(),
                        task_index: next.index,
                    });
                }
            }
            job.release_ready();
            Ok(transitions)
        }
    }
}

/// Cancels a non-terminal job: every unfinished task is `Cancelled` (its lease dropped), the job
/// `Cancelled` with `finished_at = now`. Returns the revoked leases as (task index, lease) so the
/// coordinator can tell their workers to stop. A terminal job is left alone (returns nothing).
pub fn cancel(job: &mut Job, now: u64) -> Vec<(u32, Lease)> {
    if job.is_terminal() {
        return Vec::new();
    }
    let mut revoked = Vec::new();
    for task in job.tasks.iter_mut().filter(|t| !t.status.is_terminal()) {
        if let Some(lease) = task.lease.take() {
            revoked.push((task.index, lease));
        }
        task.status = TaskStatus::Cancelled;
    }
    job.status = JobStatus::Cancelled;
    job.finished_at = Some(now);
    revoked
}

/// A worker that re-registered after a coordinator restart says it still runs the task under
/// lease `epoch`. Returns true when that lease is still current and unexpired at `now`: the lease
/// is then rebound to `worker_id` (the worker's new id; its old one is gone) and renewed to
/// `now + lease_ms`. Returns false otherwise, changing nothing: the worker must stop the attempt.
///
/// The worker id is not checked: the epoch is the fencing token.
pub fn adopt(
    job: &mut Job,
    task_index: u32,
    epoch: u64,
    worker_id_old_or_new: &str,
    now: u64,
    cfg: &SchedConfig,
) -> bool {
    let Some(task) = job.task_mut(task_index) else {
        return false;
    };
    if task.status != TaskStatus::Running {
        return false;
    }
    match task.lease.as_mut() {
        Some(lease) if lease.epoch == epoch && lease.expires_at >= now => {
            lease.worker_id = worker_id_old_or_new.to_string();
            lease.expires_at = now.saturating_add(cfg.lease_ms);
            true
        }
        _ => false,
    }
}

/// Gives every live lease at least `lease_ms` from `now`, without shortening any: the coordinator
/// calls it once after a restart, before [`expire_leases`], so that workers have time to
/// re-register and [`adopt`] their tasks however long the coordinator was down.
pub fn extend_leases(jobs: &mut [Job], now: u64, cfg: &SchedConfig) {
    let until = now.saturating_add(cfg.lease_ms);
    for job in jobs.iter_mut().filter(|job| !job.is_terminal()) {
        for lease in job.tasks.iter_mut().filter_map(|t| t.lease.as_mut()) {
            lease.expires_at = lease.expires_at.max(until);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::StagePlanEntry;

    fn plan(stages: usize) -> StagePlan {
        StagePlan {
            num_layers: 8,
            head_layers: 0,
            stages: (0..stages)
                .map(|index| StagePlanEntry {
                    index,
                    name: format!("lw-block-{index}"),
                    kind: StageKind::LwBlock { block: index },
                })
                .collect(),
        }
    }

    fn job_on(id: &str, seq: u64, stages: usize, backend: &str, devices: u32) -> Job {
        Job::new(
            id.into(),
            seq,
            format!("job {id}"),
            "lw".into(),
            "version: 1".into(),
            backend.into(),
            devices,
            50,
            plan_tasks(&plan(stages), None),
            7,
        )
    }

    fn segprop_plan() -> StagePlan {
        let entry = |index: usize, name: &str, kind| StagePlanEntry {
            index,
            name: name.into(),
            kind,
        };
        StagePlan {
            num_layers: 6,
            head_layers: 2,
            stages: vec![
                entry(0, "stage1", StageKind::Stage1 { base_depth: 2 }),
                entry(1, "segment-2-3", StageKind::Segment { start: 2, end: 3 }),
                entry(2, "segment-3-4", StageKind::Segment { start: 3, end: 4 }),
            ],
        }
    }

    fn names_and_after(tasks: &[PlannedTask]) -> Vec<(String, Vec<u32>)> {
        tasks
            .iter()
            .map(|t| (t.kind.name().to_string(), t.after.clone()))
            .collect()
    }

    #[test]
    fn segprop_plans_snapshot_shards_before_each_segment() {
        let fanout = SnapshotFanout {
            shards: 2,
            overlap: false,
        };
        let tasks = plan_tasks(&segprop_plan(), Some(fanout));
        let s = |n: &str, after: &[u32]| (n.to_string(), after.to_vec());
        assert_eq!(
            names_and_after(&tasks),
            [
                s("stage1", &[]),
                s("snapshots-2-1of2", &[0]),
                s("snapshots-2-2of2", &[0]),
                s("segment-2-3", &[0, 1, 2]),
                // S[3] = F_2(S[2]): after the segment that committed block 2 and all of S[2].
                s("snapshots-3-1of2", &[3, 1, 2]),
                s("snapshots-3-2of2", &[3, 1, 2]),
                s("segment-3-4", &[3, 4, 5]),
                s("export", &[0, 1, 2, 3, 4, 5, 6]),
            ]
        );
        assert!(matches!(
            tasks[1].kind,
            TaskKind::AdvanceSnapshots {
                stage_index: 0,
                from: 0,
                to: 2,
                shard: 0,
                shards: 2,
                ..
            }
        ));
        assert!(matches!(
            tasks[5].kind,
            TaskKind::AdvanceSnapshots {
                stage_index: 1,
                from: 2,
                to: 3,
                shard: 1,
                shards: 2,
                ..
            }
        ));
        // Overlap: a segment waits for the first shard of its input only.
        let overlap = plan_tasks(
            &segprop_plan(),
            Some(SnapshotFanout {
                shards: 2,
                overlap: true,
            }),
        );
        assert_eq!(overlap[3].after, [0, 1]);
        assert_eq!(overlap[6].after, [3, 4]);
        // One shard keeps the old names; no SnapCheck is a plain chain.
        let single = plan_tasks(
            &segprop_plan(),
            Some(SnapshotFanout {
                shards: 1,
                overlap: false,
            }),
        );
        assert_eq!(single[1].kind.name(), "snapshots-2");
        assert_eq!(
            names_and_after(&plan_tasks(&segprop_plan(), None)),
            [
                s("stage1", &[]),
                s("segment-2-3", &[0]),
                s("segment-3-4", &[1]),
                s("export", &[0, 1, 2]),
            ]
        );
    }

    #[test]
    fn snapshot_shards_run_side_by_side_and_release_the_segment() {
        let fanout = SnapshotFanout {
            shards: 2,
            overlap: false,
        };
        let mut job = Job::new(
            "j".into(),
            1,
            "j".into(),
            "segprop".into(),
            "version: 1".into(),
            "cpu".into(),
            1,
            50,
            plan_tasks(&segprop_plan(), Some(fanout)),
            0,
        );
        succeed(&mut job, "w0", 1);
        assert_eq!(
            statuses(&job)[..4],
            [Succeeded, Ready, Ready, Waiting],
            "both shards are ready at once"
        );
        let workers = [worker("w0", "cpu", 1, 1), worker("w1", "cpu", 1, 1)];
        let (leased, _) = assign(std::slice::from_mut(&mut job), &workers, 2, &cfg());
        assert_eq!(leased.len(), 2, "one shard per worker");
        let done = |job: &mut Job, a: &Assignment| {
            complete(
                job,
                a.task_index,
                a.epoch,
                &a.worker_id,
                success(false),
                3,
                &cfg(),
            )
            .unwrap()
        };
        done(&mut job, &leased[0]);
        assert_eq!(
            job.tasks[3].status, Waiting,
            "the segment needs every shard"
        );
        done(&mut job, &leased[1]);
        assert_eq!(job.tasks[3].status, Ready);
    }

    /// A SnapCheck job (1 shard per depth) whose stage 1 is done and reported `depth` bytes
    /// per snapshot depth.
    fn budget_job(id: &str, seq: u64, depth: u64, budget: Option<u64>) -> Job {
        let fanout = SnapshotFanout {
            shards: 1,
            overlap: false,
        };
        let mut job = Job::new(
            id.into(),
            seq,
            id.into(),
            "segprop".into(),
            "version: 1".into(),
            "cpu".into(),
            1,
            50,
            plan_tasks(&segprop_plan(), Some(fanout)),
            0,
        );
        let cfg = SchedConfig {
            snapshot_budget_bytes: budget,
            ..cfg()
        };
        let (a, _) = assign(
            std::slice::from_mut(&mut job),
            &[worker("w0", "cpu", 1, 1)],
            1,
            &cfg,
        );
        let outcome = Outcome::Succeeded {
            outputs: vec![artifact("state")],
            metrics: None,
            result_json: format!("{{\"snapshot_depth_bytes\":{depth}}}"),
            early_exit: false,
        };
        complete(
            &mut job,
            a[0].task_index,
            a[0].epoch,
            "w0",
            outcome,
            1,
            &cfg,
        )
        .unwrap();
        job
    }

    #[test]
    fn snapshot_budget_holds_back_jobs_that_do_not_fit_and_fails_one_that_never_can() {
        let budget = Some(5_000);
        let cfg = SchedConfig {
            snapshot_budget_bytes: budget,
            ..cfg()
        };
        let workers = [worker("w1", "cpu", 1, 1), worker("w2", "cpu", 1, 1)];
        // a reserves 2 x 2000, b would need 2 x 2000 more: b waits.
        let mut jobs = vec![
            budget_job("a", 1, 2_000, budget),
            budget_job("b", 2, 2_000, budget),
        ];
        assert_eq!(jobs[0].snapshot_reservation(), 0, "not started yet");
        let (leased, _) = assign(&mut jobs, &workers, 2, &cfg);
        assert_eq!(leased.len(), 1, "{leased:?}");
        assert_eq!(leased[0].job_id, "a");
        assert_eq!(jobs[0].snapshot_reservation(), 4_000);
        assert_eq!(jobs[1].tasks[1].status, Ready, "b's shard is held back");
        // The measured depth replaces the estimate when larger.
        let outcome = Outcome::Succeeded {
            outputs: vec![Artifact {
                bytes: 2_400,
                ..artifact("depth")
            }],
            metrics: None,
            result_json: "{}".into(),
            early_exit: false,
        };
        complete(&mut jobs[0], 1, leased[0].epoch, "w1", outcome, 3, &cfg).unwrap();
        assert_eq!(jobs[0].snapshot_depth_bytes(), Some(2_400));
        assert_eq!(jobs[0].snapshot_reservation(), 4_800);
        // a ends: its reservation is released and b starts.
        cancel(&mut jobs[0], 4);
        assert_eq!(jobs[0].snapshot_reservation(), 0);
        let (leased, _) = assign(&mut jobs, &workers, 5, &cfg);
        assert_eq!(
            leased.iter().map(|a| a.job_id.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        // Without a budget nothing is held back.
        let mut free = vec![
            budget_job("c", 1, 2_000, None),
            budget_job("d", 2, 2_000, None),
        ];
        let (leased, _) = assign(&mut free, &workers, 2, &SchedConfig::default());
        assert_eq!(leased.len(), 2);

        // A job whose two depths exceed the whole budget fails with both numbers.
        let mut big = vec![budget_job("e", 1, 3_000, budget)];
        let (leased, transitions) = assign(&mut big, &workers, 2, &cfg);
        assert!(leased.is_empty());
        assert_eq!(big[0].status, JobStatus::Failed);
        let error = big[0].error.clone().unwrap();
        assert!(
            error.contains("6000 bytes") && error.contains("5000 bytes"),
            "{error}"
        );
        assert!(
            transitions
                .iter()
                .any(|t| matches!(t, Transition::JobFinished { .. }))
        );
    }

    #[test]
    fn snapshot_gc_keeps_at_most_two_depths_and_collects_all() {
        let plan = StagePlan {
            num_layers: 8,
            head_layers: 2,
            stages: (0..4)
                .map(|i| StagePlanEntry {
                    index: i,
                    name: format!("s{i}"),
                    kind: if i == 0 {
                        StageKind::Stage1 { base_depth: 2 }
                    } else {
                        StageKind::Segment {
                            start: i + 1,
                            end: i + 2,
                        }
                    },
                })
                .collect(),
        };
        for overlap in [false, true] {
            let fanout = SnapshotFanout { shards: 3, overlap };
            let mut job = Job::new(
                "j".into(),
                1,
                "j".into(),
                "segprop".into(),
                "version: 1".into(),
                "cpu".into(),
                1,
                50,
                plan_tasks(&plan, Some(fanout)),
                0,
            );
            let workers: Vec<WorkerView> = (0..3)
                .map(|i| worker(&format!("w{i}"), "cpu", 1, 1))
                .collect();
            let mut max_live = 0;
            let mut now = 1;
            while !job.is_terminal() {
                let (leased, _) = assign(std::slice::from_mut(&mut job), &workers, now, &cfg());
                assert!(!leased.is_empty(), "stuck: {job:?}");
                // Finish one task at a time, the oldest lease first.
                let a = &leased[0];
                complete(
                    &mut job,
                    a.task_index,
                    a.epoch,
                    &a.worker_id,
                    success(false),
                    now,
                    &cfg(),
                )
                .unwrap();
                for other in &leased[1..] {
                    // Give the other leases back (they are re-assigned next round).
                    job.tasks[other.task_index as usize].status = Ready;
                    job.tasks[other.task_index as usize].lease = None;
                }
                let gc = job.snapshot_gc();
                max_live = max_live.max(gc.live.len());
                assert!(gc.live.len() <= 2, "live depths {:?} in {job:?}", gc.live);
                job.snapshots_collected.extend(gc.dead);
                now += 1;
            }
            assert_eq!(max_live, 2, "overlap {overlap}");
            assert_eq!(job.snapshot_gc(), SnapshotDepths::default());
            job.snapshots_collected.sort();
            assert_eq!(job.snapshots_collected, [2, 3, 4], "overlap {overlap}");
        }
    }

    #[test]
    fn legacy_chains_get_their_after_lists() {
        let mut job = job("j", 1, 3);
        for t in &mut job.tasks {
            t.after.clear();
        }
        job.upgrade_legacy_chain();
        let after: Vec<Vec<u32>> = job.tasks.iter().map(|t| t.after.clone()).collect();
        assert_eq!(after, [vec![], vec![0], vec![1], vec![2]]);
    }

    fn job(id: &str, seq: u64, stages: usize) -> Job {
        job_on(id, seq, stages, "cpu", 1)
    }

    fn worker(id: &str, backend: &str, devices: u32, free_slots: u32) -> WorkerView {
        WorkerView {
            id: id.into(),
            backend: backend.into(),
            devices,
            free_slots,
        }
    }

    fn cfg() -> SchedConfig {
        SchedConfig::default()
    }

    /// Leases the job's ready task to `worker_id` (a one-slot cpu worker) at `now`.
    fn lease_to(job: &mut Job, worker_id: &str, now: u64) -> Assignment {
        let (mut assignments, _) = assign(
            std::slice::from_mut(job),
            &[worker(worker_id, "cpu", 1, 1)],
            now,
            &cfg(),
        );
        assert_eq!(assignments.len(), 1, "nothing to lease in {job:?}");
        assignments.remove(0)
    }

    fn artifact(uri: &str) -> Artifact {
        Artifact {
            uri: uri.into(),
            checksum: format!("sha256:{uri}"),
            bytes: 10,
        }
    }

    fn success(early_exit: bool) -> Outcome {
        Outcome::Succeeded {
            outputs: vec![artifact("out")],
            metrics: Some(artifact("metrics")),
            result_json: "{\"loss\":1.5}".into(),
            early_exit,
        }
    }

    fn failure(reason: &str, retryable: bool) -> Outcome {
        Outcome::Failed {
            reason: reason.into(),
            retryable,
        }
    }

    fn statuses(job: &Job) -> Vec<TaskStatus> {
        job.tasks.iter().map(|t| t.status).collect()
    }

    /// Runs the job's task `index` (leased to `w`) to success at `now`.
    fn succeed(job: &mut Job, w: &str, now: u64) -> Vec<Transition> {
        let a = lease_to(job, w, now);
        complete(job, a.task_index, a.epoch, w, success(false), now, &cfg()).unwrap()
    }

    use TaskStatus::{Cancelled, Failed, Ready, Running, Skipped, Succeeded, Waiting};

    #[test]
    fn config_defaults() {
        assert_eq!(
            SchedConfig::default(),
            SchedConfig {
                lease_ms: 10_000,
                max_attempts: 3,
                backoff_base_ms: 1_000,
                backoff_max_ms: 30_000,
                snapshot_budget_bytes: None,
            }
        );
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let cfg = cfg();
        let table = [
            (0, 0),
            (1, 1_000),
            (2, 2_000),
            (3, 4_000),
            (4, 8_000),
            (5, 16_000),
            (6, 30_000),
            (7, 30_000),
            (64, 30_000),
            (65, 30_000),
            (u32::MAX, 30_000),
        ];
        for (failures, want) in table {
            assert_eq!(cfg.backoff(failures), want, "failures = {failures}");
        }
        let huge = SchedConfig {
            backoff_base_ms: u64::MAX / 2,
            backoff_max_ms: u64::MAX,
            ..cfg
        };
        assert_eq!(huge.backoff(3), u64::MAX);
    }

    #[test]
    fn new_job_chains_stages_then_export() {
        let job = job("j", 4, 3);
        assert_eq!(job.status, JobStatus::Pending);
        assert_eq!(job.created_at, 7);
        assert_eq!(job.finished_at, None);
        let names: Vec<_> = job.tasks.iter().map(|t| t.kind.name()).collect();
        assert_eq!(names, ["lw-block-0", "lw-block-1", "lw-block-2", "export"]);
        assert_eq!(statuses(&job), [Ready, Waiting, Waiting, Waiting]);
        assert_eq!(
            job.tasks[1].kind,
            TaskKind::TrainStage {
                stage_index: 1,
                name: "lw-block-1".into()
            }
        );
        for (i, task) in job.tasks.iter().enumerate() {
            assert_eq!(task.index as usize, i);
            assert_eq!((task.attempts, task.failures, task.epoch), (0, 0, 0));
            assert_eq!(task.lease, None);
        }
        assert_eq!(job.running_leases().count(), 0);

        let empty = job_on("e", 0, 0, "cpu", 1);
        assert_eq!(statuses(&empty), [Ready]);
        assert_eq!(empty.tasks[0].kind, TaskKind::Export);
    }

    #[test]
    fn status_terminality() {
        let table = [
            (Waiting, false),
            (Ready, false),
            (Running, false),
            (Succeeded, true),
            (Failed, true),
            (Cancelled, true),
            (Skipped, true),
        ];
        for (status, terminal) in table {
            assert_eq!(status.is_terminal(), terminal, "{status:?}");
        }
        let table = [
            (JobStatus::Pending, false),
            (JobStatus::Running, false),
            (JobStatus::Succeeded, true),
            (JobStatus::Failed, true),
            (JobStatus::Cancelled, true),
        ];
        for (status, terminal) in table {
            assert_eq!(status.is_terminal(), terminal, "{status:?}");
        }
    }

    #[test]
    fn assign_leases_the_ready_task() {
        let mut jobs = vec![job("j", 0, 2)];
        let (assignments, transitions) =
            assign(&mut jobs, &[worker("w1", "cpu", 1, 1)], 100, &cfg());
        assert_eq!(
            assignments,
            [Assignment {
                job_id: "j".into(),
                task_index: 0,
                epoch: 1,
                worker_id: "w1".into()
            }]
        );
        assert_eq!(
            transitions,
            [Transition::TaskLeased {
                job_id: "j".into(),
                task_index: 0,
                epoch: 1,
                worker_id: "w1".into()
            }]
        );
        let job = &jobs[0];
        assert_eq!(job.status, JobStatus::Running);
        assert_eq!(statuses(job), [Running, Waiting, Waiting]);
        let task = &job.tasks[0];
        assert_eq!((task.attempts, task.epoch), (1, 1));
        let lease = Lease {
            worker_id: "w1".into(),
            epoch: 1,
            expires_at: 10_100,
        };
        assert_eq!(task.lease.as_ref(), Some(&lease));
        assert_eq!(job.running_leases().collect::<Vec<_>>(), [(0, &lease)]);

        // A running task is not assigned again.
        let (assignments, _) = assign(&mut jobs, &[worker("w2", "cpu", 1, 1)], 200, &cfg());
        assert!(assignments.is_empty());
    }

    #[test]
    fn assign_is_fifo_by_seq() {
        let mut jobs = vec![job("late", 2, 1), job("early", 1, 1)];
        let (assignments, _) = assign(&mut jobs, &[worker("w", "cpu", 1, 1)], 0, &cfg());
        assert_eq!(assignments.len(), 1);
        assert_eq!(assignments[0].job_id, "early");
        assert_eq!(jobs[0].status, JobStatus::Pending);
        assert_eq!(jobs[1].status, JobStatus::Running);

        let mut jobs = vec![job("c", 30, 1), job("a", 10, 1), job("b", 20, 1)];
        let (assignments, _) = assign(&mut jobs, &[worker("w", "cpu", 1, 5)], 0, &cfg());
        let order: Vec<_> = assignments.iter().map(|a| a.job_id.as_str()).collect();
        assert_eq!(order, ["a", "b", "c"]);
    }

    #[test]
    fn assign_matches_backend_and_devices() {
        // (job backend, devices_per_gang, worker backend, worker devices, assigned)
        let table = [
            ("cpu", 1, "cpu", 1, true),
            ("cpu", 1, "cuda", 8, false),
            ("cuda", 1, "cpu", 8, false),
            ("cuda", 2, "cuda", 1, false),
            ("cuda", 2, "cuda", 2, true),
            ("cuda", 2, "cuda", 4, true),
        ];
        for (backend, gang, w_backend, w_devices, assigned) in table {
            let mut jobs = vec![job_on("j", 0, 1, backend, gang)];
            let workers = [worker("w", w_backend, w_devices, 1)];
            let (assignments, _) = assign(&mut jobs, &workers, 0, &cfg());
            assert_eq!(
                !assignments.is_empty(),
                assigned,
                "job {backend}x{gang} on worker {w_backend}x{w_devices}"
            );
        }

        // A later job that fits takes the slot an earlier one cannot use.
        let mut jobs = vec![job_on("gpu", 0, 1, "cuda", 1), job("cpu", 1, 1)];
        let (assignments, _) = assign(&mut jobs, &[worker("w", "cpu", 1, 1)], 0, &cfg());
        assert_eq!(assignments.len(), 1);
        assert_eq!(assignments[0].job_id, "cpu");
        assert_eq!(jobs[0].status, JobStatus::Pending);
    }

    #[test]
    fn assign_respects_free_slots() {
        let mut jobs = vec![job("a", 0, 1), job("b", 1, 1), job("c", 2, 1)];
        let workers = [worker("full", "cpu", 1, 0), worker("w", "cpu", 1, 2)];
        let (assignments, _) = assign(&mut jobs, &workers, 0, &cfg());
        let got: Vec<_> = assignments
            .iter()
            .map(|a| (a.job_id.as_str(), a.worker_id.as_str()))
            .collect();
        assert_eq!(got, [("a", "w"), ("b", "w")]);
        assert_eq!(jobs[2].tasks[0].status, Ready);

        // The worker with the most free slots goes first; ties go to the first listed.
        let mut jobs = vec![job("a", 0, 1), job("b", 1, 1), job("c", 2, 1)];
        let workers = [worker("one", "cpu", 1, 1), worker("two", "cpu", 1, 2)];
        let (assignments, _) = assign(&mut jobs, &workers, 0, &cfg());
        let got: Vec<_> = assignments.iter().map(|a| a.worker_id.as_str()).collect();
        assert_eq!(got, ["two", "one", "two"]);

        let mut jobs = vec![job("a", 0, 1)];
        let (assignments, _) = assign(&mut jobs, &[], 0, &cfg());
        assert!(assignments.is_empty());
        assert_eq!(jobs[0].status, JobStatus::Pending);
    }

    #[test]
    fn assign_skips_terminal_jobs_and_waits_for_backoff() {
        let mut cancelled = job("x", 0, 1);
        cancel(&mut cancelled, 1);
        let mut jobs = vec![cancelled.clone()];
        let (assignments, _) = assign(&mut jobs, &[worker("w", "cpu", 1, 1)], 5, &cfg());
        assert!(assignments.is_empty());
        assert_eq!(jobs[0], cancelled);

        let mut jobs = vec![job("j", 0, 1)];
        jobs[0].tasks[0].not_before = 500;
        let workers = [worker("w", "cpu", 1, 1)];
        assert!(assign(&mut jobs, &workers, 499, &cfg()).0.is_empty());
        assert_eq!(assign(&mut jobs, &workers, 500, &cfg()).0.len(), 1);
    }

    #[test]
    fn renew_extends_the_lease_and_keeps_the_newest_checkpoint() {
        let cfg = cfg();
        let mut job = job("j", 0, 1);
        let a = lease_to(&mut job, "w", 0);
        let ckpt = |step| Checkpoint {
            step,
            artifact: artifact(&format!("ckpt-{step}")),
        };
        renew(&mut job, 0, a.epoch, "w", None, 10_000, &cfg).unwrap();
        assert_eq!(job.tasks[0].lease.as_ref().unwrap().expires_at, 20_000);
        assert_eq!(job.tasks[0].checkpoint, None);
        // (reported step, stored step afterwards)
        for (step, stored) in [(100, 100), (50, 100), (100, 100), (200, 200)] {
            renew(&mut job, 0, a.epoch, "w", Some(ckpt(step)), 11_000, &cfg).unwrap();
            assert_eq!(job.tasks[0].checkpoint, Some(ckpt(stored)), "step {step}");
        }
        assert_eq!(job.tasks[0].status, Running);
        assert_eq!(job.tasks[0].lease.as_ref().unwrap().expires_at, 21_000);
    }

    #[test]
    fn lease_is_valid_up_to_and_including_expires_at() {
        let mut job = job("j", 0, 1);
        let a = lease_to(&mut job, "w", 0);
        let mut jobs = vec![job];
        assert!(expire_leases(&mut jobs, 10_000, &cfg()).is_empty());
        renew(&mut jobs[0], 0, a.epoch, "w", None, 10_000, &cfg()).unwrap();
        assert_eq!(jobs[0].tasks[0].lease.as_ref().unwrap().expires_at, 20_000);
        assert_eq!(
            renew(&mut jobs[0], 0, a.epoch, "w", None, 20_001, &cfg()),
            Err(Reject::Expired)
        );
    }

    /// Every way a worker's message can be refused, each checked on `renew`, `complete` (both
    /// outcomes) and `adopt` (which must also leave the job alone).
    #[test]
    fn rejects_leave_the_job_unchanged() {
        struct Case {
            name: &'static str,
            job: Job,
            task: u32,
            epoch: u64,
            worker: &'static str,
            now: u64,
            want: Reject,
            adoptable: bool,
        }
        let leased = || {
            let mut j = job("j", 0, 2);
            lease_to(&mut j, "w1", 0);
            j
        };
        // w1's lease (epoch 1) expired; the retry went to `to` as epoch 2.
        let re_leased = |to: &str| {
            let mut jobs = vec![leased()];
            expire_leases(&mut jobs, 10_001, &cfg());
            lease_to(&mut jobs[0], to, 20_000);
            jobs.remove(0)
        };
        let first_done = || {
            let mut j = job("j", 0, 2);
            succeed(&mut j, "w1", 0);
            j
        };
        let cancelled = || {
            let mut j = leased();
            cancel(&mut j, 5);
            j
        };
        let failed = || {
            let mut j = leased();
            complete(&mut j, 0, 1, "w1", failure("oom", false), 5, &cfg()).unwrap();
            j
        };
        let cases = [
            Case {
                name: "unknown task",
                job: leased(),
                task: 9,
                epoch: 1,
                worker: "w1",
                now: 1,
                want: Reject::UnknownTask,
                adoptable: false,
            },
            Case {
                name: "waiting task",
                job: leased(),
                task: 1,
                epoch: 0,
                worker: "w1",
                now: 1,
                want: Reject::NotRunning,
                adoptable: false,
            },
            Case {
                name: "ready task never leased",
                job: job("j", 0, 2),
                task: 0,
                epoch: 0,
                worker: "w1",
                now: 1,
                want: Reject::NotRunning,
                adoptable: false,
            },
            Case {
                name: "ready again after expiry",
                job: {
                    let mut jobs = vec![leased()];
                    expire_leases(&mut jobs, 10_001, &cfg());
                    jobs.remove(0)
                },
                task: 0,
                epoch: 1,
                worker: "w1",
                now: 10_002,
                want: Reject::NotRunning,
                adoptable: false,
            },
            Case {
                name: "report on a succeeded task",
                job: first_done(),
                task: 0,
                epoch: 1,
                worker: "w1",
                now: 1,
                want: Reject::NotRunning,
                adoptable: false,
            },
            Case {
                name: "report on a cancelled job",
                job: cancelled(),
                task: 0,
                epoch: 1,
                worker: "w1",
                now: 6,
                want: Reject::NotRunning,
                adoptable: false,
            },
            Case {
                name: "report on a failed task",
                job: failed(),
                task: 0,
                epoch: 1,
                worker: "w1",
                now: 6,
                want: Reject::NotRunning,
                adoptable: false,
            },
            Case {
                name: "wrong worker",
                job: leased(),
                task: 0,
                epoch: 1,
                worker: "w2",
                now: 1,
                want: Reject::WrongWorker {
                    holder: "w1".into(),
                },
                // adopt goes by the epoch alone
                adoptable: true,
            },
            Case {
                name: "stale epoch after a re-lease to another worker",
                job: re_leased("w2"),
                task: 0,
                epoch: 1,
                worker: "w1",
                now: 20_001,
                want: Reject::StaleEpoch { current: 2, got: 1 },
                adoptable: false,
            },
            Case {
                name: "stale epoch after a re-lease to the same worker",
                job: re_leased("w1"),
                task: 0,
                epoch: 1,
                worker: "w1",
                now: 20_001,
                want: Reject::StaleEpoch { current: 2, got: 1 },
                adoptable: false,
            },
            Case {
                name: "epoch from the future",
                job: leased(),
                task: 0,
                epoch: 7,
                worker: "w1",
                now: 1,
                want: Reject::StaleEpoch { current: 1, got: 7 },
                adoptable: false,
            },
            Case {
                name: "expired but not yet reaped",
                job: leased(),
                task: 0,
                epoch: 1,
                worker: "w1",
                now: 10_001,
                want: Reject::Expired,
                adoptable: false,
            },
        ];
        let cfg = cfg();
        for case in cases {
            let name = case.name;
            let ckpt = Checkpoint {
                step: 1,
                artifact: artifact("c"),
            };
            let mut job = case.job.clone();
            let got = renew(
                &mut job,
                case.task,
                case.epoch,
                case.worker,
                Some(ckpt),
                case.now,
                &cfg,
            );
            assert_eq!(got, Err(case.want.clone()), "renew: {name}");
            assert_eq!(job, case.job, "renew changed the job: {name}");
            for outcome in [success(false), success(true), failure("x", true)] {
                let got = complete(
                    &mut job,
                    case.task,
                    case.epoch,
                    case.worker,
                    outcome,
                    case.now,
                    &cfg,
                );
                assert_eq!(got, Err(case.want.clone()), "complete: {name}");
                assert_eq!(job, case.job, "complete changed the job: {name}");
            }
            let adopted = adopt(&mut job, case.task, case.epoch, case.worker, case.now, &cfg);
            assert_eq!(adopted, case.adoptable, "adopt: {name}");
            if !adopted {
                assert_eq!(job, case.job, "a refused adopt changed the job: {name}");
            }
        }
    }

    #[test]
    fn reject_messages() {
        let table = [
            (Reject::UnknownTask, "the job has no such task"),
            (
                Reject::NotRunning,
                "the task is not running (it holds no lease)",
            ),
            (
                Reject::WrongWorker {
                    holder: "w-7".into(),
                },
                "the task's lease is held by worker w-7",
            ),
            (
                Reject::StaleEpoch { current: 4, got: 3 },
                "lease epoch 3 is superseded by epoch 4",
            ),
            (
                Reject::StaleEpoch { current: 4, got: 9 },
                "lease epoch 9 was never issued (the current epoch is 4)",
            ),
            (Reject::Expired, "the lease has expired"),
        ];
        for (reject, message) in table {
            assert_eq!(reject.to_string(), message);
            let err: Box<dyn std::error::Error> = Box::new(reject);
            assert_eq!(err.to_string(), message);
        }
    }

    #[test]
    fn success_readies_the_next_task_and_export_finishes_the_job() {
        let cfg = cfg();
        let mut job = job("j", 0, 2);
        let a = lease_to(&mut job, "w", 100);
        let t = complete(&mut job, 0, a.epoch, "w", success(false), 200, &cfg).unwrap();
        assert_eq!(
            t,
            [Transition::TaskSucceeded {
                job_id: "j".into(),
                task_index: 0
            }]
        );
        assert_eq!(statuses(&job), [Succeeded, Ready, Waiting]);
        let task = &job.tasks[0];
        assert_eq!(task.commits, 1);
        assert_eq!(task.lease, None);
        assert_eq!(task.outputs, [artifact("out")]);
        assert_eq!(task.metrics, Some(artifact("metrics")));
        assert_eq!(task.result_json.as_deref(), Some("{\"loss\":1.5}"));
        assert_eq!(job.status, JobStatus::Running);

        succeed(&mut job, "w", 300);
        assert_eq!(statuses(&job), [Succeeded, Succeeded, Ready]);
        let t = succeed(&mut job, "w", 400);
        assert_eq!(
            t,
            [
                Transition::TaskSucceeded {
                    job_id: "j".into(),
                    task_index: 2
                },
                Transition::JobFinished {
                    job_id: "j".into(),
                    status: JobStatus::Succeeded
                }
            ]
        );
        assert_eq!(job.status, JobStatus::Succeeded);
        assert_eq!(job.finished_at, Some(400));
        assert!(job.tasks.iter().all(|t| t.commits == 1));
        assert_eq!(job.error, None);
    }

    #[test]
    fn a_second_success_is_rejected_and_commits_once() {
        let cfg = cfg();
        let mut job = job("j", 0, 1);
        let a = lease_to(&mut job, "w", 0);
        complete(&mut job, 0, a.epoch, "w", success(false), 1, &cfg).unwrap();
        let before = job.clone();
        for outcome in [success(false), failure("late", true)] {
            let got = complete(&mut job, 0, a.epoch, "w", outcome, 2, &cfg);
            assert_eq!(got, Err(Reject::NotRunning));
        }
        assert_eq!(job, before);
        assert_eq!(job.tasks[0].commits, 1);
    }

    #[test]
    fn retryable_failure_backs_off_and_resumes_from_the_checkpoint() {
        let cfg = cfg();
        let mut jobs = vec![job("j", 0, 1)];
        let a = lease_to(&mut jobs[0], "w1", 0);
        let ckpt = Checkpoint {
            step: 40,
            artifact: artifact("ckpt-40"),
        };
        renew(&mut jobs[0], 0, a.epoch, "w1", Some(ckpt.clone()), 50, &cfg).unwrap();
        let t = complete(
            &mut jobs[0],
            0,
            a.epoch,
            "w1",
            failure("nan loss", true),
            100,
            &cfg,
        )
        .unwrap();
        assert_eq!(
            t,
            [Transition::TaskRetry {
                job_id: "j".into(),
                task_index: 0,
                failures: 1,
                not_before: 1_100,
                reason: "nan loss".into()
            }]
        );
        let task = &jobs[0].tasks[0];
        assert_eq!(task.status, Ready);
        assert_eq!(
            (task.attempts, task.failures, task.not_before),
            (1, 1, 1_100)
        );
        assert_eq!(task.error.as_deref(), Some("nan loss"));
        assert_eq!(task.lease, None);
        assert_eq!(task.checkpoint, Some(ckpt.clone()));
        assert_eq!(jobs[0].status, JobStatus::Running);

        let workers = [worker("w2", "cpu", 1, 1)];
        assert!(assign(&mut jobs, &workers, 1_099, &cfg).0.is_empty());
        let (assignments, _) = assign(&mut jobs, &workers, 1_100, &cfg);
        assert_eq!(assignments[0].epoch, 2);
        let task = &jobs[0].tasks[0];
        assert_eq!((task.attempts, task.failures, task.epoch), (2, 1, 2));
        assert_eq!(task.checkpoint, Some(ckpt));
        complete(&mut jobs[0], 0, 2, "w2", success(false), 1_200, &cfg).unwrap();
        assert_eq!(jobs[0].tasks[0].error, None);
        assert_eq!(statuses(&jobs[0]), [Succeeded, Ready]);
    }

    #[test]
    fn non_retryable_failure_fails_the_job() {
        let cfg = cfg();
        let mut job = job("j", 0, 3);
        succeed(&mut job, "w", 0);
        let a = lease_to(&mut job, "w", 10);
        let t = complete(
            &mut job,
            1,
            a.epoch,
            "w",
            failure("bad shape", false),
            20,
            &cfg,
        )
        .unwrap();
        assert_eq!(
            t,
            [
                Transition::TaskFailed {
                    job_id: "j".into(),
                    task_index: 1,
                    reason: "bad shape".into()
                },
                Transition::JobFinished {
                    job_id: "j".into(),
                    status: JobStatus::Failed
                }
            ]
        );
        assert_eq!(statuses(&job), [Succeeded, Failed, Cancelled, Cancelled]);
        assert_eq!(job.status, JobStatus::Failed);
        assert_eq!(
            job.error.as_deref(),
            Some("task lw-block-1 failed: bad shape")
        );
        assert_eq!(job.tasks[1].error.as_deref(), Some("bad shape"));
        assert_eq!(job.tasks[1].failures, 1);
        assert_eq!(job.finished_at, Some(20));
        assert_eq!(job.running_leases().count(), 0);
    }

    #[test]
    fn max_attempts_fails_the_task() {
        let cfg = cfg();
        let mut jobs = vec![job("j", 0, 1)];
        let mut now = 0;
        for attempt in 1..=3u32 {
            let (assignments, _) = assign(&mut jobs, &[worker("w", "cpu", 1, 1)], now, &cfg);
            let a = &assignments[0];
            assert_eq!(a.epoch, u64::from(attempt));
            let t = complete(
                &mut jobs[0],
                0,
                a.epoch,
                "w",
                failure("flaky", true),
                now,
                &cfg,
            )
            .unwrap();
            if attempt < 3 {
                assert!(
                    matches!(t[0], Transition::TaskRetry { failures, .. } if failures == attempt)
                );
                assert_eq!(jobs[0].tasks[0].not_before, now + cfg.backoff(attempt));
                now = jobs[0].tasks[0].not_before;
            } else {
                assert!(matches!(t[0], Transition::TaskFailed { .. }));
            }
        }
        let task = &jobs[0].tasks[0];
        assert_eq!((task.attempts, task.failures), (3, 3));
        assert_eq!(statuses(&jobs[0]), [Failed, Cancelled]);
        assert_eq!(jobs[0].status, JobStatus::Failed);
        assert_eq!(
            jobs[0].error.as_deref(),
            Some("task lw-block-0 failed: flaky")
        );
    }

    #[test]
    fn expired_leases_are_retried_then_fail_the_job() {
        let cfg = SchedConfig {
            max_attempts: 2,
            ..cfg()
        };
        let mut jobs = vec![job("a", 0, 1), job("b", 1, 1)];
        let workers = [worker("w1", "cpu", 1, 2)];
        assign(&mut jobs, &workers, 0, &cfg);
        // b's worker keeps heartbeating; a's does not.
        renew(&mut jobs[1], 0, 1, "w1", None, 9_000, &cfg).unwrap();
        let t = expire_leases(&mut jobs, 10_001, &cfg);
        let reason = "lease expired (worker w1 stopped heartbeating)".to_string();
        assert_eq!(
            t,
            [Transition::TaskRetry {
                job_id: "a".into(),
                task_index: 0,
                failures: 1,
                not_before: 11_001,
                reason: reason.clone()
            }]
        );
        assert_eq!(statuses(&jobs[0]), [Ready, Waiting]);
        assert_eq!(jobs[0].tasks[0].error.as_deref(), Some(reason.as_str()));
        assert_eq!(statuses(&jobs[1]), [Running, Waiting]);

        let (assignments, _) = assign(&mut jobs, &[worker("w2", "cpu", 1, 1)], 11_001, &cfg);
        assert_eq!(assignments[0].epoch, 2);
        renew(&mut jobs[1], 0, 1, "w1", None, 11_001, &cfg).unwrap();
        assert!(expire_leases(&mut jobs, 21_001, &cfg).is_empty());
        let t = expire_leases(&mut jobs, 21_002, &cfg);
        let reason = "lease expired (worker w2 stopped heartbeating)".to_string();
        assert_eq!(
            t,
            [
                Transition::TaskFailed {
                    job_id: "a".into(),
                    task_index: 0,
                    reason: reason.clone()
                },
                Transition::JobFinished {
                    job_id: "a".into(),
                    status: JobStatus::Failed
                },
                Transition::TaskRetry {
                    job_id: "b".into(),
                    task_index: 0,
                    failures: 1,
                    not_before: 22_002,
                    reason: "lease expired (worker w1 stopped heartbeating)".into()
                },
            ]
        );
        assert_eq!(statuses(&jobs[0]), [Failed, Cancelled]);
        assert_eq!(
            jobs[0].error,
            Some(format!("task lw-block-0 failed: {reason}"))
        );
        assert_eq!(jobs[0].finished_at, Some(21_002));
        // Terminal jobs are left alone.
        let before = jobs[0].clone();
        expire_leases(&mut jobs, 100_000, &cfg);
        assert_eq!(jobs[0], before);
    }

    #[test]
    fn early_exit_skips_the_remaining_stages() {
        let cfg = cfg();
        let mut job = job("j", 0, 4);
        succeed(&mut job, "w", 0);
        let a = lease_to(&mut job, "w", 10);
        let t = complete(&mut job, 1, a.epoch, "w", success(true), 20, &cfg).unwrap();
        assert_eq!(
            t,
            [
                Transition::TaskSucceeded {
                    job_id: "j".into(),
                    task_index: 1
                },
                Transition::TaskSkipped {
                    job_id: "j".into(),
                    task_index: 2
                },
                Transition::TaskSkipped {
                    job_id: "j".into(),
                    task_index: 3
                },
            ]
        );
        assert_eq!(
            statuses(&job),
            [Succeeded, Succeeded, Skipped, Skipped, Ready]
        );
        let a = lease_to(&mut job, "w", 30);
        assert_eq!(a.task_index, 4);
        complete(&mut job, 4, a.epoch, "w", success(true), 40, &cfg).unwrap();
        assert_eq!(job.status, JobStatus::Succeeded);
        assert_eq!(job.tasks[2].commits, 0);

        // Early exit from the last stage skips nothing.
        let mut job = self::job("k", 0, 1);
        let a = lease_to(&mut job, "w", 0);
        let t = complete(&mut job, 0, a.epoch, "w", success(true), 1, &cfg).unwrap();
        assert_eq!(t.len(), 1);
        assert_eq!(statuses(&job), [Succeeded, Ready]);
    }

    #[test]
    fn cancel_revokes_leases_and_is_idempotent() {
        let mut job = job("j", 0, 2);
        succeed(&mut job, "w", 0);
        let a = lease_to(&mut job, "w", 10);
        let revoked = cancel(&mut job, 50);
        assert_eq!(
            revoked,
            [(
                1,
                Lease {
                    worker_id: "w".into(),
                    epoch: a.epoch,
                    expires_at: 10_010
                }
            )]
        );
        assert_eq!(statuses(&job), [Succeeded, Cancelled, Cancelled]);
        assert_eq!(job.status, JobStatus::Cancelled);
        assert_eq!(job.finished_at, Some(50));
        assert_eq!(job.running_leases().count(), 0);
        let before = job.clone();
        assert!(cancel(&mut job, 60).is_empty());
        assert_eq!(job, before);

        // A pending job has nothing to revoke.
        let mut pending = self::job("p", 0, 1);
        assert!(cancel(&mut pending, 5).is_empty());
        assert_eq!(statuses(&pending), [Cancelled, Cancelled]);
        assert_eq!(pending.status, JobStatus::Cancelled);

        // Finished jobs stay as they were.
        let mut done = self::job("d", 0, 0);
        succeed(&mut done, "w", 0);
        let before = done.clone();
        assert!(cancel(&mut done, 5).is_empty());
        assert_eq!(done, before);
    }

    #[test]
    fn adopt_rebinds_a_current_lease_to_the_new_worker_id() {
        let cfg = cfg();
        let mut job = job("j", 0, 1);
        let a = lease_to(&mut job, "old", 0);
        // The coordinator restarts: it reloads the job and the worker comes back as "new".
        let json = serde_json::to_string(&job).unwrap();
        let mut job: Job = serde_json::from_str(&json).unwrap();
        assert!(adopt(&mut job, 0, a.epoch, "new", 4_000, &cfg));
        let lease = job.tasks[0].lease.clone().unwrap();
        assert_eq!(lease.worker_id, "new");
        assert_eq!(lease.epoch, a.epoch);
        assert_eq!(lease.expires_at, 14_000);
        assert_eq!(
            renew(&mut job, 0, a.epoch, "old", None, 4_001, &cfg),
            Err(Reject::WrongWorker {
                holder: "new".into()
            })
        );
        renew(&mut job, 0, a.epoch, "new", None, 4_001, &cfg).unwrap();
        // Adopting again under the same id is harmless.
        assert!(adopt(&mut job, 0, a.epoch, "new", 5_000, &cfg));
        complete(&mut job, 0, a.epoch, "new", success(false), 5_001, &cfg).unwrap();
        assert_eq!(job.tasks[0].commits, 1);

        // (epoch, now, adoptable)
        for (epoch, now, adoptable) in [
            (1, 10_000, true),
            (1, 10_001, false),
            (0, 1, false),
            (2, 1, false),
        ] {
            let mut job = self::job("k", 0, 1);
            lease_to(&mut job, "old", 0);
            let before = job.clone();
            assert_eq!(
                adopt(&mut job, 0, epoch, "new", now, &cfg),
                adoptable,
                "{epoch} at {now}"
            );
            if !adoptable {
                assert_eq!(job, before);
            }
        }
    }

    #[test]
    fn extend_leases_gives_workers_time_after_a_restart() {
        let cfg = cfg();
        let mut jobs = vec![job("a", 0, 1), job("b", 1, 1)];
        assign(&mut jobs, &[worker("w", "cpu", 1, 2)], 0, &cfg);
        jobs[1].tasks[0].lease.as_mut().unwrap().expires_at = 90_000;
        extend_leases(&mut jobs, 60_000, &cfg);
        assert_eq!(jobs[0].tasks[0].lease.as_ref().unwrap().expires_at, 70_000);
        assert_eq!(jobs[1].tasks[0].lease.as_ref().unwrap().expires_at, 90_000);
        assert!(expire_leases(&mut jobs, 70_000, &cfg).is_empty());
        assert!(adopt(&mut jobs[0], 0, 1, "w-new", 65_000, &cfg));
    }

    #[test]
    fn job_round_trips_through_json() {
        let cfg = cfg();
        let mut job = job("j", 3, 2);
        succeed(&mut job, "w", 0);
        let a = lease_to(&mut job, "w", 10);
        let ckpt = Checkpoint {
            step: 5,
            artifact: artifact("c"),
        };
        renew(&mut job, 1, a.epoch, "w", Some(ckpt), 20, &cfg).unwrap();
        let json = serde_json::to_string_pretty(&job).unwrap();
        let back: Job = serde_json::from_str(&json).unwrap();
        assert_eq!(back, job);
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["status"], "running");
        assert_eq!(value["tasks"][0]["kind"]["kind"], "train_stage");
        assert_eq!(value["tasks"][2]["kind"]["kind"], "export");
        assert_eq!(value["tasks"][1]["status"], "running");

        for t in [
            Transition::JobFinished {
                job_id: "j".into(),
                status: JobStatus::Failed,
            },
            Transition::TaskSkipped {
                job_id: "j".into(),
                task_index: 2,
            },
        ] {
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(serde_json::from_str::<Transition>(&json).unwrap(), t);
        }
        for outcome in [success(true), failure("x", false)] {
            let json = serde_json::to_string(&outcome).unwrap();
            assert_eq!(serde_json::from_str::<Outcome>(&json).unwrap(), outcome);
        }
        let r = Reject::StaleEpoch { current: 2, got: 1 };
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<Reject>(&json).unwrap(), r);
    }

    /// Random operation sequences against the invariants of the state machines.
    mod props {
        use std::collections::BTreeMap;

        use proptest::prelude::*;
        use proptest::strategy::ValueTree;
        use proptest::test_runner::{Config, TestRunner};

        use super::*;

        const WORKERS: [&str; 4] = ["w0", "w1", "w2", "w3"];

        fn prop_cfg() -> SchedConfig {
            SchedConfig {
                lease_ms: 1_000,
                max_attempts: 3,
                backoff_base_ms: 100,
                backoff_max_ms: 400,
                snapshot_budget_bytes: None,
            }
        }

        #[derive(Debug, Clone)]
        enum Pick<T> {
            /// The natural choice: the job's active task, the lease's epoch or holder.
            Current,
            Other(T),
        }

        #[derive(Debug, Clone)]
        struct Target {
            job: usize,
            task: Pick<u32>,
            epoch: Pick<u64>,
            worker: Pick<usize>,
        }

        #[derive(Debug, Clone)]
        enum Op {
            Advance(u64),
            /// (worker name, cuda, devices, free slots)
            Assign(Vec<(usize, bool, u32, u32)>),
            Renew(Target, Option<u64>),
            Complete(Target, Outcome),
            Adopt(Target, usize),
            Expire,
            Cancel(usize),
        }

        /// (seq, stages, cuda, devices_per_gang) of each job; 4 stages is a SegProp DAG.
        type JobShape = (u64, usize, bool, u32);

        fn pick<T: std::fmt::Debug + Clone + 'static>(
            other: impl Strategy<Value = T> + 'static,
        ) -> impl Strategy<Value = Pick<T>> {
            prop_oneof![4 => Just(Pick::Current), 1 => other.prop_map(Pick::Other)]
        }

        fn target() -> impl Strategy<Value = Target> {
            (0..3usize, pick(0..5u32), pick(0..5u64), pick(0..4usize)).prop_map(
                |(job, task, epoch, worker)| Target {
                    job,
                    task,
                    epoch,
                    worker,
                },
            )
        }

        fn outcome() -> impl Strategy<Value = Outcome> {
            prop_oneof![
                3 => prop::bool::weighted(0.2).prop_map(success),
                1 => prop::bool::weighted(0.75).prop_map(|retryable| failure("boom", retryable)),
            ]
        }

        fn op() -> impl Strategy<Value = Op> {
            let worker = (0..4usize, prop::bool::weighted(0.3), 1..=2u32, 0..=2u32);
            prop_oneof![
                20 => (0..1_500u64).prop_map(Op::Advance),
                20 => prop::collection::vec(worker, 1..=3).prop_map(Op::Assign),
                24 => (target(), prop::option::of(0..100u64)).prop_map(|(t, c)| Op::Renew(t, c)),
                30 => (target(), outcome()).prop_map(|(t, o)| Op::Complete(t, o)),
                6 => (target(), 0..4usize).prop_map(|(t, w)| Op::Adopt(t, w)),
                12 => Just(Op::Expire),
                1 => (0..3usize).prop_map(Op::Cancel),
            ]
        }

        fn scenario() -> impl Strategy<Value = (Vec<JobShape>, Vec<Op>)> {
            let shape = (0..10u64, 1..=4usize, prop::bool::weighted(0.3), 1..=2u32);
            (
                prop::collection::vec(shape, 1..=3),
                prop::collection::vec(op(), 200),
            )
        }

        fn backend(cuda: bool) -> &'static str {
            if cuda { "cuda" } else { "cpu" }
        }

        /// What a run went through, to check that the generator reaches the interesting states.
        #[derive(Debug, Default)]
        struct Stats {
            assignments: usize,
            commits: usize,
            retries: usize,
            skips: usize,
            adopted: usize,
            finished: BTreeMap<String, usize>,
            rejects: BTreeMap<String, usize>,
        }

        fn reject_name(r: &Reject) -> String {
            format!("{r:?}")
                .split([' ', '{'])
                .next()
                .unwrap_or_default()
                .to_string()
        }

        fn check_job(job: &Job) {
            let active: Vec<usize> = (0..job.tasks.len())
                .filter(|&i| matches!(job.tasks[i].status, Ready | Running))
                .collect();
            let done = |i: &u32| matches!(job.tasks[*i as usize].status, Succeeded | Skipped);
            if job.is_terminal() {
                assert!(
                    active.is_empty(),
                    "terminal job with an active task: {job:?}"
                );
                assert!(job.finished_at.is_some());
                assert!(job.tasks.iter().all(|t| t.status.is_terminal()));
            } else {
                assert!(!active.is_empty(), "stuck job: {job:?}");
                assert_eq!(job.finished_at, None);
            }
            for t in &job.tasks {
                if matches!(t.status, Ready | Running | Succeeded) {
                    assert!(t.after.iter().all(done), "ran before its inputs: {job:?}");
                }
                if t.status == Waiting {
                    assert!(!t.after.iter().all(done), "waiting for nothing: {job:?}");
                }
            }
            let running = job.tasks.iter().filter(|t| t.status == Running).count();
            if running > 0 {
                assert_eq!(job.status, JobStatus::Running);
            }
            if job.status == JobStatus::Pending {
                assert!(job.tasks.iter().all(|t| t.epoch == 0));
            }
            for t in &job.tasks {
                assert_eq!(
                    t.lease.is_some(),
                    t.status == Running,
                    "lease iff running: {t:?}"
                );
                if let Some(lease) = &t.lease {
                    assert_eq!(lease.epoch, t.epoch);
                }
                assert!(t.commits <= 1, "committed twice: {t:?}");
                assert_eq!(t.commits == 1, t.status == Succeeded);
                assert!(u64::from(t.attempts) == t.epoch);
                assert!(t.failures <= t.attempts);
            }
            match job.status {
                JobStatus::Succeeded => {
                    assert!(
                        job.tasks
                            .iter()
                            .all(|t| matches!(t.status, Succeeded | Skipped))
                    );
                    assert_eq!(job.tasks.last().map(|t| t.status), Some(Succeeded));
                }
                JobStatus::Failed => {
                    assert_eq!(job.tasks.iter().filter(|t| t.status == Failed).count(), 1);
                    assert!(job.error.is_some());
                }
                _ => {}
            }
        }

        /// Checks what must hold between the jobs before and after any operation.
        fn check_step(before: &[Job], after: &[Job]) {
            for (b, a) in before.iter().zip(after) {
                if b.is_terminal() {
                    assert_eq!(a, b, "a terminal job changed");
                }
                for (tb, ta) in b.tasks.iter().zip(&a.tasks) {
                    if tb.status == Succeeded {
                        assert_eq!(ta, tb, "a succeeded task changed");
                    }
                    if tb.status.is_terminal() {
                        assert_eq!(ta.status, tb.status, "a terminal task changed status");
                    }
                    assert!(ta.epoch >= tb.epoch);
                    assert!(ta.failures >= tb.failures);
                    let step = |t: &Task| t.checkpoint.as_ref().map(|c| c.step);
                    assert!(step(ta) >= step(tb), "checkpoint went back");
                }
            }
        }

        fn resolve(job: &Job, t: &Target) -> (u32, u64, String) {
            let active = job
                .tasks
                .iter()
                .find(|t| matches!(t.status, Ready | Running))
                .unwrap_or(&job.tasks[0]);
            let task_index = match t.task {
                Pick::Current => active.index,
                Pick::Other(i) => i,
            };
            let task = job.tasks.get(task_index as usize);
            let epoch = match t.epoch {
                Pick::Current => task.map_or(0, |t| t.epoch),
                Pick::Other(e) => e,
            };
            let worker = match t.worker {
                Pick::Current => task
                    .and_then(|t| t.lease.as_ref())
                    .map_or_else(|| WORKERS[0].to_string(), |l| l.worker_id.clone()),
                Pick::Other(w) => WORKERS[w].to_string(),
            };
            (task_index, epoch, worker)
        }

        fn run(shapes: &[JobShape], ops: &[Op]) -> Stats {
            let cfg = prop_cfg();
            let mut stats = Stats::default();
            let mut jobs: Vec<Job> = shapes
                .iter()
                .enumerate()
                .map(|(i, &(seq, stages, cuda, gang))| {
                    let mut job = job_on(&format!("job{i}"), seq, stages, backend(cuda), gang);
                    if stages == 4 {
                        // SegProp with SnapCheck: shards side by side, with or without overlap.
                        let fanout = SnapshotFanout {
                            shards: 2,
                            overlap: seq % 2 == 1,
                        };
                        let tasks = plan_tasks(&segprop_plan(), Some(fanout));
                        job = Job::new(
                            job.id,
                            seq,
                            job.name,
                            "segprop".into(),
                            job.spec_yaml,
                            job.backend,
                            gang,
                            50,
                            tasks,
                            7,
                        );
                    }
                    job
                })
                .collect();
            // Highest epoch leased so far, per (job, task).
            let mut leased: BTreeMap<(usize, u32), u64> = BTreeMap::new();
            let mut now = 1_000u64;
            for j in &jobs {
                check_job(j);
            }
            for op in ops {
                let before = jobs.clone();
                match op {
                    Op::Advance(ms) => now += ms,
                    Op::Expire => {
                        for t in expire_leases(&mut jobs, now, &cfg) {
                            if matches!(t, Transition::TaskRetry { .. }) {
                                stats.retries += 1;
                            }
                        }
                    }
                    Op::Cancel(j) => {
                        let j = j % jobs.len();
                        let live: Vec<(u32, Lease)> = jobs[j]
                            .running_leases()
                            .map(|(i, l)| (i, l.clone()))
                            .collect();
                        let was_terminal = jobs[j].is_terminal();
                        let revoked = cancel(&mut jobs[j], now);
                        if was_terminal {
                            assert!(revoked.is_empty());
                        } else {
                            assert_eq!(revoked, live);
                            assert_eq!(jobs[j].status, JobStatus::Cancelled);
                        }
                    }
                    Op::Assign(spec) => {
                        let mut workers: Vec<WorkerView> = Vec::new();
                        for &(name, cuda, devices, slots) in spec {
                            if workers.iter().all(|w| w.id != WORKERS[name]) {
                                workers.push(worker(WORKERS[name], backend(cuda), devices, slots));
                            }
                        }
                        let (assignments, transitions) = assign(&mut jobs, &workers, now, &cfg);
                        assert_eq!(assignments.len(), transitions.len());
                        stats.assignments += assignments.len();
                        let mut used: BTreeMap<&str, u32> = BTreeMap::new();
                        let mut assigned_jobs = Vec::new();
                        for a in &assignments {
                            let j = jobs.iter().position(|j| j.id == a.job_id).unwrap();
                            assigned_jobs.push(j);
                            let w = workers.iter().find(|w| w.id == a.worker_id).unwrap();
                            let n = used.entry(w.id.as_str()).or_default();
                            *n += 1;
                            assert!(*n <= w.free_slots, "worker {} over its slots", w.id);
                            assert_eq!(w.backend, jobs[j].backend);
                            assert!(w.devices >= jobs[j].devices_per_gang);
                            let tb = &before[j].tasks[a.task_index as usize];
                            assert_eq!(tb.status, Ready);
                            assert!(tb.not_before <= now);
                            assert!(!before[j].is_terminal());
                            let last = leased.insert((j, a.task_index), a.epoch);
                            assert!(last.is_none_or(|e| e < a.epoch), "epoch did not increase");
                            let ta = &jobs[j].tasks[a.task_index as usize];
                            assert_eq!(
                                ta.lease.as_ref().map(|l| l.expires_at),
                                Some(now + cfg.lease_ms)
                            );
                        }
                        // Nothing that could run was left idle, and no later job took a worker
                        // an earlier one could use.
                        for (j, job) in jobs.iter().enumerate() {
                            let due = job
                                .tasks
                                .iter()
                                .any(|t| t.status == Ready && t.not_before <= now);
                            if job.is_terminal() || !due {
                                continue;
                            }
                            let fits = |w: &WorkerView| {
                                w.backend == job.backend && w.devices >= job.devices_per_gang
                            };
                            for w in workers.iter().filter(|w| fits(w)) {
                                let n = used.get(w.id.as_str()).copied().unwrap_or(0);
                                assert_eq!(n, w.free_slots, "{} left idle for {}", w.id, job.id);
                            }
                            for (a, &k) in assignments.iter().zip(&assigned_jobs) {
                                if jobs[k].seq > job.seq {
                                    let w = workers.iter().find(|w| w.id == a.worker_id).unwrap();
                                    assert!(
                                        !fits(w),
                                        "{} overtook {} (FIFO)",
                                        jobs[k].id,
                                        jobs[j].id
                                    );
                                }
                            }
                        }
                    }
                    Op::Renew(t, checkpoint) => {
                        let j = t.job % jobs.len();
                        let (task, epoch, w) = resolve(&jobs[j], t);
                        let checkpoint = checkpoint.map(|step| Checkpoint {
                            step,
                            artifact: artifact(&format!("ckpt-{step}")),
                        });
                        match renew(&mut jobs[j], task, epoch, &w, checkpoint, now, &cfg) {
                            Ok(()) => {
                                let lease = jobs[j].tasks[task as usize].lease.as_ref().unwrap();
                                assert_eq!(lease.expires_at, now + cfg.lease_ms);
                                assert_eq!(
                                    (lease.epoch, lease.worker_id.as_str()),
                                    (epoch, w.as_str())
                                );
                            }
                            Err(r) => {
                                assert_eq!(jobs[j], before[j], "rejected renew changed the job");
                                *stats.rejects.entry(reject_name(&r)).or_default() += 1;
                            }
                        }
                    }
                    Op::Complete(t, outcome) => {
                        let j = t.job % jobs.len();
                        let (task, epoch, w) = resolve(&jobs[j], t);
                        let early = matches!(
                            outcome,
                            Outcome::Succeeded {
                                early_exit: true,
                                ..
                            }
                        );
                        match complete(&mut jobs[j], task, epoch, &w, outcome.clone(), now, &cfg) {
                            Ok(transitions) => {
                                let ta = &jobs[j].tasks[task as usize];
                                assert_ne!(ta.status, Running);
                                for t in &transitions {
                                    match t {
                                        Transition::TaskSucceeded { .. } => stats.commits += 1,
                                        Transition::TaskRetry { .. } => stats.retries += 1,
                                        Transition::TaskSkipped { .. } => {
                                            assert!(early);
                                            stats.skips += 1;
                                        }
                                        _ => {}
                                    }
                                }
                            }
                            Err(r) => {
                                assert_eq!(jobs[j], before[j], "rejected complete changed the job");
                                *stats.rejects.entry(reject_name(&r)).or_default() += 1;
                            }
                        }
                    }
                    Op::Adopt(t, new_worker) => {
                        let j = t.job % jobs.len();
                        let (task, epoch, _) = resolve(&jobs[j], t);
                        if adopt(&mut jobs[j], task, epoch, WORKERS[*new_worker], now, &cfg) {
                            stats.adopted += 1;
                            let lease = jobs[j].tasks[task as usize].lease.as_ref().unwrap();
                            assert_eq!(lease.worker_id, WORKERS[*new_worker]);
                            assert_eq!(lease.epoch, epoch);
                        } else {
                            assert_eq!(jobs[j], before[j], "refused adopt changed the job");
                        }
                    }
                }
                for j in &jobs {
                    check_job(j);
                }
                check_step(&before, &jobs);
            }
            for j in &jobs {
                let back: Job = serde_json::from_str(&serde_json::to_string(j).unwrap()).unwrap();
                assert_eq!(&back, j);
                if j.is_terminal() {
                    *stats.finished.entry(format!("{:?}", j.status)).or_default() += 1;
                }
            }
            stats
        }

        proptest! {
            #![proptest_config(Config {
                cases: 256,
                failure_persistence: None,
                ..Config::default()
            })]

            #[test]
            fn random_operations_keep_the_invariants((shapes, ops) in scenario()) {
                run(&shapes, &ops);
            }
        }

        /// The generator must reach every outcome, or the property above proves little.
        #[test]
        fn random_operations_cover_every_path() {
            let mut runner = TestRunner::deterministic();
            let strategy = scenario();
            let mut total = Stats::default();
            for _ in 0..64 {
                let (shapes, ops) = strategy.new_tree(&mut runner).unwrap().current();
                let stats = run(&shapes, &ops);
                total.assignments += stats.assignments;
                total.commits += stats.commits;
                total.retries += stats.retries;
                total.skips += stats.skips;
                total.adopted += stats.adopted;
                for (k, v) in stats.finished {
                    *total.finished.entry(k).or_default() += v;
                }
                for (k, v) in stats.rejects {
                    *total.rejects.entry(k).or_default() += v;
                }
            }
            assert!(total.assignments > 0 && total.commits > 0, "{total:?}");
            assert!(
                total.retries > 0 && total.skips > 0 && total.adopted > 0,
                "{total:?}"
            );
            for status in ["Succeeded", "Failed", "Cancelled"] {
                assert!(
                    total.finished.contains_key(status),
                    "no job {status}: {total:?}"
                );
            }
            for reject in [
                "UnknownTask",
                "NotRunning",
                "WrongWorker",
                "StaleEpoch",
                "Expired",
            ] {
                assert!(total.rejects.contains_key(reject), "no {reject}: {total:?}");
            }
        }
    }
}
