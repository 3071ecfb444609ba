//! Workers: registration, and heartbeats that renew leases and long-poll for assignments
//! (an idle worker's heartbeat waits up to one heartbeat interval for a task to become ready).

use super::*;

impl Coordinator {
    pub async fn register(&self, req: Registration) -> Result<Registered, CoordError> {
        let (reply, ticket) = self.register_locked(req)?;
        self.durable(ticket).await?;
        Ok(reply)
    }

    fn register_locked(&self, req: Registration) -> Result<(Registered, Ticket), CoordError> {
        let now = now_ms();
        let mut inner = self.lock();
        let id = WorkerId::from(format!("w-{}-{}", self.boot, inner.next_worker));
        inner.next_worker += 1;
        inner.workers.insert(
            id.clone(),
            Worker {
                name: req.name.clone(),
                backend: req.backend,
                devices: req.devices,
                device_bytes: req.device_bytes,
                host_bytes: req.host_bytes,
                last_seen: now,
            },
        );
        let mut adopted = Vec::new();
        for running in &req.running {
            if let Ok(index) = position(&inner.jobs, running.job_id.as_str())
                && sched::adopt(
                    &mut inner.jobs[index],
                    running.task_index,
                    running.epoch,
                    &id,
                    now,
                    &self.sched,
                )
            {
                adopted.push(running.job_id.clone());
            }
        }
        let ids: Vec<&str> = adopted.iter().map(JobId::as_str).collect();
        let ticket = self.commit(&inner, &ids)?;
        tracing::info!(worker = %id, name = %req.name, backend = %req.backend, devices = req.devices, adopted = adopted.len(), "worker registered");
        let reply = Registered {
            worker_id: id,
            heartbeat_interval_ms: self.config.heartbeat_interval_ms,
            lease_ms: self.config.lease_ms,
            artifact_root: absolute(&self.config.artifact_root),
        };
        Ok((reply, ticket))
    }

    /// Renews the worker's leases, records progress and checkpoints, and hands out new tasks.
    /// Without new tasks for an idle worker, waits up to one heartbeat interval for one.
    pub async fn heartbeat(&self, req: Heartbeat) -> Result<HeartbeatReply, CoordError> {
        let mut reply = self.heartbeat_once(&req).await?;
        let idle = req.running.is_empty() && req.free_slots > 0;
        if reply.reregister || !reply.dispatches.is_empty() || !idle {
            return Ok(reply);
        }
        let wait = Duration::from_millis(self.config.heartbeat_interval_ms);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut notified = pin!(self.ready.notified());
            notified.as_mut().enable();
            // Re-check after enabling, so a task that became ready meanwhile is not missed.
            reply.dispatches = self.assign_to(&req.worker_id).await?;
            if !reply.dispatches.is_empty() {
                return Ok(reply);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(reply);
            }
        }
    }

    async fn heartbeat_once(&self, req: &Heartbeat) -> Result<HeartbeatReply, CoordError> {
        let (mut reply, ticket) = self.renew_locked(req)?;
        // A heartbeat that only renews leases changes nothing durable and waits for no commit.
        self.durable(ticket).await?;
        if !reply.reregister && req.free_slots > 0 {
            reply.dispatches = self.assign_to(&req.worker_id).await?;
        }
        Ok(reply)
    }

    /// Renews the leases of `req.running` and records their progress and checkpoints.
    fn renew_locked(&self, req: &Heartbeat) -> Result<(HeartbeatReply, Ticket), CoordError> {
        let now = now_ms();
        let mut inner = self.lock();
        let Some(worker) = inner.workers.get_mut(&req.worker_id) else {
            let reply = HeartbeatReply {
                reregister: true,
                ..Default::default()
            };
            return Ok((reply, self.writer.nothing()));
        };
        worker.last_seen = now;
        let mut reply = HeartbeatReply::default();
        let mut changed = Vec::new();
        for running in &req.running {
            let attempt = &running.attempt;
            let Ok(index) = position(&inner.jobs, attempt.job_id.as_str()) else {
                reply.cancel.push(attempt.clone());
                continue;
            };
            let checkpoint = running.checkpoint.clone();
            let job = &mut inner.jobs[index];
            let before = job
                .tasks
                .get(attempt.task_index as usize)
                .and_then(|t| t.checkpoint.as_ref().map(|c| c.step));
            match sched::renew(
                job,
                attempt.task_index,
                attempt.epoch,
                &req.worker_id,
                checkpoint,
                now,
                &self.sched,
            ) {
                Ok(()) => {
                    let after = job.tasks[attempt.task_index as usize]
                        .checkpoint
                        .as_ref()
                        .map(|c| c.step);
                    if after != before {
                        changed.push(job.id.clone());
                    }
                    for event in &running.events {
                        let _ = self.events.send(Arc::new((
                            attempt.job_id.to_string(),
                            convert::progress_event(event.clone()),
                        )));
                    }
                    if let Some(last) = running.events.last() {
                        inner
                            .progress
                            .insert((attempt.job_id.clone(), attempt.task_index), last.clone());
                    }
                }
                Err(reject) => {
                    tracing::warn!(worker = %req.worker_id, job = %attempt.job_id, task = attempt.task_index, epoch = attempt.epoch, %reject, "renewal refused; telling the worker to stop");
                    self.lock_counters().rejected_renewals += 1;
                    reply.cancel.push(attempt.clone());
                }
            }
        }
        let ids: Vec<&str> = changed.iter().map(JobId::as_str).collect();
        let ticket = self.commit(&inner, &ids)?;
        Ok((reply, ticket))
    }

    async fn assign_to(&self, worker_id: &WorkerId) -> Result<Vec<Dispatch>, CoordError> {
        let (out, ticket) = self.assign_locked(worker_id)?;
        self.durable(ticket).await?;
        Ok(out)
    }

    /// The scheduler's assignment to `worker_id`, queued for commit (under the lock).
    fn assign_locked(&self, worker_id: &WorkerId) -> Result<(Vec<Dispatch>, Ticket), CoordError> {
        let now = now_ms();
        let mut inner = self.lock();
        let Some(worker) = inner.workers.get(worker_id) else {
            return Ok((Vec::new(), self.writer.nothing()));
        };
        let busy = inner
            .jobs
            .iter()
            .flat_map(|j| j.running_leases())
            .any(|(_, l)| l.worker_id == *worker_id);
        if busy {
            return Ok((Vec::new(), self.writer.nothing()));
        }
        let view = sched::WorkerView {
            id: worker_id.clone(),
            backend: worker.backend,
            devices: worker.devices,
            free_slots: 1,
        };
        let (assignments, transitions) = sched::assign(&mut inner.jobs, &[view], now, &self.sched);
        if assignments.is_empty() && transitions.is_empty() {
            return Ok((Vec::new(), self.writer.nothing()));
        }
        let changed = changed_jobs(&transitions);
        let ids: Vec<&str> = changed.iter().map(JobId::as_str).collect();
        let ticket = self.commit(&inner, &ids)?;
        let mut out = Vec::new();
        for a in &assignments {
            let job = find(&inner.jobs, a.job_id.as_str())?;
            tracing::info!(job = %a.job_id, task = a.task_index, name = job.tasks[a.task_index as usize].kind.name(), epoch = a.epoch, worker = %worker_id, "task assigned");
            out.push(job.dispatch(a.task_index, a.epoch, convert::job_dir(job.id.as_str())));
        }
        for t in transitions
            .iter()
            .filter(|t| matches!(t, sched::Transition::JobFinished { .. }))
        {
            tracing::warn!(?t, "job failed at assignment");
        }
        retire(&mut inner);
        self.lock_counters().assignments += assignments.len() as u64;
        Ok((out, ticket))
    }
}
