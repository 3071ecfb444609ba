//! Wire conversions between the scheduler's types and `segprop.v1` messages (the only place
//! the coordinator touches prost types besides the service signatures). Inbound conversions
//! validate: a missing field is a [`CoordError::Field`] (INVALID_ARGUMENT).

use std::collections::HashMap;

use segprop_core::sched::{
    Backend, Job, JobId, JobStatus, Outcome, TaskKind, TaskStatus, WorkerId,
};
use segprop_proto::v1 as pb;

use crate::config::CoordConfig;
use crate::error::CoordError;
use crate::request::{
    Attempt, Heartbeat, HeartbeatReply, Registered, Registration, Rendezvous, Report, Running,
};

/// The longest one `Rendezvous` call waits for rank 0's id.
pub const MAX_RENDEZVOUS_WAIT_MS: u32 = 300_000;
/// The largest communicator id accepted (an `ncclUniqueId` has 128 bytes).
pub const MAX_UNIQUE_ID_BYTES: usize = 4096;

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
    progress: &HashMap<(JobId, u32), pb::Progress>,
    config: &CoordConfig,
) -> pb::Job {
    pb::Job {
        job_id: job.id.to_string(),
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
                    .map(|l| l.worker_id.to_string())
                    .unwrap_or_default(),
                progress: progress.get(&(job.id.clone(), t.index)).cloned(),
                error: t.error.clone().unwrap_or_default(),
                result_json: t.result_json.clone().unwrap_or_default(),
                result: t.result.as_ref().map(Into::into),
                checkpoint_step: t.checkpoint.as_ref().map_or(0, |c| c.step),
            })
            .collect(),
        error: job.error.clone().unwrap_or_default(),
        run_dir: match &config.artifact_store {
            Some(store) => format!(
                "{}/{}",
                store.url.trim_end_matches('/'),
                job_dir(job.id.as_str())
            ),
            None => config
                .artifact_root
                .join(job_dir(job.id.as_str()))
                .display()
                .to_string(),
        },
        created_unix_ms: job.created_at,
        finished_unix_ms: job.finished_at.unwrap_or(0),
        preflight: job.preflight.clone().unwrap_or_default(),
    }
}

/// A job's new state on a watch stream.
pub fn job_event(view: pb::Job) -> pb::JobEvent {
    pb::JobEvent {
        event: Some(pb::job_event::Event::Job(view)),
    }
}

/// A running task's progress on a watch stream, relayed as the worker sent it.
pub fn progress_event(progress: pb::Progress) -> pb::JobEvent {
    pb::JobEvent {
        event: Some(pb::job_event::Event::Progress(progress)),
    }
}

/// Whether a job view is in a state it never leaves (the watch stream ends there).
pub fn is_final(view: &pb::Job) -> bool {
    matches!(
        pb::JobState::try_from(view.state),
        Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
    )
}

pub fn task_kind(kind: &TaskKind) -> pb::TaskKind {
    match kind {
        TaskKind::TrainStage { .. } => pb::TaskKind::TrainStage,
        TaskKind::AdvanceSnapshots { .. } => pb::TaskKind::AdvanceSnapshots,
        TaskKind::Export => pb::TaskKind::Export,
    }
}

pub use segprop_store::layout::job_dir;

/// A worker's registration: its protocol version must be the coordinator's and its backend
/// one the scheduler knows.
pub fn registration_in(req: pb::RegisterWorkerRequest) -> Result<Registration, CoordError> {
    if req.protocol_version != segprop_proto::PROTOCOL_VERSION {
        return Err(CoordError::Protocol {
            worker: req.protocol_version,
            coordinator: segprop_proto::PROTOCOL_VERSION,
        });
    }
    let Some(backend) = Backend::parse(&req.backend) else {
        return Err(CoordError::Field {
            field: "backend",
            message: format!("`{}` is not one of cpu, cuda", req.backend),
        });
    };
    Ok(Registration {
        name: req.name,
        backend,
        devices: req.devices.len().max(1) as u32,
        device_bytes: req
            .devices
            .iter()
            .map(|d| d.memory_bytes)
            .min()
            .unwrap_or(0),
        host_bytes: req.host_memory_bytes,
        running: req
            .running
            .into_iter()
            .map(|r| running_in(r).attempt)
            .collect(),
    })
}

pub fn registered_out(r: Registered) -> pb::RegisterWorkerResponse {
    pb::RegisterWorkerResponse {
        worker_id: r.worker_id.into(),
        heartbeat_interval_ms: u32::try_from(r.heartbeat_interval_ms).unwrap_or(u32::MAX),
        lease_ms: u32::try_from(r.lease_ms).unwrap_or(u32::MAX),
        artifact_root: r.artifact_root,
    }
}

pub fn heartbeat_in(req: pb::HeartbeatRequest) -> Heartbeat {
    Heartbeat {
        worker_id: WorkerId::from(req.worker_id),
        free_slots: req.free_slots,
        running: req.running.into_iter().map(running_in).collect(),
    }
}

fn running_in(r: pb::RunningTask) -> Running {
    Running {
        checkpoint: r
            .checkpoint
            .as_ref()
            .and_then(segprop_proto::domain::checkpoint),
        attempt: Attempt {
            job_id: JobId::from(r.job_id),
            task_index: r.task_index,
            epoch: r.epoch,
        },
        events: r.events,
    }
}

pub fn heartbeat_out(r: HeartbeatReply) -> pb::HeartbeatResponse {
    pb::HeartbeatResponse {
        assignments: r.dispatches.into_iter().map(Into::into).collect(),
        cancel: r.cancel.iter().map(Into::into).collect(),
        reregister: r.reregister,
    }
}

/// A task report; its outcome is required.
pub fn report_in(req: pb::ReportTaskRequest) -> Result<Report, CoordError> {
    Ok(Report {
        outcome: outcome_in(req.outcome)?,
        worker_id: WorkerId::from(req.worker_id),
        attempt: Attempt {
            job_id: JobId::from(req.job_id),
            task_index: req.task_index,
            epoch: req.epoch,
        },
    })
}

/// A rank at the rendezvous: `rank < world`; rank 0 publishes a non-empty id of at most
/// [`MAX_UNIQUE_ID_BYTES`], the others none; the wait is capped at [`MAX_RENDEZVOUS_WAIT_MS`].
pub fn rendezvous_in(req: pb::RendezvousRequest) -> Result<Rendezvous, CoordError> {
    let field = |field: &'static str, message: String| CoordError::Field { field, message };
    if req.rank >= req.world {
        return Err(field(
            "rank",
            format!(
                "{} is not a rank of a gang of {} (world)",
                req.rank, req.world
            ),
        ));
    }
    match (req.rank, req.unique_id.len()) {
        (0, 0) => {
            return Err(field(
                "unique_id",
                "rank 0 publishes the communicator's id, and it is empty".into(),
            ));
        }
        (0, n) if n > MAX_UNIQUE_ID_BYTES => {
            return Err(field(
                "unique_id",
                format!("{n} bytes; at most {MAX_UNIQUE_ID_BYTES}"),
            ));
        }
        (rank, n) if rank > 0 && n > 0 => {
            return Err(field(
                "unique_id",
                format!("only rank 0 publishes; rank {rank} sent {n} bytes"),
            ));
        }
        _ => {}
    }
    Ok(Rendezvous {
        worker_id: WorkerId::from(req.worker_id),
        attempt: Attempt {
            job_id: JobId::from(req.job_id),
            task_index: req.task_index,
            epoch: req.epoch,
        },
        rank: req.rank,
        world: req.world,
        unique_id: req.unique_id,
        wait: std::time::Duration::from_millis(u64::from(req.wait_ms.min(MAX_RENDEZVOUS_WAIT_MS))),
    })
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
            outputs: s.artifacts.iter().map(Into::into).collect(),
            metrics: s.metrics.as_ref().map(Into::into),
            result: s.result.ok_or_else(|| missing("succeeded.result"))?.into(),
            result_json: s.result_json,
            early_exit: s.early_exit,
        }),
        pb::report_task_request::Outcome::Failed(f) => Ok(Outcome::Failed {
            reason: f.reason,
            retryable: f.retryable,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration() -> pb::RegisterWorkerRequest {
        pb::RegisterWorkerRequest {
            protocol_version: segprop_proto::PROTOCOL_VERSION,
            name: "w1".into(),
            backend: "cpu".into(),
            devices: vec![
                pb::Device {
                    name: "a".into(),
                    memory_bytes: 8 << 30,
                },
                pb::Device {
                    name: "b".into(),
                    memory_bytes: 4 << 30,
                },
            ],
            host_memory_bytes: 16 << 30,
            running: vec![pb::RunningTask {
                job_id: "j1".into(),
                task_index: 2,
                epoch: 5,
                ..Default::default()
            }],
        }
    }

    fn refused_field(e: CoordError) -> &'static str {
        match e {
            CoordError::Field { field, .. } => field,
            other => panic!("not a field error: {other}"),
        }
    }

    #[test]
    fn a_registration_offers_its_smallest_device_and_lists_its_attempts() {
        let r = registration_in(registration()).expect("registration");
        assert_eq!(
            (r.backend, r.devices, r.device_bytes),
            (Backend::Cpu, 2, 4 << 30)
        );
        assert_eq!(
            r.running,
            vec![Attempt {
                job_id: "j1".into(),
                task_index: 2,
                epoch: 5
            }]
        );
        let mut old = registration();
        old.protocol_version = 1;
        assert!(matches!(
            registration_in(old),
            Err(CoordError::Protocol { worker: 1, .. })
        ));
        let mut tpu = registration();
        tpu.backend = "tpu".into();
        assert_eq!(refused_field(registration_in(tpu).unwrap_err()), "backend");
    }

    #[test]
    fn a_report_without_an_outcome_or_typed_result_is_refused_by_field() {
        let bare = pb::ReportTaskRequest::default();
        assert_eq!(refused_field(report_in(bare).unwrap_err()), "outcome");
        let untyped = pb::ReportTaskRequest {
            outcome: Some(pb::report_task_request::Outcome::Succeeded(
                pb::TaskSucceeded::default(),
            )),
            ..Default::default()
        };
        assert_eq!(
            refused_field(report_in(untyped).unwrap_err()),
            "succeeded.result"
        );
    }

    #[test]
    fn rendezvous_ranks_and_ids_are_checked_and_the_wait_capped() {
        let rank = |rank: u32, world: u32, id: &[u8]| pb::RendezvousRequest {
            job_id: "j1".into(),
            rank,
            world,
            unique_id: id.to_vec(),
            wait_ms: u32::MAX,
            ..Default::default()
        };
        let ok = rendezvous_in(rank(1, 2, b"")).expect("rank 1 waits");
        assert_eq!(
            ok.wait,
            std::time::Duration::from_millis(u64::from(MAX_RENDEZVOUS_WAIT_MS))
        );
        assert!(rendezvous_in(rank(0, 2, b"id")).is_ok());
        for bad in [
            rank(2, 2, b""),
            rank(0, 2, b""),
            rank(1, 2, b"id"),
            rank(0, 2, &vec![7; MAX_UNIQUE_ID_BYTES + 1]),
        ] {
            let e = rendezvous_in(bad).unwrap_err();
            assert!(["rank", "unique_id"].contains(&refused_field(e)));
        }
    }
}
