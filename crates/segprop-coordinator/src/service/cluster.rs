//! The worker side of the [`Coordinator`]: registration, heartbeats (which long-poll for
//! assignments and renew leases), NCCL-id rendezvous for a gang's attempt, and task reports.

use super::*;

impl Coordinator {
    pub fn register(
        &self,
        req: pb::RegisterWorkerRequest,
    ) -> Result<pb::RegisterWorkerResponse, Status> {
        if req.protocol_version != segprop_proto::PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "worker speaks protocol version {}, this coordinator speaks {}",
                req.protocol_version,
                segprop_proto::PROTOCOL_VERSION
            )));
        }
        if req.backend != "cpu" && req.backend != "cuda" {
            return Err(Status::invalid_argument(format!(
                "backend: `{}` is not one of cpu, cuda",
                req.backend
            )));
        }
        let now = now_ms();
        let mut inner = self.lock();
        let id = format!("w-{}-{}", self.boot, inner.next_worker);
        inner.next_worker += 1;
        inner.workers.insert(
            id.clone(),
            Worker {
                name: req.name.clone(),
                backend: req.backend.clone(),
                devices: req.devices.len().max(1) as u32,
                device_bytes: req
                    .devices
                    .iter()
                    .map(|d| d.memory_bytes)
                    .min()
                    .unwrap_or(0),
                host_bytes: req.host_memory_bytes,
                last_seen: now,
            },
        );
        let mut adopted = Vec::new();
        for running in &req.running {
            if let Ok(index) = position(&inner.jobs, &running.job_id)
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
        if !adopted.is_empty() {
            let ids: Vec<&str> = adopted.iter().map(String::as_str).collect();
            self.persist(&inner, &ids)?;
        }
        tracing::info!(worker = %id, name = %req.name, backend = %req.backend, devices = req.devices.len(), adopted = adopted.len(), "worker registered");
        Ok(pb::RegisterWorkerResponse {
            worker_id: id,
            heartbeat_interval_ms: self.config.heartbeat_interval_ms as u32,
            lease_ms: self.config.lease_ms as u32,
            artifact_root: absolute(&self.config.artifact_root),
        })
    }

    /// Renews the worker's leases, records progress and checkpoints, and hands out new tasks.
    /// Without new tasks for an idle worker, waits up to one heartbeat interval for one.
    pub async fn heartbeat(
        &self,
        req: pb::HeartbeatRequest,
    ) -> Result<pb::HeartbeatResponse, Status> {
        let mut reply = self.heartbeat_once(&req)?;
        let idle = req.running.is_empty() && req.free_slots > 0;
        if reply.reregister || !reply.assignments.is_empty() || !idle {
            return Ok(reply);
        }
        let wait = Duration::from_millis(self.config.heartbeat_interval_ms);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut notified = pin!(self.ready.notified());
            notified.as_mut().enable();
            // Re-check after enabling, so a task that became ready meanwhile is not missed.
            reply.assignments = self.assign_to(&req.worker_id)?;
            if !reply.assignments.is_empty() {
                return Ok(reply);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(reply);
            }
        }
    }

    fn heartbeat_once(&self, req: &pb::HeartbeatRequest) -> Result<pb::HeartbeatResponse, Status> {
        let now = now_ms();
        let mut inner = self.lock();
        let Some(worker) = inner.workers.get_mut(&req.worker_id) else {
            return Ok(pb::HeartbeatResponse {
                reregister: true,
                ..Default::default()
            });
        };
        worker.last_seen = now;
        let mut reply = pb::HeartbeatResponse::default();
        let mut changed = Vec::new();
        for running in &req.running {
            let task_ref = pb::TaskRef {
                job_id: running.job_id.clone(),
                task_index: running.task_index,
                epoch: running.epoch,
            };
            let Ok(index) = position(&inner.jobs, &running.job_id) else {
                reply.cancel.push(task_ref);
                continue;
            };
            let checkpoint = running.checkpoint.as_ref().and_then(convert::checkpoint_in);
            let job = &mut inner.jobs[index];
            let before = job
                .tasks
                .get(running.task_index as usize)
                .and_then(|t| t.checkpoint.as_ref().map(|c| c.step));
            match sched::renew(
                job,
                running.task_index,
                running.epoch,
                &req.worker_id,
                checkpoint,
                now,
                &self.sched,
            ) {
                Ok(()) => {
                    let after = job.tasks[running.task_index as usize]
                        .checkpoint
                        .as_ref()
                        .map(|c| c.step);
                    if after != before {
                        changed.push(job.id.clone());
                    }
                    for event in &running.events {
                        let _ = self.events.send(Arc::new((
                            running.job_id.clone(),
                            pb::JobEvent {
                                event: Some(pb::job_event::Event::Progress(event.clone())),
                            },
                        )));
                    }
                    if let Some(last) = running.events.last() {
                        inner
                            .progress
                            .insert((running.job_id.clone(), running.task_index), last.clone());
                    }
                }
                Err(reject) => {
                    tracing::warn!(worker = %req.worker_id, job = %running.job_id, task = running.task_index, epoch = running.epoch, %reject, "renewal refused; telling the worker to stop");
                    self.lock_counters().rejected_renewals += 1;
                    reply.cancel.push(task_ref);
                }
            }
        }
        if !changed.is_empty() {
            let ids: Vec<&str> = changed.iter().map(String::as_str).collect();
            self.persist(&inner, &ids)?;
        }
        drop(inner);
        if req.free_slots > 0 {
            reply.assignments = self.assign_to(&req.worker_id)?;
        }
        Ok(reply)
    }

    /// The rendezvous of a gang's communicator: rank 0 publishes the id of its task attempt's
    /// communicator, every other rank receives it (waiting up to `wait_ms` for rank 0). Only the
    /// worker holding the attempt's lease takes part, and only while the attempt is current.
    pub async fn rendezvous(
        &self,
        req: pb::RendezvousRequest,
    ) -> Result<pb::RendezvousReply, Status> {
        if req.rank >= req.world {
            return Err(Status::invalid_argument(format!(
                "rank: {} is not a rank of a gang of {} (world)",
                req.rank, req.world
            )));
        }
        match (req.rank, req.unique_id.len()) {
            (0, 0) => {
                return Err(Status::invalid_argument(
                    "unique_id: rank 0 publishes the communicator's id, and it is empty",
                ));
            }
            (0, n) if n > MAX_UNIQUE_ID_BYTES => {
                return Err(Status::invalid_argument(format!(
                    "unique_id: {n} bytes; at most {MAX_UNIQUE_ID_BYTES}"
                )));
            }
            (rank, n) if rank > 0 && n > 0 => {
                return Err(Status::invalid_argument(format!(
                    "unique_id: only rank 0 publishes; rank {rank} sent {n} bytes"
                )));
            }
            _ => {}
        }
        let key = (req.job_id.clone(), req.task_index, req.epoch);
        let wait = Duration::from_millis(u64::from(req.wait_ms.min(MAX_RENDEZVOUS_WAIT_MS)));
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let mut notified = pin!(self.published.notified());
            notified.as_mut().enable();
            {
                let mut inner = self.lock();
                current_attempt(&inner.jobs, &req)?;
                // Ids of attempts that ended (or were superseded) are of no use to anyone.
                let jobs = &inner.jobs;
                let live = |(job_id, task, epoch): &(String, u32, u64)| {
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
                            return Err(Status::already_exists(format!(
                                "unique_id: rank 0 of job {} task {} (epoch {}) already published \
                                 another id",
                                req.job_id, req.task_index, req.epoch
                            )));
                        }
                        Some(_) => {}
                        None => {
                            tracing::info!(job = %req.job_id, task = req.task_index, epoch = req.epoch, world = req.world, bytes = req.unique_id.len(), "gang communicator id published");
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
                return Err(Status::deadline_exceeded(format!(
                    "rank 0 of job {} task {} (epoch {}) has not published its communicator id \
                     within {} ms",
                    req.job_id,
                    req.task_index,
                    req.epoch,
                    wait.as_millis()
                )));
            }
        }
    }

    fn assign_to(&self, worker_id: &str) -> Result<Vec<pb::Assignment>, Status> {
        let now = now_ms();
        let mut inner = self.lock();
        let Some(worker) = inner.workers.get(worker_id) else {
            return Ok(Vec::new());
        };
        let busy = inner
            .jobs
            .iter()
            .flat_map(|j| j.running_leases())
            .any(|(_, l)| l.worker_id == worker_id);
        if busy {
            return Ok(Vec::new());
        }
        let view = sched::WorkerView {
            id: worker_id.to_string(),
            backend: worker.backend.clone(),
            devices: worker.devices,
            free_slots: 1,
        };
        let (assignments, transitions) = sched::assign(&mut inner.jobs, &[view], now, &self.sched);
        if assignments.is_empty() && transitions.is_empty() {
            return Ok(Vec::new());
        }
        let changed = changed_jobs(&transitions);
        let ids: Vec<&str> = changed.iter().map(String::as_str).collect();
        self.persist(&inner, &ids)?;
        let mut out = Vec::new();
        for a in &assignments {
            let job = find(&inner.jobs, &a.job_id)?;
            tracing::info!(job = %a.job_id, task = a.task_index, name = job.tasks[a.task_index as usize].kind.name(), epoch = a.epoch, worker = %worker_id, "task assigned");
            out.push(convert::assignment(job, a.task_index, a.epoch));
        }
        self.publish_changed(&inner, &changed);
        for t in transitions
            .iter()
            .filter(|t| matches!(t, sched::Transition::JobFinished { .. }))
        {
            tracing::warn!(?t, "job failed at assignment");
        }
        retire(&mut inner);
        self.lock_counters().assignments += assignments.len() as u64;
        Ok(out)
    }

    pub fn report(&self, req: pb::ReportTaskRequest) -> Result<(), Status> {
        let now = now_ms();
        let outcome = match req.outcome {
            Some(pb::report_task_request::Outcome::Succeeded(s)) => Outcome::Succeeded {
                outputs: s.artifacts.iter().map(convert::artifact_in).collect(),
                metrics: s.metrics.as_ref().map(convert::artifact_in),
                result_json: s.result_json,
                early_exit: s.early_exit,
            },
            Some(pb::report_task_request::Outcome::Failed(f)) => Outcome::Failed {
                reason: f.reason,
                retryable: f.retryable,
            },
            None => return Err(Status::invalid_argument("outcome: missing")),
        };
        let succeeded = matches!(outcome, Outcome::Succeeded { .. });
        let mut inner = self.lock();
        let Ok(index) = position(&inner.jobs, &req.job_id) else {
            find(&inner.done, &req.job_id)?;
            self.lock_counters().rejected_reports += 1;
            return Err(Status::failed_precondition(format!(
                "report for job {} task {} rejected: the job has ended",
                req.job_id, req.task_index
            )));
        };
        let result = sched::complete(
            &mut inner.jobs[index],
            req.task_index,
            req.epoch,
            &req.worker_id,
            outcome,
            now,
            &self.sched,
        );
        let transitions = match result {
            Ok(t) => t,
            Err(reject) => {
                tracing::warn!(worker = %req.worker_id, job = %req.job_id, task = req.task_index, epoch = req.epoch, %reject, "task report rejected");
                self.lock_counters().rejected_reports += 1;
                return Err(Status::failed_precondition(format!(
                    "report for job {} task {} rejected: {reject}",
                    req.job_id, req.task_index
                )));
            }
        };
        let mut changed = self.collect_snapshots(&mut inner);
        changed.push(req.job_id.clone());
        let ids: Vec<&str> = changed.iter().map(String::as_str).collect();
        self.persist(&inner, &ids)?;
        inner.progress.remove(&(req.job_id.clone(), req.task_index));
        for t in &transitions {
            tracing::info!(?t, "task report accepted");
        }
        if succeeded {
            self.lock_counters().commits += 1;
        }
        let job = &inner.jobs[index];
        self.publish(&inner, job);
        let ready = job
            .tasks
            .iter()
            .filter(|t| t.status == TaskStatus::Ready && t.not_before <= now)
            .count();
        retire(&mut inner);
        drop(inner);
        self.wake(ready);
        Ok(())
    }
}

/// Refuses a rendezvous for anything but a running attempt leased to the calling worker.
fn current_attempt(jobs: &[Job], req: &pb::RendezvousRequest) -> Result<(), Status> {
    let what = format!(
        "job {} task {} (epoch {})",
        req.job_id, req.task_index, req.epoch
    );
    let job = jobs.iter().find(|j| j.id == req.job_id).ok_or_else(|| {
        Status::failed_precondition(format!(
            "{what}: no such running job (it ended, or never was)"
        ))
    })?;
    let task = job.tasks.get(req.task_index as usize).ok_or_else(|| {
        Status::failed_precondition(format!("{what}: the job has {} tasks", job.tasks.len()))
    })?;
    match &task.lease {
        Some(lease) if lease.epoch == req.epoch && lease.worker_id == req.worker_id => Ok(()),
        Some(lease) if lease.epoch != req.epoch => Err(Status::failed_precondition(format!(
            "{what}: not the current attempt (that is epoch {})",
            lease.epoch
        ))),
        Some(_) => Err(Status::failed_precondition(format!(
            "{what}: leased to another worker, not to {}",
            req.worker_id
        ))),
        None => Err(Status::failed_precondition(format!("{what}: not running"))),
    }
}
