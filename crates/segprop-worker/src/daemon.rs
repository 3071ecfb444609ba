//! The worker daemon (`segprop-worker serve`): registers with the coordinator, heartbeats, runs
//! assigned tasks with the training engine on a dedicated thread, writes checkpoints, stage
//! states, metrics and the final model to the artifact store, and reports.
//!
//! Workers pull: every call goes from the worker to the coordinator; the only inbound ports are
//! the optional health and metrics servers (`--health-listen`, `--metrics-listen`). An idle
//! worker's heartbeat long-polls for work; a busy worker heartbeats every interval with its
//! progress events and newest checkpoint. Results carry the lease epoch they were run under; the
//! coordinator refuses results of superseded or expired attempts.
//!
//! Artifact keys in the artifact store (`jobs/<job>/`), each with its `.manifest`
//! ([`segprop_store::artifact`]):
//! - `stages/<stage>/attempt-<epoch>/ckpt-<step>/` (+ `.events.jsonl`): mid-stage checkpoints
//!   (the newest accepted one and the one before it are kept);
//! - `stages/<stage>/attempt-<epoch>/state/` and `metrics.jsonl`: the state after the stage;
//! - `model/`, `metrics.jsonl`, `summary.json`, `summary.txt`, `loss.svg`: written by `export`.
//!
//! A corrupt or missing checkpoint to resume from falls back to the previous checkpoint, then to
//! the stage's input state (the stage restarts); a corrupt input state or metrics file fails the
//! task, naming the artifact and the file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use segprop_core::JobSpec;
use segprop_proto::v1 as pb;
use segprop_proto::v1::cluster_service_client::ClusterServiceClient;
use segprop_store::{SnapshotHeader, Store, StoreConfig};
use segprop_train::checkpoint::{self, Digest};
use segprop_train::engine::{AdamWOptimizer, Checkpointer, StageProgress};
use segprop_train::metrics::{RecordingObserver, StageRecord, TrainEvent, TrainObserver};
use segprop_train::segprop::run_next_stage;
use segprop_train::snapcheck::entry_values;
use segprop_train::{TrainError, Trainer};
use tokio::sync::Notify;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

use crate::artifacts::{self, Artifacts, FetchError};
use crate::snapshots::{self, SnapshotIo, StoreSource};
use crate::telemetry::WorkerMetrics;

/// Command-line options of `serve`.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub coordinator: String,
    pub token: String,
    pub name: String,
    /// Overrides the artifact root the coordinator announces (a store mounted elsewhere).
    pub artifact_root: Option<PathBuf>,
    /// Scratch space (SnapCheck spill files).
    pub work_dir: PathBuf,
    pub backend: String,
    /// CA certificate (PEM) of a TLS coordinator with a private CA.
    pub tls_ca: Option<PathBuf>,
    /// The snapshot store: `None` = a directory `snapshot-store/` under the artifact root,
    /// `grpc` = the coordinator's SnapshotService, else an object store URL (`s3://…`, `file://…`).
    pub snapshot_store: Option<StoreConfig>,
    /// The artifact store: `None` = the artifact root directory, `grpc` = the coordinator's
    /// SnapshotService (artifacts namespace), else an object store URL.
    pub artifact_store: Option<StoreConfig>,
    /// Exit (0) after reporting this many tasks: for preemptible hosts and rolling restarts.
    pub max_tasks: Option<u64>,
    /// Devices offered to gangs: CPU ranks, or GPUs `cuda:0..devices`.
    pub devices: usize,
    /// Memory offered to jobs (the coordinator's pre-flight check); none: the host's, capped
    /// by the container's cgroup limit.
    pub memory_bytes: Option<u64>,
    /// Address of the gRPC health service (none: not served).
    pub health_listen: Option<std::net::SocketAddr>,
    /// Address of `/metrics` and `/healthz` (none: not served).
    pub metrics_listen: Option<std::net::SocketAddr>,
}

type Client = ClusterServiceClient<InterceptedService<Channel, AttachToken>>;

#[derive(Clone)]
struct AttachToken(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for AttachToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        segprop_telemetry::trace::inject(req.metadata_mut());
        Ok(req)
    }
}

/// What the training thread and the heartbeat loop share about the running task.
#[derive(Default)]
struct TaskState {
    events: Vec<pb::Progress>,
    checkpoint: Option<pb::CheckpointRef>,
    /// Newest checkpoint step the coordinator has accepted (checkpoints older than the one
    /// accepted before it are deleted).
    acked_step: u64,
    result: Option<Result<pb::TaskSucceeded, pb::TaskFailed>>,
}

struct TaskHandle {
    assignment: pb::Assignment,
    /// The task's span: parented to the job's trace (the assignment's `traceparent`), entered
    /// by the training thread, and the parent of the task's report to the coordinator.
    span: tracing::Span,
    /// This attempt's key prefix in the artifact store.
    attempt_key: String,
    cancel: Arc<AtomicBool>,
    state: Arc<Mutex<TaskState>>,
}

fn lock(state: &Mutex<TaskState>) -> MutexGuard<'_, TaskState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the daemon until SIGTERM/Ctrl-C (after the running task has checkpointed and reported).
pub async fn serve(options: DaemonOptions) -> anyhow::Result<()> {
    let token = AttachToken(
        format!("Bearer {}", options.token)
            .parse()
            .map_err(|_| anyhow::anyhow!("token: must be printable ASCII"))?,
    );
    let mut endpoint = Endpoint::from_shared(options.coordinator.clone())
        .map_err(|e| anyhow::anyhow!("--coordinator `{}`: {e}", options.coordinator))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(segprop_store::grpc::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(segprop_store::grpc::CONNECTION_WINDOW_BYTES);
    if options.coordinator.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = &options.tls_ca {
            let pem =
                std::fs::read(ca).map_err(|e| anyhow::anyhow!("--tls-ca {}: {e}", ca.display()))?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    let channel = endpoint.connect_lazy();
    let mut client = ClusterServiceClient::with_interceptor(channel.clone(), token);

    // What the worker offers, asked of the driver once: a missing GPU fails here, at start.
    let offered = devices(
        &options.backend,
        options.devices,
        host_memory(options.memory_bytes),
    )?;

    // Health and metrics first: they answer while the coordinator is unreachable, so a
    // coordinator outage does not make probes restart every worker.
    let metrics = Arc::new(memory_probe(
        WorkerMetrics::new(&options.name, &options.backend, &offered),
        &options,
    ));
    if let Some(addr) = options.health_listen {
        segprop_telemetry::health::serve(addr)
            .await
            .map_err(|e| anyhow::anyhow!("--health-listen {addr}: {e}"))?;
    }
    if let Some(addr) = options.metrics_listen {
        let m = metrics.clone();
        segprop_telemetry::metrics::serve(addr, Arc::new(move || m.render()))
            .await
            .map_err(|e| anyhow::anyhow!("--metrics-listen {addr}: {e}"))?;
    }

    let shutdown = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(Notify::new());
    {
        let shutdown = shutdown.clone();
        let wake = wake.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown requested: checkpointing the running task, then exiting");
            shutdown.store(true, Ordering::SeqCst);
            wake.notify_one();
        });
    }

    let mut running: Option<TaskHandle> = None;
    let mut reported = 0u64;
    let (mut worker_id, mut interval, root) =
        register(&mut client, &options, &offered, &running, &shutdown).await?;
    let store = open_store(&options, &root, channel.clone())?;
    let artifact_store = open_artifact_store(&options, &root, channel)?;
    tracing::info!(
        snapshots = store.location(),
        artifacts = artifact_store.location(),
        "stores opened"
    );
    loop {
        if shutdown.load(Ordering::SeqCst) {
            match &running {
                Some(task) => task.cancel.store(true, Ordering::SeqCst),
                None => break,
            }
        }
        // A finished task: one last heartbeat (its final checkpoint), then the report.
        let finished = running
            .as_ref()
            .is_some_and(|t| lock(&t.state).result.is_some());
        let request = heartbeat_request(&worker_id, running.as_ref(), &shutdown);
        for task in &request.running {
            metrics.progress(&task.job_id, &task.events);
        }
        let sent_checkpoint = request
            .running
            .first()
            .and_then(|r| r.checkpoint.as_ref().map(|c| c.step));
        match client.heartbeat(request).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                if reply.reregister {
                    tracing::warn!(
                        "coordinator does not know this worker (restarted?): registering again"
                    );
                    (worker_id, interval, _) =
                        register(&mut client, &options, &offered, &running, &shutdown).await?;
                    continue;
                }
                if let Some(task) = &running {
                    let a = &task.assignment;
                    let cancelled = reply.cancel.iter().any(|c| {
                        c.job_id == a.job_id && c.task_index == a.task_index && c.epoch == a.epoch
                    });
                    if cancelled {
                        tracing::info!(job = %a.job_id, task = a.task_index, "coordinator cancelled the task");
                        task.cancel.store(true, Ordering::SeqCst);
                    } else if let Some(step) = sent_checkpoint {
                        let previous = {
                            let mut state = lock(&task.state);
                            let previous = state.acked_step;
                            state.acked_step = state.acked_step.max(step);
                            (step > previous).then_some(previous)
                        };
                        // Keep the accepted checkpoint and the one before it (a fallback
                        // should the newest be damaged).
                        if let Some(keep_from) = previous.filter(|p| *p > 0) {
                            let (store, prefix) =
                                (artifact_store.clone(), task.attempt_key.clone());
                            tokio::spawn(async move {
                                artifacts::prune_checkpoints(&store, &prefix, keep_from).await;
                            });
                        }
                    }
                }
                for assignment in reply.assignments {
                    if running.is_some() || shutdown.load(Ordering::SeqCst) {
                        tracing::warn!(job = %assignment.job_id, "assignment while busy or stopping: ignored (its lease will expire)");
                        continue;
                    }
                    running = Some(start_task(
                        assignment,
                        &options,
                        store.clone(),
                        artifact_store.clone(),
                        wake.clone(),
                    ));
                }
            }
            Err(status) if status.code() == tonic::Code::Unauthenticated => {
                anyhow::bail!("coordinator refused the token: {}", status.message());
            }
            Err(status) => {
                tracing::warn!(error = %status.message(), "heartbeat failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = wake.notified() => {}
                }
                continue;
            }
        }
        if finished && let Some(task) = running.take() {
            if shutdown.load(Ordering::SeqCst) {
                let mut state = lock(&task.state);
                let step = state.checkpoint.as_ref().map_or(0, |c| c.step);
                if let Some(Err(f)) = &mut state.result {
                    f.reason = format!(
                        "worker {} shut down (SIGTERM); the stage checkpointed at step {step}",
                        options.name
                    );
                    f.retryable = true;
                }
            }
            let span = task.span.clone();
            report(&mut client, &worker_id, task, &metrics)
                .instrument(span)
                .await;
            reported += 1;
            if options.max_tasks.is_some_and(|max| reported >= max) {
                tracing::info!(tasks = reported, "ran --max-tasks tasks: exiting");
                break;
            }
            continue;
        }
        if running.is_some() {
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = wake.notified() => {}
            }
        }
    }
    tracing::info!("worker stopped");
    Ok(())
}

/// The snapshot store this worker reads and writes (see [`DaemonOptions::snapshot_store`]).
fn open_store(options: &DaemonOptions, root: &Path, channel: Channel) -> anyhow::Result<Store> {
    let store = match &options.snapshot_store {
        None => Store::local(root.join("snapshot-store"))
            .map_err(|e| anyhow::anyhow!("snapshot store under {}: {e}", root.display()))?,
        Some(config) if config.url == "grpc" => {
            Store::grpc(channel, Some(options.token.clone()))
                .map_err(|e| anyhow::anyhow!("--snapshot-store grpc: {e}"))?
        }
        Some(config) => Store::open(config)
            .map_err(|e| anyhow::anyhow!("--snapshot-store {}: {e}", config.url))?,
    };
    Ok(store)
}

/// The artifact store this worker reads and writes (see [`DaemonOptions::artifact_store`]).
fn open_artifact_store(
    options: &DaemonOptions,
    root: &Path,
    channel: Channel,
) -> anyhow::Result<Store> {
    let store = match &options.artifact_store {
        None => Store::local(root)
            .map_err(|e| anyhow::anyhow!("artifact store {}: {e}", root.display()))?,
        Some(config) if config.url == "grpc" => Store::grpc_namespace(
            channel,
            Some(options.token.clone()),
            segprop_store::Namespace::Artifacts,
        )
        .map_err(|e| anyhow::anyhow!("--artifact-store grpc: {e}"))?,
        Some(config) => Store::open(config)
            .map_err(|e| anyhow::anyhow!("--artifact-store {}: {e}", config.url))?,
    };
    Ok(store)
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// The devices this worker offers, with their memory (the coordinator's pre-flight check plans
/// against it): GPUs `cuda:0..count` with the total memory the driver reports, or `count` CPU
/// ranks sharing the host's memory.
fn devices(backend: &str, count: usize, host: u64) -> anyhow::Result<Vec<pb::Device>> {
    if backend == "cuda" {
        return cuda_devices(count);
    }
    Ok((0..count)
        .map(|i| pb::Device {
            name: if count == 1 {
                "cpu".into()
            } else {
                format!("cpu:{i}")
            },
            memory_bytes: host / count as u64,
        })
        .collect())
}

#[cfg(feature = "cuda")]
fn cuda_devices(count: usize) -> anyhow::Result<Vec<pb::Device>> {
    let found =
        segprop_train::cuda::devices().map_err(|e| anyhow::anyhow!("--backend cuda: {e}"))?;
    if found.len() < count {
        anyhow::bail!(
            "--devices {count}: this host shows {} CUDA device(s){} (check CUDA_VISIBLE_DEVICES and the pod's nvidia.com/gpu limit)",
            found.len(),
            if found.is_empty() {
                String::new()
            } else {
                format!(
                    ": {}",
                    found
                        .iter()
                        .map(|d| format!("cuda:{} {}", d.ordinal, d.name))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
    }
    for d in &found[..count] {
        tracing::info!(device = d.ordinal, name = %d.name, memory_gib = d.total_bytes as f64 / f64::from(1u32 << 30), "CUDA device");
    }
    Ok(found[..count]
        .iter()
        .map(|d| pb::Device {
            name: format!("cuda:{}", d.ordinal),
            memory_bytes: d.total_bytes,
        })
        .collect())
}

/// On a CUDA worker, `/metrics` also reports each GPU's memory in use.
#[cfg(feature = "cuda")]
fn memory_probe(metrics: WorkerMetrics, options: &DaemonOptions) -> WorkerMetrics {
    if options.backend != "cuda" {
        return metrics;
    }
    match segprop_train::cuda::DeviceMemoryProbe::new(options.devices) {
        Ok(probe) => metrics.with_memory_probe(Box::new(move || {
            probe
                .used_bytes()
                .into_iter()
                .map(|(ordinal, bytes)| (format!("cuda:{ordinal}"), bytes))
                .collect()
        })),
        Err(e) => {
            tracing::warn!(error = %e, "GPU memory in use will not be reported");
            metrics
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn memory_probe(metrics: WorkerMetrics, _options: &DaemonOptions) -> WorkerMetrics {
    metrics
}

#[cfg(not(feature = "cuda"))]
fn cuda_devices(_count: usize) -> anyhow::Result<Vec<pb::Device>> {
    anyhow::bail!("--backend cuda: this worker was built without the `cuda` feature")
}

/// The memory this worker offers: `--memory`, else the host's total, capped by the cgroup
/// (v2 `memory.max`, v1 `memory.limit_in_bytes`) limit of a container.
fn host_memory(configured: Option<u64>) -> u64 {
    if let Some(bytes) = configured {
        return bytes;
    }
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024);
    let limit = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|p| std::fs::read_to_string(p).ok())
    .and_then(|t| t.trim().parse::<u64>().ok());
    match limit {
        Some(limit) if limit > 0 && (total == 0 || limit < total) => limit,
        _ => total,
    }
}

fn running_task(task: &TaskHandle, drain: bool) -> pb::RunningTask {
    let mut state = lock(&task.state);
    pb::RunningTask {
        job_id: task.assignment.job_id.clone(),
        task_index: task.assignment.task_index,
        epoch: task.assignment.epoch,
        events: if drain {
            std::mem::take(&mut state.events)
        } else {
            Vec::new()
        },
        checkpoint: state.checkpoint.clone(),
    }
}

fn heartbeat_request(
    worker_id: &str,
    running: Option<&TaskHandle>,
    shutdown: &AtomicBool,
) -> pb::HeartbeatRequest {
    pb::HeartbeatRequest {
        worker_id: worker_id.to_string(),
        running: running.map(|t| running_task(t, true)).into_iter().collect(),
        free_slots: u32::from(running.is_none() && !shutdown.load(Ordering::SeqCst)),
    }
}

/// Registers (retrying while the coordinator is unreachable); returns (id, heartbeat interval,
/// artifact root).
async fn register(
    client: &mut Client,
    options: &DaemonOptions,
    offered: &[pb::Device],
    running: &Option<TaskHandle>,
    shutdown: &AtomicBool,
) -> anyhow::Result<(String, Duration, PathBuf)> {
    let mut delay = Duration::from_millis(200);
    loop {
        let request = pb::RegisterWorkerRequest {
            protocol_version: segprop_proto::PROTOCOL_VERSION,
            name: options.name.clone(),
            backend: options.backend.clone(),
            devices: offered.to_vec(),
            host_memory_bytes: host_memory(options.memory_bytes),
            running: running.iter().map(|t| running_task(t, false)).collect(),
        };
        match client.register_worker(request).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                let root = options
                    .artifact_root
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(&reply.artifact_root));
                tracing::info!(worker = %reply.worker_id, coordinator = %options.coordinator, artifacts = %root.display(), "registered");
                return Ok((
                    reply.worker_id,
                    Duration::from_millis(u64::from(reply.heartbeat_interval_ms.max(50))),
                    root,
                ));
            }
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unauthenticated
                        | tonic::Code::FailedPrecondition
                        | tonic::Code::InvalidArgument
                ) =>
            {
                anyhow::bail!("coordinator refused registration: {}", status.message());
            }
            Err(status) => {
                if shutdown.load(Ordering::SeqCst) && running.is_none() {
                    anyhow::bail!("stopping before the coordinator was reachable");
                }
                tracing::warn!(error = %status.message(), retry_in_ms = delay.as_millis() as u64, "coordinator unreachable");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn report(client: &mut Client, worker_id: &str, task: TaskHandle, metrics: &WorkerMetrics) {
    let Some(result) = lock(&task.state).result.take() else {
        return;
    };
    metrics.finished(&result);
    let a = &task.assignment;
    let outcome = match result {
        Ok(s) => pb::report_task_request::Outcome::Succeeded(s),
        Err(f) => pb::report_task_request::Outcome::Failed(f),
    };
    let request = pb::ReportTaskRequest {
        worker_id: worker_id.to_string(),
        job_id: a.job_id.clone(),
        task_index: a.task_index,
        epoch: a.epoch,
        outcome: Some(outcome),
    };
    for attempt in 1..=10u32 {
        match client.report_task(request.clone()).await {
            Ok(_) => {
                tracing::info!(job = %a.job_id, task = a.task_index, epoch = a.epoch, "task reported");
                return;
            }
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                tracing::warn!(job = %a.job_id, task = a.task_index, error = %status.message(), "report refused (lease lost); result dropped");
                return;
            }
            Err(status) => {
                tracing::warn!(error = %status.message(), attempt, "report failed; retrying");
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
        }
    }
    tracing::error!(job = %a.job_id, task = a.task_index, "could not report the task; its lease will expire and it will be retried");
}

fn start_task(
    assignment: pb::Assignment,
    options: &DaemonOptions,
    store: Store,
    artifact_store: Store,
    wake: Arc<Notify>,
) -> TaskHandle {
    let attempt_key = format!(
        "{}/stages/{:03}/attempt-{}",
        assignment.job_dir.trim_end_matches('/'),
        assignment.task_index,
        assignment.epoch
    );
    let kind = pb::TaskKind::try_from(assignment.kind)
        .map_or("unknown", |k| k.as_str_name())
        .trim_start_matches("TASK_KIND_")
        .to_ascii_lowercase();
    let span = tracing::info_span!(
        "task",
        otel.name = %format!("task {} {kind}", assignment.task_index),
        job.id = %assignment.job_id,
        task.index = assignment.task_index,
        task.kind = %kind,
        task.epoch = assignment.epoch,
        task.stage_index = assignment.stage_index,
        worker = %options.name,
    );
    segprop_telemetry::trace::set_parent(&span, &assignment.traceparent);
    let handle = TaskHandle {
        span: span.clone(),
        attempt_key: attempt_key.clone(),
        assignment: assignment.clone(),
        cancel: Arc::new(AtomicBool::new(false)),
        state: Arc::new(Mutex::new(TaskState::default())),
    };
    let ctx = TaskContext {
        artifacts: Artifacts {
            store: artifact_store,
            runtime: tokio::runtime::Handle::current(),
        },
        attempt_key,
        work_dir: options.work_dir.join(&assignment.job_id).join(format!(
            "task-{}-epoch-{}",
            assignment.task_index, assignment.epoch
        )),
        backend: options.backend.clone(),
        cancel: handle.cancel.clone(),
        state: handle.state.clone(),
        store,
        runtime: tokio::runtime::Handle::current(),
        snapshot_io: Arc::default(),
        worker_name: options.name.clone(),
    };
    tracing::info!(job = %assignment.job_id, task = assignment.task_index, epoch = assignment.epoch, resume_step = assignment.resume_from.as_ref().map_or(0, |c| c.step), "task starts");
    let name = format!("task-{}-{}", assignment.job_id, assignment.task_index);
    let ctx = Arc::new(ctx);
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        let _entered = span.enter();
        let result = ctx.run(&assignment);
        if let Err(f) = &result {
            tracing::warn!(job = %assignment.job_id, task = assignment.task_index, reason = %f.reason, retryable = f.retryable, "task failed");
        }
        let _ = std::fs::remove_dir_all(&ctx.work_dir);
        lock(&ctx.state).result = Some(result);
        wake.notify_one();
    });
    if let Err(e) = spawned {
        lock(&handle.state).result = Some(Err(pb::TaskFailed {
            reason: format!("cannot start the training thread: {e}"),
            retryable: true,
        }));
    }
    handle
}

/// Everything the training thread needs.
struct TaskContext {
    artifacts: Artifacts,
    /// This attempt's key prefix in the artifact store.
    attempt_key: String,
    work_dir: PathBuf,
    backend: String,
    cancel: Arc<AtomicBool>,
    state: Arc<Mutex<TaskState>>,
    store: Store,
    runtime: tokio::runtime::Handle,
    snapshot_io: Arc<Mutex<SnapshotIo>>,
    /// This worker's name, recorded in task results.
    worker_name: String,
}

fn failed(err: &TrainError) -> pb::TaskFailed {
    let retryable = !matches!(
        err,
        TrainError::Spec(_)
            | TrainError::Corpus { .. }
            | TrainError::Checkpoint(_)
            | TrainError::NonFiniteLoss { .. }
            | TrainError::State { .. }
    );
    pb::TaskFailed {
        reason: err.to_string(),
        retryable,
    }
}

/// A task failure about an artifact that could not be stored or fetched.
fn artifact_failed(reason: String, retryable: bool) -> pb::TaskFailed {
    pb::TaskFailed { reason, retryable }
}

impl TaskContext {
    fn run(self: &Arc<Self>, a: &pb::Assignment) -> Result<pb::TaskSucceeded, pb::TaskFailed> {
        let spec = JobSpec::from_yaml_str(&a.spec_yaml, &format!("job {}", a.job_id))
            .map_err(|e| failed(&TrainError::Spec(e)))?;
        match self.backend.as_str() {
            "cpu" => self.run_on::<segprop_train::CpuBackend>(spec, Default::default(), a),
            #[cfg(feature = "cuda")]
            "cuda" => {
                if !segprop_train::cuda::cuda_available() {
                    return Err(failed(&TrainError::NoDevice {
                        backend: "cuda".into(),
                    }));
                }
                self.run_on::<segprop_train::cuda::CudaBackend>(spec, burn_cuda_device(), a)
            }
            other => Err(pb::TaskFailed {
                reason: format!("backend {other} is not built into this worker"),
                retryable: false,
            }),
        }
    }

    fn run_on<B: burn::tensor::backend::AutodiffBackend>(
        self: &Arc<Self>,
        spec: JobSpec,
        device: B::Device,
        a: &pb::Assignment,
    ) -> Result<pb::TaskSucceeded, pb::TaskFailed> {
        let mut trainer =
            Trainer::<B>::new(spec, device.clone(), &self.work_dir).map_err(|e| failed(&e))?;
        let mut recorder = RecordingObserver::default();
        let (recovered, loaded) = self.restore(&mut trainer, &mut recorder, a)?;
        let kind = pb::TaskKind::try_from(a.kind);
        self.prepare(&mut trainer, a);
        match kind {
            Ok(pb::TaskKind::TrainStage) => match segprop_train::gang::gang_size(&trainer.spec) {
                None => self.train_stage(trainer, recorder, a, recovered),
                Some(world) => {
                    self.train_stage_gang(trainer, recorder, a, recovered, loaded, device, world)
                }
            },
            Ok(pb::TaskKind::AdvanceSnapshots) => self.advance(trainer, a),
            Ok(pb::TaskKind::Export) => self.export(trainer, a),
            _ => Err(pb::TaskFailed {
                reason: format!("unknown task kind {}", a.kind),
                retryable: false,
            }),
        }
    }

    /// Task settings every rank's trainer takes: SnapCheck reads the stored snapshots of the
    /// committed prefix instead of recomputing it, and commits drop snapshots instead of
    /// advancing them (advance tasks do that).
    fn prepare<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        trainer: &mut Trainer<B>,
        a: &pb::Assignment,
    ) {
        trainer.advance_in_place = false;
        if a.snapshot_depth > 0
            && a.snapshot_shards > 0
            && pb::TaskKind::try_from(a.kind) != Ok(pb::TaskKind::Export)
            && trainer.cache.is_some()
        {
            let source = self.snapshot_source(trainer, a, a.snapshot_depth);
            if let Some(cache) = trainer.cache.as_mut() {
                cache.set_source(Box::new(source));
            }
            tracing::info!(
                depth = a.snapshot_depth,
                shards = a.snapshot_shards,
                complete = a.snapshots_complete,
                "reading snapshots from the store"
            );
        }
    }

    /// Runs a training stage on a gang of `world` ranks in this process (one per device, or CPU
    /// ranks as threads): rank 0 is `trainer`, which reports and checkpoints; every other rank
    /// loads the same starting point (`loaded`) into a trainer of its own. A rank that stops
    /// answering fails every rank's next collective within `sharding.collective_timeout_s`,
    /// naming it, and the task fails retryably: the coordinator retries the stage from its last
    /// checkpoint.
    #[allow(clippy::too_many_arguments)]
    fn train_stage_gang<B: burn::tensor::backend::AutodiffBackend>(
        self: &Arc<Self>,
        mut trainer: Trainer<B>,
        recorder: RecordingObserver,
        a: &pb::Assignment,
        recovered: Option<String>,
        loaded: Option<PathBuf>,
        device: B::Device,
        world: usize,
    ) -> Result<pb::TaskSucceeded, pb::TaskFailed> {
        self.check_stage(&trainer, a)?;
        let spec = trainer.spec.clone();
        let devices = segprop_train::gang::gang_devices::<B>(&device, world);
        tracing::info!(
            ranks = world,
            activation_checkpointing = spec.activation_checkpointing,
            prefetch = spec.sharding.prefetch,
            deadline_s = spec.sharding.collective_timeout_s,
            "sharded stage: one trainer per rank"
        );
        let fault = crate::fault::StallRank::from_env();
        let group =
            segprop_train::gang::gang_group::<B>(&spec, &devices).map_err(|e| failed(&e))?;
        let ran = segprop_train::gang::run_gang(
            group,
            segprop_train::gang::collective_deadline(&spec),
            segprop_train::sharded::ShardOptions::of(&spec),
            |shard| {
                trainer.shard = Some(shard);
                let (record, recorder) = self.run_stage(&mut trainer, recorder, a)?;
                trainer.shard = None;
                Ok((trainer, record, recorder))
            },
            {
                let ctx = self.clone();
                let a = a.clone();
                Arc::new(move |shard: segprop_train::sharded::ShardRank| {
                    let rank = shard.rank();
                    let mut follower = Trainer::<B>::new(
                        spec.clone(),
                        devices[rank].clone(),
                        &ctx.work_dir.join(format!("rank{rank}")),
                    )?;
                    if let Some(dir) = &loaded {
                        checkpoint::load(&mut follower, dir, None)?;
                    }
                    ctx.prepare(&mut follower, &a);
                    follower.shard = Some(shard);
                    follower.checkpointer = Some(Box::new(FollowerCheckpointer {
                        every: a.checkpoint_every_steps,
                    }));
                    let mut observer = FollowerObserver {
                        cancel: ctx.cancel.clone(),
                        fault: fault.clone().filter(|f| f.rank == rank),
                        steps: 0,
                    };
                    run_next_stage(&mut follower, &mut observer)?;
                    Ok(())
                })
            },
        );
        let (trainer, record, recorder) = ran.map_err(|e| {
            // Releases a follower still stalled by the fault injection (it watches the flag).
            self.cancel.store(true, Ordering::SeqCst);
            failed(&e)
        })?;
        self.publish(trainer, record, recorder, a, recovered)
    }

    /// Loads the task's starting point: the checkpoint to resume from or the stage's input
    /// state. A damaged or missing checkpoint falls back to the one before it, then to the input
    /// state (the stage restarts; training is deterministic, so the result is the same); the
    /// returned note says so. A damaged input state fails the task: it has no earlier version.
    fn restore<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        trainer: &mut Trainer<B>,
        recorder: &mut RecordingObserver,
        a: &pb::Assignment,
    ) -> Result<(Option<String>, Option<PathBuf>), pb::TaskFailed> {
        let mut recovered = None;
        let checkpoint_dir = self.work_dir.join("in/checkpoint");
        if let Some(resume) = a.resume_from.as_ref().and_then(|c| c.artifact.as_ref()) {
            let damage = match self.load_checkpoint(
                trainer,
                recorder,
                &resume.uri,
                Some(&resume.checksum),
            ) {
                Ok(()) => {
                    tracing::info!(checkpoint = %resume.uri, "resuming from checkpoint");
                    return Ok((None, Some(checkpoint_dir)));
                }
                Err(FetchError::Unavailable(m)) => return Err(artifact_failed(m, true)),
                Err(FetchError::Corrupt(m)) => m,
            };
            tracing::warn!(checkpoint = %resume.uri, error = %damage, "the checkpoint to resume from is damaged: falling back to an earlier one");
            let prefix = resume.uri.rsplit_once('/').map_or("", |(p, _)| p);
            let newest = artifacts::checkpoint_step(&resume.uri).unwrap_or(u64::MAX);
            let older = self
                .artifacts
                .checkpoints(prefix)
                .map_err(|m| artifact_failed(m, true))?;
            for (step, key) in older.into_iter().filter(|(s, _)| *s < newest) {
                match self.load_checkpoint(trainer, recorder, &key, None) {
                    Ok(()) => {
                        let note = format!(
                            "checkpoint {} is damaged ({damage}); resumed from step {step} ({key})",
                            resume.uri
                        );
                        tracing::warn!("{note}");
                        return Ok((Some(note), Some(checkpoint_dir)));
                    }
                    Err(e) => {
                        tracing::warn!(checkpoint = %key, error = %e, "earlier checkpoint unusable too")
                    }
                }
            }
            *recorder = RecordingObserver::default();
            let note = format!(
                "checkpoint {} is damaged ({damage}) and no earlier one is usable; the stage \
                 restarted from its input state",
                resume.uri
            );
            tracing::warn!("{note}");
            recovered = Some(note);
        }
        if let Some(input) = &a.input_state {
            let dir = self.work_dir.join("in/state");
            self.artifacts
                .fetch(&input.uri, Some(&input.checksum), &dir)
                .map_err(|e| match e {
                    FetchError::Corrupt(m) => artifact_failed(
                        format!(
                            "input state is damaged and has no earlier version: {m}; \
                             resubmit the job (or restore the artifact store from a backup)"
                        ),
                        false,
                    ),
                    FetchError::Unavailable(m) => artifact_failed(m, true),
                })?;
            checkpoint::load(trainer, &dir, None).map_err(|e| failed(&e))?;
            return Ok((recovered, Some(dir)));
        }
        Ok((recovered, None))
    }

    /// Fetches the checkpoint `key` and its events and loads both.
    fn load_checkpoint<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        trainer: &mut Trainer<B>,
        recorder: &mut RecordingObserver,
        key: &str,
        expected: Option<&str>,
    ) -> Result<(), FetchError> {
        let dir = self.work_dir.join("in/checkpoint");
        self.artifacts.fetch(key, expected, &dir)?;
        let events = events_path(&dir);
        self.artifacts
            .fetch(&format!("{key}.events.jsonl"), None, &events)?;
        let loaded = read_events(&events).map_err(|e| FetchError::Corrupt(e.to_string()))?;
        checkpoint::load(trainer, &dir, None).map_err(|e| FetchError::Corrupt(e.to_string()))?;
        recorder.events = loaded;
        Ok(())
    }

    fn train_stage<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        mut trainer: Trainer<B>,
        recorder: RecordingObserver,
        a: &pb::Assignment,
        recovered: Option<String>,
    ) -> Result<pb::TaskSucceeded, pb::TaskFailed> {
        self.check_stage(&trainer, a)?;
        let (record, recorder) = self
            .run_stage(&mut trainer, recorder, a)
            .map_err(|e| failed(&e))?;
        self.publish(trainer, record, recorder, a, recovered)
    }

    /// Whether the loaded state is where the task starts.
    fn check_stage<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        trainer: &Trainer<B>,
        a: &pb::Assignment,
    ) -> Result<(), pb::TaskFailed> {
        if segprop_train::segprop::plan_done(trainer) {
            return Err(pb::TaskFailed {
                reason: "the plan was already complete".into(),
                retryable: false,
            });
        }
        if trainer.progress.next_stage != a.stage_index as usize {
            return Err(pb::TaskFailed {
                reason: format!(
                    "the input state is at stage {}, the task is stage {}",
                    trainer.progress.next_stage, a.stage_index
                ),
                retryable: false,
            });
        }
        Ok(())
    }

    /// Trains the task's stage with checkpoints to the store and progress to the heartbeat.
    fn run_stage<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        trainer: &mut Trainer<B>,
        recorder: RecordingObserver,
        a: &pb::Assignment,
    ) -> Result<(StageRecord, RecordingObserver), TrainError> {
        let recorder = Arc::new(Mutex::new(recorder));
        trainer.checkpointer = Some(Box::new(StoreCheckpointer {
            artifacts: self.artifacts.clone(),
            attempt_key: self.attempt_key.clone(),
            local_dir: self.work_dir.join("checkpoints"),
            every: a.checkpoint_every_steps,
            recorder: recorder.clone(),
            state: self.state.clone(),
        }));
        let mut observer = DaemonObserver {
            stage_index: a.task_index,
            recorder: recorder.clone(),
            state: self.state.clone(),
            cancel: self.cancel.clone(),
        };
        let record = run_next_stage(trainer, &mut observer);
        trainer.checkpointer = None;
        drop(observer);
        let record = record?.ok_or_else(|| TrainError::State {
            path: PathBuf::from(&self.attempt_key),
            message: "the plan was already complete".into(),
        })?;
        let recorder = Arc::try_unwrap(recorder)
            .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
            .unwrap_or_else(|shared| RecordingObserver {
                events: lock_recorder(&shared).events.clone(),
            });
        Ok((record, recorder))
    }

    /// Stores the stage's output state and metrics and builds the task's result.
    fn publish<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        trainer: Trainer<B>,
        record: StageRecord,
        recorder: RecordingObserver,
        a: &pb::Assignment,
        recovered: Option<String>,
    ) -> Result<pb::TaskSucceeded, pb::TaskFailed> {
        let out = self.work_dir.join("out");
        let state_local = out.join("state");
        let digest = checkpoint::save(&trainer, None, &state_local).map_err(|e| failed(&e))?;
        let state = self
            .artifacts
            .put(
                &format!("{}/state", self.attempt_key),
                &state_local,
                &digest,
            )
            .map_err(|m| artifact_failed(m, true))?;
        let metrics_local = out.join("metrics.jsonl");
        let digest = write_events(&metrics_local, &recorder.events).map_err(|e| failed(&e))?;
        let metrics = self
            .artifacts
            .put(
                &format!("{}/metrics.jsonl", self.attempt_key),
                &metrics_local,
                &digest,
            )
            .map_err(|m| artifact_failed(m, true))?;
        let mut result = serde_json::to_value(&record).unwrap_or_default();
        if let Some(map) = result.as_object_mut() {
            if let Some(note) = recovered {
                map.insert("recovered".into(), note.into());
            }
            if trainer.cache.is_some() {
                let batches: Vec<_> = trainer
                    .snapshot_batches()
                    .iter()
                    .map(|(split, b)| (*split, b.id, b.batch * b.seq))
                    .collect();
                let bytes = snapshots::depth_bytes_estimate(
                    &batches,
                    trainer.config.hidden_size,
                    snapshots::storage_dtype(trainer.spec.segprop.snapshot_dtype),
                    a.snapshot_shards.max(1),
                    snapshots::batches_per_blob(&trainer.spec, trainer.config.hidden_size),
                );
                map.insert("snapshot_depth_bytes".into(), bytes.into());
            }
            let io = self
                .snapshot_io
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            map.insert(
                "snapshot_io".into(),
                serde_json::to_value(io).unwrap_or_default(),
            );
            map.insert("worker".into(), self.worker_name.clone().into());
        }
        Ok(pb::TaskSucceeded {
            artifacts: vec![state],
            result_json: result.to_string(),
            early_exit: trainer.progress.early_exit.is_some(),
            metrics: Some(metrics),
        })
    }

    /// The blob layout of the job's snapshots and a store reader for `S[depth]`.
    fn snapshot_source<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        trainer: &Trainer<B>,
        a: &pb::Assignment,
        depth: u32,
    ) -> StoreSource {
        StoreSource::new(
            self.store.clone(),
            self.runtime.clone(),
            a.job_dir.clone(),
            SnapshotHeader {
                job: a.job_id.clone(),
                depth,
                fingerprint: a.snapshot_in_fingerprint.clone(),
                dtype: snapshots::storage_dtype(trainer.spec.segprop.snapshot_dtype),
            },
            self.blob_plan(trainer, a),
            a.snapshots_complete,
            self.snapshot_io.clone(),
            self.cancel.clone(),
        )
    }

    fn blob_plan<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        trainer: &Trainer<B>,
        a: &pb::Assignment,
    ) -> Vec<snapshots::BlobPlan> {
        let ids: Vec<_> = trainer
            .snapshot_batches()
            .iter()
            .map(|(split, b)| (*split, b.id))
            .collect();
        let per_blob = snapshots::batches_per_blob(&trainer.spec, trainer.config.hidden_size);
        snapshots::blob_plan(&ids, a.snapshot_shards, per_blob)
    }

    /// One shard of SnapCheck's advance step: `S[to] = F_{from:to}(S[from])` for this shard's
    /// batches (`from = 0`: the full prefix forward after stage 1), stored blob by blob.
    fn advance<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        mut trainer: Trainer<B>,
        a: &pb::Assignment,
    ) -> Result<pb::TaskSucceeded, pb::TaskFailed> {
        let (from, to) = (a.snapshot_from as usize, a.snapshot_to as usize);
        if trainer.committed_depth < to {
            return Err(pb::TaskFailed {
                reason: format!(
                    "the input state has committed depth {}, the task needs {to}",
                    trainer.committed_depth
                ),
                retryable: false,
            });
        }
        if trainer.cache.is_none() {
            return Err(pb::TaskFailed {
                reason: "advance_snapshots for a job without SnapCheck".into(),
                retryable: false,
            });
        }
        let header = SnapshotHeader {
            job: a.job_id.clone(),
            depth: a.snapshot_to,
            fingerprint: a.snapshot_out_fingerprint.clone(),
            dtype: snapshots::storage_dtype(trainer.spec.segprop.snapshot_dtype),
        };
        let batches: std::collections::HashMap<_, _> = trainer
            .snapshot_batches()
            .into_iter()
            .map(|(split, b)| ((split, b.id), b))
            .collect();
        let mine: Vec<_> = self
            .blob_plan(&trainer, a)
            .into_iter()
            .filter(|b| b.shard == a.snapshot_shard)
            .collect();
        let (mut advanced, mut recomputed, mut written) = (0u64, 0u64, 0u64);
        for blob in &mine {
            if self.cancel.load(Ordering::SeqCst) {
                return Err(pb::TaskFailed {
                    reason: "cancelled".into(),
                    retryable: true,
                });
            }
            let mut entries = Vec::with_capacity(blob.ids.len());
            for id in &blob.ids {
                let batch = batches
                    .get(&(blob.split, *id))
                    .ok_or_else(|| pb::TaskFailed {
                        reason: format!("snapshot layout names batch {id}, which the data lacks"),
                        retryable: false,
                    })?;
                let (out, was_advanced) = trainer.advance_batch(from, to, blob.split, batch);
                if was_advanced {
                    advanced += 1;
                } else {
                    recomputed += 1;
                }
                let values = entry_values(
                    segprop_train::snapcheck::SnapshotKey {
                        depth: to,
                        split: blob.split,
                        id: *id,
                    },
                    out,
                );
                entries.push(segprop_store::SnapshotEntry {
                    split: snapshots::store_split(blob.split),
                    id: *id as u64,
                    shape: values.dims.to_vec(),
                    data: values.values,
                });
            }
            let key = snapshots::blob_key(&a.job_dir, a.snapshot_to, blob);
            let bytes =
                segprop_store::encode_snapshot(&header, &entries).map_err(|e| pb::TaskFailed {
                    reason: format!("cannot encode snapshot blob {key}: {e}"),
                    retryable: false,
                })?;
            let len = bytes.len() as u64;
            self.runtime
                .block_on(self.store.put(&key, bytes.into()))
                .map_err(|e| pb::TaskFailed {
                    reason: format!("cannot store snapshot blob {key}: {e}"),
                    retryable: true,
                })?;
            written += blob.ids.len() as u64;
            {
                let mut io = self.snapshot_io.lock().unwrap_or_else(|e| e.into_inner());
                io.blobs_written += 1;
                io.bytes_written += len;
            }
            // The blob of S[from] this one came from is no longer needed here.
            if let Some(cache) = trainer.cache.as_mut() {
                cache.drop_depth(from);
            }
        }
        let io = self
            .snapshot_io
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        tracing::info!(
            depth = to,
            shard = a.snapshot_shard,
            shards = a.snapshot_shards,
            blobs = mine.len(),
            batches = written,
            advanced,
            recomputed,
            bytes = io.bytes_written,
            "snapshots stored"
        );
        let prefix = segprop_store::depth_prefix(&a.job_dir, a.snapshot_to);
        Ok(pb::TaskSucceeded {
            artifacts: vec![pb::ArtifactRef {
                uri: prefix,
                checksum: String::new(),
                bytes: io.bytes_written,
            }],
            result_json: serde_json::json!({
                "depth": to,
                "shard": a.snapshot_shard,
                "shards": a.snapshot_shards,
                "batches": written,
                "advanced": advanced,
                "recomputed": recomputed,
                "snapshot_io": io,
                "worker": self.worker_name,
            })
            .to_string(),
            early_exit: false,
            metrics: None,
        })
    }

    fn export<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        mut trainer: Trainer<B>,
        a: &pb::Assignment,
    ) -> Result<pb::TaskSucceeded, pb::TaskFailed> {
        let mut recorder = RecordingObserver::default();
        for (i, m) in a.stage_metrics.iter().enumerate() {
            let path = self.work_dir.join(format!("in/metrics-{i:03}.jsonl"));
            self.artifacts
                .fetch(&m.uri, Some(&m.checksum), &path)
                .map_err(|e| match e {
                    FetchError::Corrupt(m) => {
                        artifact_failed(format!("stage metrics are damaged: {m}"), false)
                    }
                    FetchError::Unavailable(m) => artifact_failed(m, true),
                })?;
            recorder
                .events
                .extend(read_events(&path).map_err(|e| failed(&e))?);
        }
        let out = self.work_dir.join("export");
        let wall_s: f64 = trainer.progress.records.iter().map(|r| r.wall_s).sum();
        let summary = segprop_train::run::finish_run(
            &mut trainer,
            &out,
            &recorder,
            wall_s,
            Some(5_000_000_000),
        )
        .map_err(|e| failed(&e))?;
        let mut events = recorder.events;
        events.push(TrainEvent::RunFinished(summary.clone()));
        write_events(&out.join("metrics.jsonl"), &events).map_err(|e| failed(&e))?;
        // Everything finish_run wrote (model/, summary.json, summary.txt, loss.svg) and the
        // job's metrics, each as its own artifact under the job's key.
        let mut names: Vec<_> = std::fs::read_dir(&out)
            .map_err(TrainError::io(&out))
            .map_err(|e| failed(&e))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let job_key = a.job_dir.trim_end_matches('/');
        let (mut model, mut metrics) = (None, None);
        for name in names {
            let local = out.join(&name);
            let digest = checkpoint::checksum_dir(&local).map_err(|e| failed(&e))?;
            let stored = self
                .artifacts
                .put(&format!("{job_key}/{name}"), &local, &digest)
                .map_err(|m| artifact_failed(m, true))?;
            match name.as_str() {
                "model" => model = Some(stored),
                "metrics.jsonl" => metrics = Some(stored),
                _ => {}
            }
        }
        let model = model.ok_or_else(|| artifact_failed("export wrote no model".into(), false))?;
        tracing::info!(model = %model.uri, store = self.artifacts.store.location(), eval_loss = summary.final_eval_loss, "model exported");
        Ok(pb::TaskSucceeded {
            artifacts: vec![model],
            result_json: serde_json::to_string(&summary).unwrap_or_default(),
            early_exit: false,
            metrics,
        })
    }
}

#[cfg(feature = "cuda")]
fn burn_cuda_device() -> burn::backend::cuda::CudaDevice {
    burn::backend::cuda::CudaDevice::new(0)
}

fn lock_recorder(r: &Mutex<RecordingObserver>) -> MutexGuard<'_, RecordingObserver> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

fn events_path(checkpoint_dir: &Path) -> PathBuf {
    let mut name = checkpoint_dir
        .file_name()
        .unwrap_or_default()
        .to_os_string();
    name.push(".events.jsonl");
    checkpoint_dir.with_file_name(name)
}

fn write_events(path: &Path, events: &[TrainEvent]) -> Result<Digest, TrainError> {
    let mut text = String::new();
    for e in events {
        text.push_str(&serde_json::to_string(e).unwrap_or_default());
        text.push('\n');
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(TrainError::io(parent))?;
    }
    let tmp = path.with_extension("jsonl.partial");
    std::fs::write(&tmp, &text).map_err(TrainError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(TrainError::io(path))?;
    checkpoint::checksum_dir(path)
}

fn read_events(path: &Path) -> Result<Vec<TrainEvent>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| TrainError::State {
                path: path.to_path_buf(),
                message: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

/// Streams engine events to the heartbeat loop and keeps them for the stage's metrics file.
struct DaemonObserver {
    stage_index: u32,
    recorder: Arc<Mutex<RecordingObserver>>,
    state: Arc<Mutex<TaskState>>,
    cancel: Arc<AtomicBool>,
}

impl TrainObserver for DaemonObserver {
    fn on_event(&mut self, event: &TrainEvent) {
        lock_recorder(&self.recorder).on_event(event);
        let progress = match event {
            TrainEvent::Step(s) => pb::Progress {
                task_index: self.stage_index,
                stage: s.stage.clone(),
                step: s.step,
                budget_steps: 0,
                global_step: s.global_step,
                loss: s.loss,
                lr: s.lr,
                eval_loss: None,
                tokens_per_s: s.tokens_per_s,
            },
            TrainEvent::Eval(e) => pb::Progress {
                task_index: self.stage_index,
                stage: e.stage.clone(),
                step: e.step,
                budget_steps: 0,
                global_step: e.global_step,
                loss: f64::NAN,
                lr: 0.0,
                eval_loss: Some(e.eval_loss),
                tokens_per_s: 0.0,
            },
            _ => return,
        };
        let budget = lock_recorder(&self.recorder)
            .events
            .iter()
            .rev()
            .find_map(|e| match e {
                TrainEvent::StageStarted { budget_steps, .. } => Some(*budget_steps),
                _ => None,
            })
            .unwrap_or(0);
        let mut state = lock(&self.state);
        state.events.push(pb::Progress {
            budget_steps: budget,
            ..progress
        });
        // A heartbeat that cannot get through must not grow memory without bound.
        if state.events.len() > 10_000 {
            state.events.drain(..5_000);
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// The observer of a follower rank: reports nothing (rank 0 reports for the gang), shares the
/// task's cancel flag, and carries the fault injected for tests, if any.
struct FollowerObserver {
    cancel: Arc<AtomicBool>,
    fault: Option<crate::fault::StallRank>,
    steps: u64,
}

impl TrainObserver for FollowerObserver {
    fn on_event(&mut self, event: &TrainEvent) {
        if let TrainEvent::Step(_) = event {
            self.steps += 1;
            if let Some(fault) = &self.fault {
                fault.maybe_stall(self.steps, &self.cancel);
            }
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// A follower rank takes part in every checkpoint's gathers at the leader's interval, and
/// writes nothing (rank 0 writes the gang's checkpoint).
struct FollowerCheckpointer {
    every: u64,
}

impl<B: burn::tensor::backend::AutodiffBackend> Checkpointer<B> for FollowerCheckpointer {
    fn every_steps(&self) -> u64 {
        self.every
    }

    fn save(
        &mut self,
        _trainer: &Trainer<B>,
        _local_optimizer: &AdamWOptimizer<B>,
        _progress: &StageProgress,
    ) -> Result<(), TrainError> {
        Ok(())
    }
}

/// Writes mid-stage checkpoints to the artifact store and hands the newest to the heartbeat loop.
struct StoreCheckpointer {
    artifacts: Artifacts,
    attempt_key: String,
    /// Where a checkpoint is written before it is stored.
    local_dir: PathBuf,
    every: u64,
    recorder: Arc<Mutex<RecordingObserver>>,
    state: Arc<Mutex<TaskState>>,
}

impl<B: burn::tensor::backend::AutodiffBackend> Checkpointer<B> for StoreCheckpointer {
    fn every_steps(&self) -> u64 {
        self.every
    }

    fn save(
        &mut self,
        trainer: &Trainer<B>,
        local_optimizer: &AdamWOptimizer<B>,
        progress: &StageProgress,
    ) -> Result<(), TrainError> {
        let name = format!("ckpt-{:08}", progress.step);
        let key = format!("{}/{name}", self.attempt_key);
        let dir = self.local_dir.join(&name);
        let events_file = events_path(&dir);
        let events = lock_recorder(&self.recorder).events.clone();
        let events_digest = write_events(&events_file, &events)?;
        let digest = checkpoint::save(trainer, Some((local_optimizer, progress)), &dir)?;
        let store_error = |m: String| TrainError::Io {
            path: PathBuf::from(&key),
            source: std::io::Error::other(m),
        };
        // Events first: a checkpoint that exists always has its events.
        self.artifacts
            .put(&format!("{key}.events.jsonl"), &events_file, &events_digest)
            .map_err(store_error)?;
        let stored = self
            .artifacts
            .put(&key, &dir, &digest)
            .map_err(store_error)?;
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_file(&events_file);
        tracing::debug!(step = progress.step, checkpoint = %key, "checkpoint stored");
        lock(&self.state).checkpoint = Some(pb::CheckpointRef {
            step: progress.step,
            artifact: Some(stored),
        });
        Ok(())
    }
}
