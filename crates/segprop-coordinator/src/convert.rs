//! Wire conversions between the scheduler's types and `segprop.v1` messages (the only place
//! the coordinator touches prost types besides the service signatures). Inbound conversions
//! validate: a missing field is a [`CoordError::Field`] (INVALID_ARGUMENT).

use std::collections::HashMap;

use segprop_core::sched::{
    Artifact, Checkpoint, Job, JobStatus, Outcome, Task, TaskKind, TaskResult, TaskStatus,
};
use segprop_proto::v1 as pb;

use crate::config::CoordConfig;
use crate::error::CoordError;

pub fn job_state(status: JobStatus) -> pb::JobState {
    match status {
        JobStatus::Pending => pb::JobState::Pending,
        JobStatus::Running => pb::JobState::Running,
        JobStatus::Succeeded => pb::JobState::Succeeded,
        JobStatus::Failed => pb::JobState::Failed,
        JobStatus::Cancelled => pb::JobState::Cancelled,
    }
}

pub fn task_state(status: TaskStatus) -> pb::TaskState {
    match status {
        TaskStatus::Waiting => pb::TaskState::Waiting,
        TaskStatus::Ready => pb::TaskState::Ready,
        TaskStatus::Running => pb::TaskState::Running,
        TaskStatus::Succeeded => pb::TaskState::Succeeded,
        TaskStatus::Failed => pb::TaskState::Failed,
        TaskStatus::Cancelled => pb::TaskState::Cancelled,
        TaskStatus::Skipped => pb::TaskState::Skipped,
    }
}

pub fn job(
    job: &Job,
    progress: &HashMap<(String, u32), pb::Progress>,
    config: &CoordConfig,
) -> pb::Job {
    pb::Job {
        job_id: job.id.clone(),
        name: job.name.clone(),
        regime: job.regime.clone(),
        state: job_state(job.status) as i32,
        tasks: job
            .tasks
            .iter()
            .map(|t| pb::Task {
                index: t.index,
                kind: task_kind(&t.kind) as i32,
                name: t.kind.name().to_string(),
                state: task_state(t.status) as i32,
                attempts: t.attempts,
                epoch: t.epoch,
                worker_id: t
                    .lease
                    .as_ref()
                    .map(|l| l.worker_id.clone())
                    .unwrap_or_default(),
                progress: progress.get(&(job.id.clone(), t.index)).cloned(),
                error: t.error.clone().unwrap_or_default(),
                result_json: t.result_json.clone().unwrap_or_default(),
                result: t.result.as_ref().map(task_result_out),
                checkpoint_step: t.checkpoint.as_ref().map_or(0, |c| c.step),
            })
            .collect(),
        error: job.error.clone().unwrap_or_default(),
        run_dir: match &config.artifact_store {
            Some(store) => format!("{}/{}", store.url.trim_end_matches('/'), job_dir(&job.id)),
            None => config
                .artifact_root
                .join(job_dir(&job.id))
                .display()
                .to_string(),
        },
        created_unix_ms: job.created_at,
        finished_unix_ms: job.finished_at.unwrap_or(0),
        preflight: job.preflight.clone().unwrap_or_default(),
    }
}

pub fn task_kind(kind: &TaskKind) -> pb::TaskKind {
    match kind {
        TaskKind::TrainStage { .. } => pb::TaskKind::TrainStage,
        TaskKind::AdvanceSnapshots { .. } => pb::TaskKind::AdvanceSnapshots,
        TaskKind::Export => pb::TaskKind::Export,
    }
}

pub use segprop_store::layout::job_dir;

pub fn artifact_out(a: &Artifact) -> pb::ArtifactRef {
    pb::ArtifactRef {
        uri: a.uri.clone(),
        checksum: a.checksum.clone(),
        bytes: a.bytes,
    }
}

pub fn artifact_in(a: &pb::ArtifactRef) -> Artifact {
    Artifact {
        uri: a.uri.clone(),
        checksum: a.checksum.clone(),
        bytes: a.bytes,
    }
}

/// A task report's outcome.
pub fn outcome_in(
    outcome: Option<pb::report_task_request::Outcome>,
) -> Result<Outcome, CoordError> {
    let missing = |field: &'static str| CoordError::Field {
        field,
        message: "missing".into(),
    };
    match outcome.ok_or_else(|| missing("outcome"))? {
        pb::report_task_request::Outcome::Succeeded(s) => Ok(Outcome::Succeeded {
            outputs: s.artifacts.iter().map(artifact_in).collect(),
            metrics: s.metrics.as_ref().map(artifact_in),
            result: task_result_in(s.result.ok_or_else(|| missing("succeeded.result"))?),
            result_json: s.result_json,
            early_exit: s.early_exit,
        }),
        pb::report_task_request::Outcome::Failed(f) => Ok(Outcome::Failed {
            reason: f.reason,
            retryable: f.retryable,
        }),
    }
}

pub fn task_result_in(r: pb::TaskResult) -> TaskResult {
    TaskResult {
        steps: r.steps,
        eval_loss: r.eval_loss,
        snapshot_depth_bytes: r.snapshot_depth_bytes,
        snapshot_depth: r.snapshot_depth,
        snapshot_batches: r.snapshot_batches,
        final_eval_loss: r.final_eval_loss,
        final_num_layers: r.final_num_layers,
    }
}

pub fn task_result_out(r: &TaskResult) -> pb::TaskResult {
    pb::TaskResult {
        steps: r.steps,
        eval_loss: r.eval_loss,
        snapshot_depth_bytes: r.snapshot_depth_bytes,
        snapshot_depth: r.snapshot_depth,
        snapshot_batches: r.snapshot_batches,
        final_eval_loss: r.final_eval_loss,
        final_num_layers: r.final_num_layers,
    }
}

pub fn checkpoint_in(c: &pb::CheckpointRef) -> Option<Checkpoint> {
    Some(Checkpoint {
        step: c.step,
        artifact: artifact_in(c.artifact.as_ref()?),
    })
}

/// The state a task starts from: the output of the latest succeeded training stage before it.
fn state_before(job: &Job, index: u32) -> Option<&Artifact> {
    job.tasks[..index as usize]
        .iter()
        .rev()
        .find(|t| {
            t.status == TaskStatus::Succeeded && matches!(t.kind, TaskKind::TrainStage { .. })
        })
        .and_then(|t| t.outputs.first())
}

/// The shards that write `S[depth]` (task indices, in order).
fn shards_of(job: &Job, depth: u32) -> Vec<&Task> {
    job.tasks
        .iter()
        .filter(|t| matches!(t.kind, TaskKind::AdvanceSnapshots { to, .. } if to == depth))
        .collect()
}

/// The fingerprint stored with `S[depth]`: the checksum of the committed state its shards
/// started from (so a snapshot of other weights can never be read as this one).
fn snapshot_fingerprint(job: &Job, depth: u32) -> String {
    shards_of(job, depth)
        .first()
        .and_then(|t| state_before(job, t.index))
        .map(|a| a.checksum.clone())
        .unwrap_or_default()
}

/// What a worker needs to run task `index` of `job` under lease `epoch`.
pub fn assignment(job: &Job, index: u32, epoch: u64) -> pb::Assignment {
    let task = &job.tasks[index as usize];
    // SnapCheck: the depth the task reads from the snapshot store (0 = none). A training stage
    // reads the newest depth planned before it; a shard reads its `from`.
    let newest_depth = job.tasks[..index as usize]
        .iter()
        .rev()
        .find_map(|t| match t.kind {
            TaskKind::AdvanceSnapshots { to, .. } => Some(to),
            _ => None,
        });
    let (stage_index, snapshot_depth, snapshot_from, snapshot_to, snapshot_shard) = match &task.kind
    {
        TaskKind::TrainStage { stage_index, .. } => {
            (*stage_index, newest_depth.unwrap_or(0), 0, 0, 0)
        }
        TaskKind::AdvanceSnapshots {
            stage_index,
            from,
            to,
            shard,
            ..
        } => (*stage_index, *from, *from, *to, *shard),
        TaskKind::Export => (0, 0, 0, 0, 0),
    };
    let input_shards = shards_of(job, snapshot_depth);
    let snapshot_shards = match &task.kind {
        TaskKind::AdvanceSnapshots { shards, .. } => *shards,
        _ => u32::try_from(input_shards.len()).unwrap_or(u32::MAX),
    };
    let input_state = state_before(job, index).map(artifact_out);
    let stage_metrics = if task.kind == TaskKind::Export {
        job.tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Succeeded)
            .filter_map(|t| t.metrics.as_ref().map(artifact_out))
            .collect()
    } else {
        Vec::new()
    };
    pb::Assignment {
        job_id: job.id.clone(),
        task_index: index,
        epoch,
        kind: task_kind(&task.kind) as i32,
        stage_index,
        spec_yaml: job.spec_yaml.clone(),
        job_dir: job_dir(&job.id),
        input_state,
        resume_from: task.checkpoint.as_ref().map(|c| pb::CheckpointRef {
            step: c.step,
            artifact: Some(artifact_out(&c.artifact)),
        }),
        stage_metrics,
        checkpoint_every_steps: job.checkpoint_every_steps,
        snapshot_depth,
        snapshot_from,
        snapshot_to,
        snapshot_shard,
        snapshot_shards,
        snapshot_in_fingerprint: if snapshot_depth > 0 {
            snapshot_fingerprint(job, snapshot_depth)
        } else {
            String::new()
        },
        snapshot_out_fingerprint: if snapshot_to > 0 {
            snapshot_fingerprint(job, snapshot_to)
        } else {
            String::new()
        },
        snapshots_complete: input_shards
            .iter()
            .all(|t| t.status == TaskStatus::Succeeded),
        traceparent: job.traceparent.clone(),
    }
}
