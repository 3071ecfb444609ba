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
//! Running one assignment (training a stage, advancing snapshots, exporting) is [`crate::task`].

use segprop_core::sched::{Attempt, Dispatch};
use segprop_core::spec::Backend;
use segprop_telemetry::outgoing::AttachToken;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use segprop_proto::v1 as pb;
use segprop_proto::v1::cluster_service_client::ClusterServiceClient;
use segprop_store::{Store, StoreConfig};
use tokio::sync::Notify;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tracing::Instrument;

use crate::artifacts::{self, Artifacts};
use crate::error::TaskError;
use crate::observe::{TaskState, lock};
use crate::task::TaskContext;
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
    pub backend: Backend,
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

struct TaskHandle {
    task: Attempt,
    /// The task's span: parented to the job's trace (the assignment's `traceparent`), entered
    /// by the training thread, and the parent of the task's report to the coordinator.
    span: tracing::Span,
    /// This attempt's key prefix in the artifact store.
    attempt_key: String,
    cancel: Arc<AtomicBool>,
    state: Arc<Mutex<TaskState>>,
}

/// Runs the daemon until SIGTERM/Ctrl-C (after the running task has checkpointed and reported).
pub async fn serve(options: DaemonOptions) -> anyhow::Result<()> {
    let token = AttachToken::new(&options.token).map_err(anyhow::Error::msg)?;
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
        options.backend,
        options.devices,
        host_memory(options.memory_bytes),
    )?;

    // Health and metrics first: they answer while the coordinator is unreachable, so a
    // coordinator outage does not make probes restart every worker.
    let metrics = Arc::new(memory_probe(
        WorkerMetrics::new(&options.name, &options.backend.to_string(), &offered),
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
                    let a = &task.task;
                    let cancelled = reply.cancel.iter().any(|c| {
                        a.job_id == c.job_id && c.task_index == a.task_index && c.epoch == a.epoch
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
fn devices(backend: Backend, count: usize, host: u64) -> anyhow::Result<Vec<pb::Device>> {
    if backend == Backend::Cuda {
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
    if options.backend != Backend::Cuda {
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
        job_id: task.task.job_id.to_string(),
        task_index: task.task.task_index,
        epoch: task.task.epoch,
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
            backend: options.backend.to_string(),
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
    let a = &task.task;
    let outcome = match result {
        Ok(s) => pb::report_task_request::Outcome::Succeeded(s),
        Err(f) => pb::report_task_request::Outcome::Failed(f),
    };
    let request = pb::ReportTaskRequest {
        worker_id: worker_id.to_string(),
        job_id: a.job_id.to_string(),
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
    wire: pb::Assignment,
    options: &DaemonOptions,
    store: Store,
    artifact_store: Store,
    wake: Arc<Notify>,
) -> TaskHandle {
    let task = segprop_proto::domain::attempt(&wire);
    let attempt_key =
        segprop_store::layout::attempt_dir(&wire.job_dir, task.task_index, task.epoch);
    let assignment = Dispatch::try_from(&wire);
    let kind = assignment.as_ref().map_or("unknown", Dispatch::kind_name);
    let span = tracing::info_span!(
        "task",
        otel.name = %format!("task {} {kind}", task.task_index),
        job.id = %task.job_id,
        task.index = task.task_index,
        task.kind = %kind,
        task.epoch = task.epoch,
        task.stage_index = wire.stage_index,
        worker = %options.name,
    );
    segprop_telemetry::trace::set_parent(&span, &wire.traceparent);
    let handle = TaskHandle {
        span: span.clone(),
        attempt_key: attempt_key.clone(),
        task: task.clone(),
        cancel: Arc::new(AtomicBool::new(false)),
        state: Arc::new(Mutex::new(TaskState::default())),
    };
    let assignment = match assignment {
        Ok(a) => a,
        Err(e) => {
            // Refused on arrival: reported at once, not retried.
            tracing::warn!(job = %task.job_id, task = task.task_index, reason = %e, "assignment refused");
            let refused = TaskError::Unsupported(format!("assignment {e}"));
            lock(&handle.state).result = Some(Err(pb::TaskFailed::from(refused)));
            wake.notify_one();
            return handle;
        }
    };
    let ctx = TaskContext {
        artifacts: Artifacts {
            store: artifact_store,
            runtime: tokio::runtime::Handle::current(),
        },
        attempt_key,
        work_dir: options
            .work_dir
            .join(task.job_id.as_str())
            .join(format!("task-{}-epoch-{}", task.task_index, task.epoch)),
        backend: options.backend.to_string(),
        cancel: handle.cancel.clone(),
        state: handle.state.clone(),
        store,
        runtime: tokio::runtime::Handle::current(),
        snapshot_io: Arc::default(),
        worker_name: options.name.clone(),
    };
    tracing::info!(job = %task.job_id, task = task.task_index, epoch = task.epoch, resume_step = assignment.resume_from.as_ref().map_or(0, |c| c.step), "task starts");
    let name = format!("task-{}-{}", task.job_id, task.task_index);
    let ctx = Arc::new(ctx);
    let spawned = std::thread::Builder::new().name(name).spawn(move || {
        let _entered = span.enter();
        // The one place a task's outcome becomes the wire's.
        let result = ctx
            .run(&assignment)
            .map(pb::TaskSucceeded::from)
            .map_err(pb::TaskFailed::from);
        if let Err(f) = &result {
            tracing::warn!(job = %task.job_id, task = task.task_index, reason = %f.reason, retryable = f.retryable, "task failed");
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
