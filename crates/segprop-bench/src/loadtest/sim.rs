//! The simulated workers: register, heartbeat (long-polled when idle), run an assignment for
//! a seeded pseudo-random time, report it; and what they saw, shared.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context;
use segprop_proto::v1 as pb;
use tokio::sync::Notify;
use tonic::transport::{Channel, Endpoint};

use super::*;

/// (job id, task index).
pub(super) type TaskKey = (String, u32);

/// An assignment as a simulated worker received it.
pub(super) struct Received {
    pub(super) task: TaskKey,
    pub(super) epoch: u64,
    pub(super) at: Instant,
}

/// State the simulated workers and the submitter share.
#[derive(Default)]
pub(super) struct Shared {
    pub(super) stop: AtomicBool,
    /// Tasks reported succeeded (accepted by the coordinator).
    pub(super) reports: AtomicU64,
    pub(super) progress: Notify,
    pub(super) idle_heartbeats: AtomicU64,
    pub(super) busy_heartbeats: AtomicU64,
    /// When each task became assignable, as the client saw it.
    pub(super) ready: Mutex<HashMap<TaskKey, Instant>>,
    /// Every assignment received.
    pub(super) received: Mutex<Vec<Received>>,
    pub(super) errors: AtomicU64,
    pub(super) error_samples: Mutex<Vec<String>>,
}

impl Shared {
    pub(super) fn error(&self, message: String) {
        if self.stop.load(Ordering::SeqCst) {
            return;
        }
        self.errors.fetch_add(1, Ordering::SeqCst);
        let mut samples = lock(&self.error_samples);
        if samples.len() < ERROR_SAMPLES {
            samples.push(message);
        }
    }

    pub(super) fn became_ready(&self, job_id: &str, task_index: u32, at: Instant) {
        lock(&self.ready).insert((job_id.to_string(), task_index), at);
    }

    /// Joins assignments with readiness; leases beyond the first of a task are errors here
    /// (nothing fails or expires in this test).
    pub(super) fn latencies(&self) -> Latency {
        let ready = lock(&self.ready);
        let received = lock(&self.received);
        let mut samples_ms = Vec::with_capacity(received.len());
        let mut overtook = 0u64;
        let mut unmatched = 0u64;
        for r in received.iter() {
            let Some(ready_at) = ready.get(&r.task).filter(|_| r.epoch == 1) else {
                unmatched += 1;
                continue;
            };
            if r.at < *ready_at {
                overtook += 1;
            }
            samples_ms.push(r.at.saturating_duration_since(*ready_at).as_secs_f64() * 1e3);
        }
        drop(ready);
        drop(received);
        if unmatched > 0 {
            self.error(format!(
                "{unmatched} assignments were re-leases or matched no submit/report"
            ));
        }
        Latency::from_samples(samples_ms, overtook)
    }
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// One simulated worker: the pull loop of `segprop-worker serve` without the training.
pub(super) struct SimWorker {
    pub(super) index: usize,
    pub(super) id: String,
    pub(super) client: ClusterClient,
    pub(super) interval: Duration,
    pub(super) task_ms: (u64, u64),
    pub(super) rng: SplitMix64,
    pub(super) shared: Arc<Shared>,
}

impl SimWorker {
    pub(super) async fn run(mut self) {
        while !self.shared.stop.load(Ordering::SeqCst) {
            let request = pb::HeartbeatRequest {
                worker_id: self.id.clone(),
                running: Vec::new(),
                free_slots: 1,
            };
            let reply = self.client.heartbeat(request).await;
            let at = Instant::now();
            self.shared.idle_heartbeats.fetch_add(1, Ordering::Relaxed);
            let reply = match reply {
                Ok(reply) => reply.into_inner(),
                Err(status) => {
                    self.shared
                        .error(format!("worker {}: idle Heartbeat: {status}", self.index));
                    tokio::time::sleep(self.interval).await;
                    continue;
                }
            };
            if reply.reregister {
                self.shared.error(format!(
                    "worker {}: the coordinator asked it to re-register",
                    self.index
                ));
                match register(&mut self.client, self.index).await {
                    Ok(id) => self.id = id,
                    Err(e) => {
                        self.shared.error(format!("worker {}: {e:#}", self.index));
                        tokio::time::sleep(self.interval).await;
                    }
                }
                continue;
            }
            if !reply.cancel.is_empty() {
                self.shared.error(format!(
                    "worker {}: an idle heartbeat was told to cancel {} task(s)",
                    self.index,
                    reply.cancel.len()
                ));
            }
            let mut assignments = reply.assignments.into_iter();
            let Some(assignment) = assignments.next() else {
                continue;
            };
            let extra = assignments.count();
            if extra > 0 {
                self.shared.error(format!(
                    "worker {}: {extra} assignment(s) beyond its one free slot",
                    self.index
                ));
            }
            lock(&self.shared.received).push(Received {
                task: (assignment.job_id.clone(), assignment.task_index),
                epoch: assignment.epoch,
                at,
            });
            self.run_task(&assignment).await;
        }
    }

    /// "Runs" the task: busy heartbeats every interval and once at the end, then the report.
    pub(super) async fn run_task(&mut self, a: &pb::Assignment) {
        let (low, high) = self.task_ms;
        let ms = low + self.rng.next() % (high - low + 1);
        let end = tokio::time::Instant::now() + Duration::from_millis(ms);
        loop {
            let wake = (tokio::time::Instant::now() + self.interval).min(end);
            tokio::time::sleep_until(wake).await;
            let request = pb::HeartbeatRequest {
                worker_id: self.id.clone(),
                running: vec![pb::RunningTask {
                    job_id: a.job_id.clone(),
                    task_index: a.task_index,
                    epoch: a.epoch,
                    events: Vec::new(),
                    checkpoint: None,
                }],
                free_slots: 0,
            };
            self.shared.busy_heartbeats.fetch_add(1, Ordering::Relaxed);
            match self.client.heartbeat(request).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    if reply.reregister || !reply.cancel.is_empty() {
                        self.shared.error(format!(
                            "worker {}: busy heartbeat for {} task {}: reregister {}, cancel {:?}",
                            self.index, a.job_id, a.task_index, reply.reregister, reply.cancel
                        ));
                        return;
                    }
                    if !reply.assignments.is_empty() {
                        self.shared.error(format!(
                            "worker {}: assignment in reply to a heartbeat with no free slot",
                            self.index
                        ));
                    }
                }
                Err(status) => self
                    .shared
                    .error(format!("worker {}: busy Heartbeat: {status}", self.index)),
            }
            if wake >= end {
                break;
            }
        }
        let dir = format!("{}/loadtest/task-{}", a.job_dir, a.task_index);
        let artifact = |name: &str| pb::ArtifactRef {
            uri: format!("{dir}/{name}"),
            checksum: "fnv1a64:0000000000000000".into(),
            bytes: 0,
        };
        let request = pb::ReportTaskRequest {
            worker_id: self.id.clone(),
            job_id: a.job_id.clone(),
            task_index: a.task_index,
            epoch: a.epoch,
            outcome: Some(pb::report_task_request::Outcome::Succeeded(
                pb::TaskSucceeded {
                    artifacts: vec![artifact("state")],
                    result_json: "{}".into(),
                    result: Some(pb::TaskResult::default()),
                    early_exit: false,
                    metrics: Some(artifact("metrics.jsonl")),
                },
            )),
        };
        match self.client.report_task(request).await {
            Ok(_) => {
                let now = Instant::now();
                self.shared.became_ready(&a.job_id, a.task_index + 1, now);
                self.shared.reports.fetch_add(1, Ordering::SeqCst);
                self.shared.progress.notify_waiters();
            }
            Err(status) => self.shared.error(format!(
                "worker {}: ReportTask {} task {}: {status}",
                self.index, a.job_id, a.task_index
            )),
        }
    }
}

pub(super) async fn register(client: &mut ClusterClient, index: usize) -> anyhow::Result<String> {
    let request = pb::RegisterWorkerRequest {
        protocol_version: segprop_proto::PROTOCOL_VERSION,
        name: format!("loadtest-{index:05}"),
        backend: "cpu".into(),
        devices: vec![pb::Device {
            name: "cpu".into(),
            memory_bytes: 0,
        }],
        host_memory_bytes: 0,
        running: Vec::new(),
    };
    let reply = client
        .register_worker(request)
        .await
        .map_err(|s| anyhow::anyhow!("RegisterWorker: {s}"))?;
    Ok(reply.into_inner().worker_id)
}

pub(super) async fn connect(url: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to the coordinator at {url}"))
}
