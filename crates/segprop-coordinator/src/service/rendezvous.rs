//! Rendezvous of a gang's attempt: rank 0 publishes its NCCL unique id, every other rank of
//! the same attempt (job, task, epoch) receives it; fenced by the attempt's lease.

use super::*;

impl Coordinator {
    /// The rendezvous of a gang's communicator: rank 0 publishes the id of its task attempt's
    /// communicator, every other rank receives it (waiting up to `wait_ms` for rank 0). Only the
    /// worker holding the attempt's lease takes part, and only while the attempt is current.
    pub async fn rendezvous(&self, req: Rendezvous) -> Result<pb::RendezvousReply, CoordError> {
        let attempt = &req.attempt;
        let key = (attempt.job_id.clone(), attempt.task_index, attempt.epoch);
        let wait = req.wait;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut notified = pin!(self.published.notified());
            notified.as_mut().enable();
            {
                let mut inner = self.lock();
                current_attempt(&inner.jobs, &req.worker_id, attempt)?;
                // Ids of attempts that ended (or were superseded) are of no use to anyone.
                let jobs = &inner.jobs;
                let live = |(job_id, task, epoch): &(JobId, u32, u64)| {
                    jobs.iter().any(|j| {
                        j.id == *job_id
                            && j.tasks.get(*task as usize).is_some_and(|t| {
                                t.lease.as_ref().is_some_and(|l| l.epoch == *epoch)
                            })
                    })
                };
                let stale: Vec<_> = inner
                    .rendezvous
                    .keys()
                    .filter(|k| !live(k))
                    .cloned()
                    .collect();
                for k in stale {
                    inner.rendezvous.remove(&k);
                }
                if req.rank == 0 {
                    match inner.rendezvous.get(&key) {
                        Some(id) if *id != req.unique_id => {
                            return Err(CoordError::AlreadyPublished(format!(
                                "unique_id: rank 0 of job {} task {} (epoch {}) already published \
                                 another id",
                                attempt.job_id, attempt.task_index, attempt.epoch
                            )));
                        }
                        Some(_) => {}
                        None => {
                            tracing::info!(job = %attempt.job_id, task = attempt.task_index, epoch = attempt.epoch, world = req.world, bytes = req.unique_id.len(), "gang communicator id published");
                            inner.rendezvous.insert(key, req.unique_id.clone());
                        }
                    }
                    drop(inner);
                    self.published.notify_waiters();
                    return Ok(pb::RendezvousReply {
                        unique_id: req.unique_id,
                    });
                }
                if let Some(id) = inner.rendezvous.get(&key) {
                    return Ok(pb::RendezvousReply {
                        unique_id: id.clone(),
                    });
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(CoordError::RendezvousTimeout(format!(
                    "rank 0 of job {} task {} (epoch {}) has not published its communicator id \
                     within {} ms",
                    attempt.job_id,
                    attempt.task_index,
                    attempt.epoch,
                    wait.as_millis()
                )));
            }
        }
    }
}

/// Refuses a rendezvous for anything but a running attempt leased to the calling worker.
fn current_attempt(
    jobs: &[Job],
    worker_id: &WorkerId,
    attempt: &Attempt,
) -> Result<(), CoordError> {
    let what = format!(
        "job {} task {} (epoch {})",
        attempt.job_id, attempt.task_index, attempt.epoch
    );
    let job = jobs
        .iter()
        .find(|j| j.id == attempt.job_id)
        .ok_or_else(|| {
            CoordError::Fenced(format!(
                "{what}: no such running job (it ended, or never was)"
            ))
        })?;
    let task = job.tasks.get(attempt.task_index as usize).ok_or_else(|| {
        CoordError::Fenced(format!("{what}: the job has {} tasks", job.tasks.len()))
    })?;
    match &task.lease {
        Some(lease) if lease.epoch == attempt.epoch && lease.worker_id == *worker_id => Ok(()),
        Some(lease) if lease.epoch != attempt.epoch => Err(CoordError::Fenced(format!(
            "{what}: not the current attempt (that is epoch {})",
            lease.epoch
        ))),
        Some(_) => Err(CoordError::Fenced(format!(
            "{what}: leased to another worker, not to {worker_id}"
        ))),
        None => Err(CoordError::Fenced(format!("{what}: not running"))),
    }
}
