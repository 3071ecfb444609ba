//! Assignment, leases and fencing: which ready task goes to which worker, lease renewal and
//! expiry, and the outcome of an attempt (a refused message changes nothing).

use std::fmt;

use serde::{Deserialize, Serialize};

use super::*;

/// A registered worker as the scheduler sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerView {
    pub id: WorkerId,
    /// `cpu` or `cuda`.
    pub backend: Backend,
    /// Devices the worker drives.
    pub devices: u32,
    /// Tasks it can take on now.
    pub free_slots: u32,
}

/// A task leased to a worker by [`assign`]: the coordinator sends it to the worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub job_id: JobId,
    pub task_index: u32,
    /// The lease's epoch: the worker quotes it in every message about the task.
    pub epoch: u64,
    pub worker_id: WorkerId,
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
    WrongWorker { holder: WorkerId },
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Succeeded {
        outputs: Vec<Artifact>,
        metrics: Option<Artifact>,
        /// The stage record, for people and tools.
        result_json: String,
        /// What the scheduler reads of the record.
        result: TaskResult,
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
        job_id: JobId,
        task_index: u32,
        epoch: u64,
        worker_id: WorkerId,
    },
    TaskSucceeded {
        job_id: JobId,
        task_index: u32,
    },
    /// An attempt failed or expired; the task is `Ready` again from `not_before`.
    TaskRetry {
        job_id: JobId,
        task_index: u32,
        failures: u32,
        not_before: u64,
        reason: String,
    },
    TaskFailed {
        job_id: JobId,
        task_index: u32,
        reason: String,
    },
    TaskSkipped {
        job_id: JobId,
        task_index: u32,
    },
    JobFinished {
        job_id: JobId,
        status: JobStatus,
    },
}

/// Ends every lease with `expires_at < now`: the attempt counts as a failure ("lease expired
/// (worker W stopped heartbeating)"); the task is `Ready` again after a backoff, or `Failed` once
/// `failures >= max_attempts` (its job `Failed`, the job's other unfinished tasks `Cancelled`).
pub fn expire_leases(jobs: &mut [Job], now: u64, cfg: &SchedConfig) -> Vec<Transition> {
    let mut transitions = Vec::new();
    for job in jobs.iter_mut().filter(|job| !job.is_terminal()) {
        let expired: Vec<(u32, WorkerId)> = job
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
    worker_id: &WorkerId,
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
    if lease.worker_id != *worker_id {
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
    worker_id: &WorkerId,
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
    worker_id: &WorkerId,
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
            result,
            early_exit,
        } => {
            task.status = TaskStatus::Succeeded;
            task.lease = None;
            task.commits = task.commits.saturating_add(1);
            task.outputs = outputs;
            task.metrics = metrics;
            task.result_json = Some(result_json);
            task.result = Some(result);
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
    worker_id_old_or_new: &WorkerId,
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
            lease.worker_id = worker_id_old_or_new.clone();
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
