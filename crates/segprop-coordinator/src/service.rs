//! The coordinator: owns the truth about jobs, tasks and leases, and serves `JobService` (CLI)
//! and `ClusterService` (workers).
//!
//! All decisions are made by the pure functions of [`segprop_core::sched`] under one lock; this
//! module adds the clock, persistence (every transition is written to the state store before the
//! RPC returns, by [`crate::writer`] after the lock is released: nothing slow runs under the
//! lock, neither the durable commit nor the submit pre-flight's corpus reads), worker
//! bookkeeping, progress fan-out to watchers, and the wire conversions.
//!
//! Workers pull: an idle worker's heartbeat waits (long-polls) up to one heartbeat interval for
//! a task to become ready, so a new task reaches a worker within milliseconds, not a heartbeat.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use segprop_core::sched::{
    self, Dispatch, Job, JobId, JobStatus, NewJob, Outcome, SchedConfig, TaskStatus, WorkerId,
};
use segprop_core::{JobSpec, StagePlan};
use segprop_proto::v1 as pb;
use segprop_proto::v1::cluster_service_server::ClusterService;
use segprop_proto::v1::job_service_server::JobService;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::config::CoordConfig;
use crate::convert;
pub use crate::metrics::Counters;
use crate::metrics::WorkerInfo;
use crate::request::{
    Attempt, Heartbeat, HeartbeatReply, Registered, Registration, Rendezvous, Report,
};
use crate::store::StateStore;
use crate::writer::{JobEventMessage, Ticket, Writer};

mod api;
mod gc;
mod rendezvous;
mod reports;
mod workers;

#[cfg(test)]
mod tests;

pub use crate::error::CoordError;
pub use api::Api;

/// A registered worker.
#[derive(Debug, Clone)]
struct Worker {
    name: String,
    backend: sched::Backend,
    devices: u32,
    /// The smallest device's memory (0: not reported, as CUDA workers do not yet).
    device_bytes: u64,
    host_bytes: u64,
    last_seen: u64,
}

struct Inner {
    /// Unfinished jobs, in submission order: the only ones the scheduler looks at.
    jobs: Vec<Job>,
    /// Finished jobs (succeeded, failed, cancelled), for status and listing.
    done: Vec<Job>,
    next_seq: u64,
    workers: HashMap<WorkerId, Worker>,
    next_worker: u64,
    /// Latest progress of each running task, by (job id, task index).
    progress: HashMap<(JobId, u32), pb::Progress>,
    /// Communicator ids published by rank 0 of a gang, by task attempt.
    rendezvous: rendezvous::CommIds,
}

pub struct Coordinator {
    inner: Mutex<Inner>,
    /// Commits transitions to the state store, in order, outside the lock.
    writer: Writer,
    /// The SnapCheck snapshot store (served to workers, garbage-collected here).
    snapshots: segprop_store::Store,
    /// The artifact store (stage states, checkpoints, metrics, models), served to workers.
    artifacts: segprop_store::Store,
    config: CoordConfig,
    sched: SchedConfig,
    /// Distinguishes this process's worker ids from those of an earlier run.
    boot: String,
    events: broadcast::Sender<JobEventMessage>,
    ready: Notify,
    /// Wakes ranks waiting in `rendezvous` when a rank 0 publishes.
    published: Notify,
    counters: Mutex<Counters>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Coordinator {
    /// Opens the state store and reloads every job. Leases of running tasks get a fresh grace
    /// period (one lease) for their workers to re-register.
    pub fn open(config: CoordConfig) -> anyhow::Result<Arc<Self>> {
        let store = StateStore::open(&config.state_dir)?;
        let snapshots = config.open_snapshot_store()?;
        let artifacts = config.open_artifact_store()?;
        let (mut jobs, next_seq) = store.load()?;
        sched::extend_leases(&mut jobs, now_ms(), &config.sched());
        let running: usize = jobs.iter().map(|j| j.running_leases().count()).sum();
        if !jobs.is_empty() {
            tracing::info!(
                jobs = jobs.len(),
                unfinished = jobs.iter().filter(|j| !j.is_terminal()).count(),
                running_tasks = running,
                "reloaded coordinator state"
            );
        }
        let mut boot = [0u8; 3];
        let _ = getrandom::fill(&mut boot);
        let (events, _) = broadcast::channel(4096);
        let writer = Writer::new(store, events.clone());
        Ok(Arc::new(Self {
            inner: Mutex::new(Inner {
                done: jobs.iter().filter(|j| j.is_terminal()).cloned().collect(),
                jobs: jobs.into_iter().filter(|j| !j.is_terminal()).collect(),
                next_seq,
                workers: HashMap::new(),
                next_worker: 1,
                progress: HashMap::new(),
                rendezvous: rendezvous::CommIds::default(),
            }),
            writer,
            snapshots,
            artifacts,
            sched: config.sched(),
            config,
            boot: boot.iter().map(|b| format!("{b:02x}")).collect(),
            events,
            ready: Notify::new(),
            published: Notify::new(),
            counters: Mutex::new(Counters::default()),
        }))
    }

    /// The snapshot store (for the SnapshotService).
    pub fn snapshot_store(&self) -> &segprop_store::Store {
        &self.snapshots
    }

    /// The artifact store (for the SnapshotService's artifacts namespace).
    pub fn artifact_store(&self) -> &segprop_store::Store {
        &self.artifacts
    }

    pub fn counters(&self) -> Counters {
        *self.lock_counters()
    }

    /// The Prometheus exposition of the coordinator's state ([`crate::metrics`]).
    pub fn metrics(&self) -> String {
        let counters = self.counters();
        let inner = self.lock();
        crate::metrics::render(&crate::metrics::State {
            jobs: &inner.jobs,
            done: &inner.done,
            workers: inner
                .workers
                .values()
                .map(|w| WorkerInfo {
                    name: w.name.clone(),
                    backend: w.backend.to_string(),
                    devices: w.devices,
                    last_seen: w.last_seen,
                })
                .collect(),
            progress: &inner.progress,
            counters,
            now_ms: now_ms(),
            snapshot_budget_bytes: self.config.snapshot_budget_bytes,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_counters(&self) -> MutexGuard<'_, Counters> {
        self.counters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues the jobs `ids` for a durable commit, with their new state for watchers (sent
    /// once committed). Called under the lock; the caller waits for the ticket after releasing
    /// it, before replying.
    fn commit(&self, inner: &Inner, ids: &[&str]) -> Result<Ticket, CoordError> {
        if ids.is_empty() {
            return Ok(self.writer.nothing());
        }
        let mut documents = Vec::new();
        let mut events = Vec::new();
        for job in inner
            .jobs
            .iter()
            .chain(&inner.done)
            .filter(|j| ids.contains(&j.id.as_str()))
        {
            let document = crate::store::encode(job)
                .map_err(|e| CoordError::Internal(format!("cannot encode job {}: {e}", job.id)))?;
            documents.push((job.id.to_string(), document));
            events.push(self.job_event(inner, job));
        }
        Ok(self.writer.queue(documents, inner.next_seq, events))
    }

    /// Waits for a transition's commit (outside the lock).
    async fn durable(&self, ticket: Ticket) -> Result<(), CoordError> {
        ticket.wait().await.map_err(CoordError::Persist)
    }

    /// A job's state as watchers see it.
    fn job_event(&self, inner: &Inner, job: &Job) -> JobEventMessage {
        let view = convert::job(job, &inner.progress, &self.config);
        Arc::new((job.id.to_string(), convert::job_event(view)))
    }

    /// Tells watchers a job's state that is already durable (nothing changed).
    fn publish(&self, inner: &Inner, job: &Job) {
        let _ = self.events.send(self.job_event(inner, job));
    }

    /// Wakes up to `n` long-polling idle workers (one per task that became assignable).
    fn wake(&self, n: usize) {
        for _ in 0..n.min(64) {
            self.ready.notify_one();
        }
    }

    /// Expires overdue leases and forgets workers that stopped heartbeating. Runs on a timer.
    pub async fn tick(&self) -> Result<(), CoordError> {
        let (assignable, ticket) = self.tick_locked()?;
        // As after a report: leases of woken workers are committed after this tick's write.
        self.wake(assignable);
        self.durable(ticket).await
    }

    fn tick_locked(&self) -> Result<(usize, Ticket), CoordError> {
        let now = now_ms();
        let mut inner = self.lock();
        let transitions = sched::expire_leases(&mut inner.jobs, now, &self.sched);
        let mut changed = changed_jobs(&transitions);
        for t in &transitions {
            tracing::warn!(?t, "lease expired");
        }
        changed.extend(self.collect_snapshots(&mut inner));
        changed.sort();
        changed.dedup();
        let ids: Vec<&str> = changed.iter().map(JobId::as_str).collect();
        let ticket = self.commit(&inner, &ids)?;
        let timeout = 2 * self.config.lease_ms;
        inner.workers.retain(|id, w| {
            let alive = now.saturating_sub(w.last_seen) <= timeout;
            if !alive {
                tracing::info!(worker = %id, name = %w.name, "worker forgotten (no heartbeat)");
            }
            alive
        });
        let assignable = inner
            .jobs
            .iter()
            .flat_map(|j| &j.tasks)
            .filter(|t| t.status == TaskStatus::Ready && t.not_before <= now)
            .count();
        retire(&mut inner);
        Ok((assignable, ticket))
    }

    /// Validates and creates a job. The job is durable before anyone can see it: it enters
    /// the scheduler's list only once its commit returns.
    pub async fn submit(&self, spec_yaml: &str, source_name: &str) -> Result<pb::Job, CoordError> {
        let source = if source_name.is_empty() {
            "job spec"
        } else {
            source_name
        };
        let spec = JobSpec::from_yaml_str(spec_yaml, source)
            .map_err(|e| CoordError::Spec(e.to_string()))?;
        // The files the spec names are read (a chat corpus is rendered line by line, a
        // checkpoint's config.json parsed) on a blocking thread: heartbeats keep being answered.
        let owned_source = source.to_string();
        let (mut spec, model) = tokio::task::spawn_blocking(move || {
            spec.check_files()
                .map_err(|e| CoordError::Spec(e.with_source(&owned_source, None).to_string()))?;
            let model = spec
                .resolve_model_config()
                .map_err(|e| CoordError::Spec(e.to_string()))?;
            Ok::<_, CoordError>((spec, model))
        })
        .await
        .map_err(|e| CoordError::Internal(format!("checking the job's files: {e}")))??;
        // Depths that do not fit the model (p + r beyond its blocks) have no stage plan.
        spec.validate_against_model(&model)
            .map_err(|e| CoordError::Spec(e.with_source(source, None).to_string()))?;
        let plan = StagePlan::new(&spec, model.num_layers);
        // The pre-flight reads the corpus (batch_size: auto): against a copy of the workers,
        // outside the lock.
        let workers: Vec<Worker> = self.lock().workers.values().cloned().collect();
        let decided = preflight(&mut spec, &model, &plan, &workers)?;
        // A resolved `auto` is stored in the spec the workers receive.
        let spec_yaml = match &decided {
            Some(_) => serde_yaml::to_string(&spec).map_err(|e| {
                CoordError::Internal(format!("cannot encode the resolved spec: {e}"))
            })?,
            None => spec_yaml.to_string(),
        };
        let now = now_ms();
        let backend = spec.resources.backend;
        let (job, ticket) = {
            let mut inner = self.lock();
            let seq = inner.next_seq;
            let id = format!("j{seq}-{}", slug(&spec.name));
            // SnapCheck on a cluster: shards per snapshot depth, one per live worker by default.
            let fanout = (spec.regime == segprop_core::Regime::Segprop && spec.segprop.snapcheck)
                .then(|| {
                    let live = inner
                        .workers
                        .values()
                        .filter(|w| w.backend == backend)
                        .count();
                    sched::SnapshotFanout {
                        shards: match spec.segprop.snapshot_shards {
                            0 => u32::try_from(live.clamp(1, 16)).unwrap_or(1),
                            n => n,
                        },
                        overlap: spec.segprop.snapshot_overlap,
                    }
                });
            let mut job = Job::new(
                NewJob {
                    id: JobId::from(id.clone()),
                    seq,
                    name: spec.name.clone(),
                    regime: spec.regime.to_string(),
                    spec_yaml,
                    backend,
                    devices_per_gang: spec.resources.devices_per_gang as u32,
                    checkpoint_every_steps: spec.checkpoint.every_steps,
                    tasks: sched::plan_tasks(&plan, fanout),
                },
                now,
            );
            job.preflight = decided;
            job.traceparent = segprop_telemetry::trace::traceparent();
            // The number is taken even if the commit fails: ids are never reused.
            inner.next_seq += 1;
            let document = crate::store::encode(&job)
                .map_err(|e| CoordError::Internal(format!("cannot encode job {id}: {e}")))?;
            let event = self.job_event(&inner, &job);
            let ticket = self
                .writer
                .queue(vec![(id, document)], inner.next_seq, vec![event]);
            (job, ticket)
        };
        self.durable(ticket).await?;
        let mut inner = self.lock();
        tracing::info!(job = %job.id, name = %spec.name, regime = %spec.regime, tasks = job.tasks.len(), "job submitted");
        let reply = convert::job(&job, &inner.progress, &self.config);
        // Jobs are scheduled in submission order; commits of concurrent submits may return in
        // any order.
        let at = inner.jobs.partition_point(|j| j.seq < job.seq);
        inner.jobs.insert(at, job);
        drop(inner);
        self.wake(1);
        Ok(reply)
    }

    /// A job as it is now (replied once every transition it shows is durable).
    pub async fn get(&self, job_id: &str) -> Result<pb::Job, CoordError> {
        let (job, barrier) = self.get_locked(job_id)?;
        self.durable(barrier).await?;
        Ok(job)
    }

    fn get_locked(&self, job_id: &str) -> Result<(pb::Job, Ticket), CoordError> {
        let inner = self.lock();
        let job = find(&inner.jobs, job_id).or_else(|_| find(&inner.done, job_id))?;
        Ok((
            convert::job(job, &inner.progress, &self.config),
            self.writer.barrier(),
        ))
    }

    /// Every job, in submission order (replied once every transition it shows is durable).
    pub async fn list(&self) -> Vec<pb::Job> {
        let (jobs, barrier) = self.list_locked();
        // A barrier reads no error.
        let _ = barrier.wait().await;
        jobs
    }

    fn list_locked(&self) -> (Vec<pb::Job>, Ticket) {
        let inner = self.lock();
        let mut jobs: Vec<&Job> = inner.jobs.iter().chain(&inner.done).collect();
        jobs.sort_by_key(|j| j.seq);
        let jobs = jobs
            .into_iter()
            .map(|j| convert::job(j, &inner.progress, &self.config))
            .collect();
        (jobs, self.writer.barrier())
    }

    pub async fn cancel(&self, job_id: &str) -> Result<pb::Job, CoordError> {
        let (reply, ticket) = self.cancel_locked(job_id)?;
        self.durable(ticket).await?;
        Ok(reply)
    }

    fn cancel_locked(&self, job_id: &str) -> Result<(pb::Job, Ticket), CoordError> {
        let now = now_ms();
        let mut inner = self.lock();
        let Ok(index) = position(&inner.jobs, job_id) else {
            // Already finished (cancelling is idempotent), or unknown.
            let job = find(&inner.done, job_id)?;
            let reply = convert::job(job, &inner.progress, &self.config);
            return Ok((reply, self.writer.barrier()));
        };
        let revoked = sched::cancel(&mut inner.jobs[index], now);
        let ticket = if inner.jobs[index].status == JobStatus::Cancelled {
            let mut changed = self.collect_snapshots(&mut inner);
            changed.push(JobId::from(job_id));
            let ids: Vec<&str> = changed.iter().map(JobId::as_str).collect();
            self.commit(&inner, &ids)?
        } else {
            self.publish(&inner, &inner.jobs[index]);
            self.writer.barrier()
        };
        for (task, lease) in &revoked {
            tracing::info!(job = %job_id, task, worker = %lease.worker_id, "task cancelled");
        }
        let reply = convert::job(&inner.jobs[index], &inner.progress, &self.config);
        retire(&mut inner);
        Ok((reply, ticket))
    }

    /// The job now, then its events until it ends.
    pub async fn watch(
        &self,
        job_id: &str,
    ) -> Result<ReceiverStream<Result<pb::JobEvent, Status>>, CoordError> {
        let mut events = self.events.subscribe();
        let first = self.get(job_id).await?;
        let (tx, rx) = mpsc::channel(256);
        let job_id = job_id.to_string();
        let done = convert::is_final(&first);
        tokio::spawn(async move {
            if tx.send(Ok(convert::job_event(first))).await.is_err() || done {
                return;
            }
            loop {
                match events.recv().await {
                    Ok(event) => {
                        let (id, event) = &*event;
                        if *id != job_id {
                            continue;
                        }
                        let end = matches!(&event.event, Some(pb::job_event::Event::Job(j)) if convert::is_final(j));
                        if tx.send(Ok(event.clone())).await.is_err() || end {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(skipped = n, "watcher lagged behind");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }
}

/// Moves finished jobs out of the scheduler's list.
fn retire(inner: &mut Inner) {
    if inner.jobs.iter().any(Job::is_terminal) {
        let (done, active): (Vec<Job>, Vec<Job>) = std::mem::take(&mut inner.jobs)
            .into_iter()
            .partition(Job::is_terminal);
        inner.jobs = active;
        for job in &done {
            inner.progress.retain(|(id, _), _| *id != job.id);
        }
        inner.done.extend(done);
    }
}

fn changed_jobs(transitions: &[sched::Transition]) -> Vec<JobId> {
    let mut ids: Vec<JobId> = transitions
        .iter()
        .map(|t| match t {
            sched::Transition::TaskLeased { job_id, .. }
            | sched::Transition::TaskSucceeded { job_id, .. }
            | sched::Transition::TaskRetry { job_id, .. }
            | sched::Transition::TaskFailed { job_id, .. }
            | sched::Transition::TaskSkipped { job_id, .. }
            | sched::Transition::JobFinished { job_id, .. } => job_id.clone(),
        })
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

fn position(jobs: &[Job], id: &str) -> Result<usize, CoordError> {
    jobs.iter()
        .position(|j| j.id == id)
        .ok_or_else(|| CoordError::NoJob(id.to_string()))
}

fn find<'a>(jobs: &'a [Job], id: &str) -> Result<&'a Job, CoordError> {
    position(jobs, id).map(|i| &jobs[i])
}

fn slug(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    s.trim_matches('-').to_string()
}

fn absolute(path: &std::path::Path) -> String {
    std::path::absolute(path)
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// The submit-time pre-flight check (docs/planner.md): every stage of `spec` must fit the
/// memory of the largest registered worker that could run it; `data.batch_size: auto` and
/// `data.micro_batch: auto` become the batch and the per-stage passes that do
/// ([`segprop_core::planner::preflight::resolve_auto`]). Without such a worker (or one that
/// reports its memory) a fixed batch is not checked (the job waits for a worker; logged) and
/// `auto` is refused. Returns what was decided about `auto`.
fn preflight(
    spec: &mut JobSpec,
    model: &segprop_core::LlamaConfig,
    plan: &StagePlan,
    workers: &[Worker],
) -> Result<Option<String>, CoordError> {
    use segprop_core::planner::preflight::{self, WorkerMemory};
    let backend = spec.resources.backend;
    let gang = spec.resources.devices_per_gang as u32;
    let auto = spec.data.batch_size == segprop_core::BatchSize::Auto
        || spec.data.micro_batch == Some(segprop_core::MicroBatch::Auto);
    let Some(worker) = workers
        .iter()
        .filter(|w| w.backend == backend && w.devices >= gang && w.device_bytes > 0)
        .max_by_key(|w| (w.device_bytes, w.host_bytes))
    else {
        if auto {
            let field = if spec.data.batch_size == segprop_core::BatchSize::Auto {
                "data.batch_size"
            } else {
                "data.micro_batch"
            };
            return Err(CoordError::Spec(format!(
                "{field}: auto is sized against a registered {backend} worker with at least \
                 {gang} device(s) that reports its memory, and none is registered: start one, \
                 or give {field} a number"
            )));
        }
        tracing::info!(job = %spec.name, %backend, gang, "pre-flight skipped: no registered worker reports its memory");
        return Ok(None);
    };
    let memory = WorkerMemory {
        device_bytes: worker.device_bytes,
        host_bytes: worker.host_bytes,
    };
    let note = preflight::resolve_auto(spec, model, plan, &memory, &worker.name)
        .map_err(CoordError::Spec)?;
    if let Some(note) = &note {
        tracing::info!(job = %spec.name, "{note}");
    }
    let fits = preflight::check(spec, model, plan, &memory);
    match preflight::refusal(spec, &fits, &worker.name) {
        Some(message) => {
            tracing::warn!(job = %spec.name, worker = %worker.name, "{message}");
            Err(CoordError::Spec(message))
        }
        None => Ok(note),
    }
}
