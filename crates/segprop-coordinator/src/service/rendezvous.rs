//! Rendezvous of a gang's attempt: rank 0 publishes its NCCL unique id, every other rank of
//! the same attempt (job, task, epoch) receives it; fenced by the attempt's lease.
//!
//! [`CommIds`] is the board itself (a plain type: what is published, what is refused, what is
//! forgotten), [`current_attempt`] the fence; [`Coordinator::rendezvous`] holds them under the
//! state lock and waits for rank 0.

use super::*;

/// Communicator ids published by rank 0 of each gang attempt.
#[derive(Debug, Default)]
pub(super) struct CommIds {
    ids: HashMap<Attempt, Vec<u8>>,
}

impl CommIds {
    /// Forgets the ids of attempts that ended or were superseded (no current lease of that
    /// epoch in `jobs`): they are of no use to anyone.
    pub(super) fn retain_live(&mut self, jobs: &[Job]) {
        self.ids.retain(|a, _| {
            jobs.iter().any(|j| {
                j.id == a.job_id
                    && j.tasks
                        .get(a.task_index as usize)
                        .is_some_and(|t| t.lease.as_ref().is_some_and(|l| l.epoch == a.epoch))
            })
        });
    }

    /// Publishes rank 0's `id` for `attempt`. Publishing the same id again is accepted (a
    /// retried call); another id for the same attempt is refused. Returns whether it is new.
    pub(super) fn publish(&mut self, attempt: &Attempt, id: &[u8]) -> Result<bool, CoordError> {
        match self.ids.get(attempt) {
            Some(known) if known.as_slice() != id => Err(CoordError::AlreadyPublished(format!(
                "unique_id: rank 0 of job {} task {} (epoch {}) already published another id",
                attempt.job_id, attempt.task_index, attempt.epoch
            ))),
            Some(_) => Ok(false),
            None => {
                self.ids.insert(attempt.clone(), id.to_vec());
                Ok(true)
            }
        }
    }

    /// The id rank 0 published for `attempt`, if it has.
    pub(super) fn get(&self, attempt: &Attempt) -> Option<&[u8]> {
        self.ids.get(attempt).map(Vec::as_slice)
    }
}

impl Coordinator {
    /// The rendezvous of a gang's communicator: rank 0 publishes the id of its task attempt's
    /// communicator, every other rank receives it (waiting up to `req.wait` for rank 0). Only
    /// the worker holding the attempt's lease takes part, and only while the attempt is
    /// current. Returns the attempt's communicator id.
    pub async fn rendezvous(&self, req: Rendezvous) -> Result<Vec<u8>, CoordError> {
        let attempt = &req.attempt;
        let deadline = tokio::time::Instant::now() + req.wait;
        loop {
            let mut notified = pin!(self.published.notified());
            notified.as_mut().enable();
            {
                let mut inner = self.lock();
                current_attempt(&inner.jobs, &req.worker_id, attempt)?;
                let Inner {
                    jobs, rendezvous, ..
                } = &mut *inner;
                rendezvous.retain_live(jobs);
                if req.rank == 0 {
                    if rendezvous.publish(attempt, &req.unique_id)? {
                        tracing::info!(job = %attempt.job_id, task = attempt.task_index, epoch = attempt.epoch, world = req.world, bytes = req.unique_id.len(), "gang communicator id published");
                    }
                    drop(inner);
                    self.published.notify_waiters();
                    return Ok(req.unique_id);
                }
                if let Some(id) = rendezvous.get(attempt) {
                    return Ok(id.to_vec());
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(CoordError::RendezvousTimeout(format!(
                    "rank 0 of job {} task {} (epoch {}) has not published its communicator id \
                     within {} ms",
                    attempt.job_id,
                    attempt.task_index,
                    attempt.epoch,
                    req.wait.as_millis()
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

#[cfg(test)]
mod tests {
    use segprop_core::sched::{Lease, TaskStatus};

    use super::*;

    /// A job whose task 0 runs under lease `epoch` held by `worker`.
    fn running_job(epoch: u64, worker: &str) -> Job {
        let mut job = Job::new(
            NewJob {
                id: JobId::from("j1-gang"),
                seq: 1,
                name: "gang".into(),
                regime: "e2e".into(),
                spec_yaml: String::new(),
                backend: sched::Backend::Cpu,
                devices_per_gang: 2,
                checkpoint_every_steps: 0,
                tasks: vec![sched::PlannedTask {
                    kind: sched::TaskKind::Export,
                    after: Vec::new(),
                }],
            },
            0,
        );
        let task = &mut job.tasks[0];
        task.status = TaskStatus::Running;
        task.epoch = epoch;
        task.lease = Some(Lease {
            worker_id: WorkerId::from(worker),
            epoch,
            expires_at: u64::MAX,
        });
        job
    }

    fn attempt(epoch: u64) -> Attempt {
        Attempt {
            job_id: JobId::from("j1-gang"),
            task_index: 0,
            epoch,
        }
    }

    #[test]
    fn rank_zero_publishes_once_and_a_different_id_is_refused() {
        let mut ids = CommIds::default();
        assert_eq!(ids.get(&attempt(1)), None);
        assert!(ids.publish(&attempt(1), b"nccl-1").expect("first"));
        assert!(
            !ids.publish(&attempt(1), b"nccl-1")
                .expect("a retried publish")
        );
        assert!(matches!(
            ids.publish(&attempt(1), b"other"),
            Err(CoordError::AlreadyPublished(_))
        ));
        assert_eq!(ids.get(&attempt(1)), Some(&b"nccl-1"[..]));
        // Another attempt of the same task has its own communicator.
        assert!(ids.publish(&attempt(2), b"nccl-2").expect("next epoch"));
    }

    #[test]
    fn ids_of_superseded_or_ended_attempts_are_forgotten() {
        let mut ids = CommIds::default();
        ids.publish(&attempt(1), b"old").expect("publish");
        ids.publish(&attempt(2), b"new").expect("publish");
        ids.retain_live(&[running_job(2, "w-a-1")]);
        assert_eq!(ids.get(&attempt(1)), None);
        assert_eq!(ids.get(&attempt(2)), Some(&b"new"[..]));
        ids.retain_live(&[]);
        assert_eq!(ids.get(&attempt(2)), None);
    }

    #[test]
    fn only_the_current_attempt_of_its_lease_holder_takes_part() {
        let jobs = [running_job(2, "w-a-1")];
        let holder = WorkerId::from("w-a-1");
        assert!(current_attempt(&jobs, &holder, &attempt(2)).is_ok());
        let refused =
            |worker: &str, a: Attempt| match current_attempt(&jobs, &WorkerId::from(worker), &a) {
                Err(CoordError::Fenced(m)) => m,
                other => panic!("not fenced: {other:?}"),
            };
        assert!(refused("w-a-1", attempt(1)).contains("not the current attempt (that is epoch 2)"));
        assert!(refused("w-b-1", attempt(2)).contains("leased to another worker"));
        let mut unknown = attempt(2);
        unknown.job_id = JobId::from("j9-none");
        assert!(refused("w-a-1", unknown).contains("no such running job"));
    }
}
