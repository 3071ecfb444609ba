//! Task reports: what happens when a worker reports a result (fenced by the task's lease
//! epoch; the scheduler decides, the transition is committed before the call returns).

use super::*;

impl Coordinator {
    pub async fn report(&self, req: Report) -> Result<(), CoordError> {
        let (ready, ticket) = self.report_locked(req)?;
        // Woken workers may lease the tasks this report readied before its commit returns: a
        // lease is queued after the report's write, so no assignment is answered before it.
        self.wake(ready);
        self.durable(ticket).await
    }

    /// Decides the report under the lock and queues its commit; returns the tasks it made ready.
    fn report_locked(&self, req: Report) -> Result<(usize, Ticket), CoordError> {
        let now = now_ms();
        let Report {
            worker_id,
            attempt,
            outcome,
        } = req;
        let succeeded = matches!(outcome, Outcome::Succeeded { .. });
        let mut inner = self.lock();
        let Ok(index) = position(&inner.jobs, attempt.job_id.as_str()) else {
            find(&inner.done, attempt.job_id.as_str())?;
            self.lock_counters().rejected_reports += 1;
            return Err(CoordError::Fenced(format!(
                "report for job {} task {} rejected: the job has ended",
                attempt.job_id, attempt.task_index
            )));
        };
        let result = sched::complete(
            &mut inner.jobs[index],
            attempt.task_index,
            attempt.epoch,
            &worker_id,
            outcome,
            now,
            &self.sched,
        );
        let transitions = match result {
            Ok(t) => t,
            Err(reject) => {
                tracing::warn!(worker = %worker_id, job = %attempt.job_id, task = attempt.task_index, epoch = attempt.epoch, %reject, "task report rejected");
                self.lock_counters().rejected_reports += 1;
                return Err(CoordError::Fenced(format!(
                    "report for job {} task {} rejected: {reject}",
                    attempt.job_id, attempt.task_index
                )));
            }
        };
        let mut changed = self.collect_snapshots(&mut inner);
        changed.push(attempt.job_id.clone());
        inner
            .progress
            .remove(&(attempt.job_id.clone(), attempt.task_index));
        let ids: Vec<&str> = changed.iter().map(JobId::as_str).collect();
        let ticket = self.commit(&inner, &ids)?;
        for t in &transitions {
            tracing::info!(?t, "task report accepted");
        }
        if succeeded {
            self.lock_counters().commits += 1;
        }
        let job = &inner.jobs[index];
        let ready = job
            .tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Ready && t.not_before <= now)
            .count();
        retire(&mut inner);
        Ok((ready, ticket))
    }
}
