//! `segprop-loadtest`: drives a real `segprop-coord serve` process with many simulated workers
//! over the real gRPC protocol on loopback, and measures how fast it hands out tasks and what
//! that costs it.
//!
//! Setup: the coordinator runs as a child process with a random token, a free loopback port and
//! fresh state and artifact directories (removed afterwards). `--workers` simulated workers
//! register over a few shared HTTP/2 channels and then behave like `segprop-worker serve`: an idle
//! worker sends `Heartbeat { free_slots: 1 }` back to back (the coordinator long-polls it up to
//! one heartbeat interval); a worker that receives an `Assignment` "runs" it for a deterministic
//! pseudo-random 20–50 ms (`--task-ms`), heartbeating as a busy worker every interval and once
//! more at the end (as the real worker does before it reports), then sends `ReportTask`
//! succeeded with dummy artifact references (the coordinator stores references, never reads
//! them). Meanwhile `--jobs` copies of a small job spec (`configs/jobs/tiny-segprop.yaml`, each
//! with a unique `name:`) are submitted at `--submit-rate` jobs per second (or all at once with
//! `--burst`); every job is a chain of tasks, so the coordinator dispatches both on submit and on
//! every report.
//!
//! Measured:
//! - dispatch latency of every task: from the moment it became assignable, as the client sees it
//!   (the first task: the `SubmitJob` reply arrived; a later task: the `ReportTask` reply of the
//!   job's previous task arrived) to the moment a simulated worker received its `Assignment` in a
//!   heartbeat reply. An assignment can overtake the report's reply; such latencies count as 0
//!   and are reported as `overtook`.
//! - coordinator CPU: utime + stime from `/proc/<pid>/stat` at the start (after registration) and
//!   the end (last report) of the measured window, as average cores = CPU seconds / wall seconds;
//!   the load generator's own CPU likewise (it shares the machine).
//! - coordinator memory: `VmHWM` (peak RSS) and `VmRSS` from `/proc/<pid>/status` at the end.
//!
//! Unexpected RPC failures, cancellations or re-registration requests are counted (the first
//! few are printed); any of them, an incomplete run or a coordinator that dies makes the exit
//! status non-zero.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use segprop_coordinator::auth::AttachToken;
use segprop_proto::v1 as pb;
use segprop_proto::v1::cluster_service_client::ClusterServiceClient;
use segprop_proto::v1::job_service_client::JobServiceClient;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

type ClusterClient = ClusterServiceClient<InterceptedService<Channel, AttachToken>>;
type JobClient = JobServiceClient<InterceptedService<Channel, AttachToken>>;

/// How many unexpected errors are printed (all are counted).
const ERROR_SAMPLES: usize = 10;

#[derive(Parser, Debug)]
#[command(
    name = "segprop-loadtest",
    about = "Load-test a real segprop coordinator with simulated workers"
)]
struct Args {
    /// Simulated workers (one free slot each).
    #[arg(long, default_value_t = 1000)]
    workers: usize,
    /// Jobs to submit.
    #[arg(long, default_value_t = 200)]
    jobs: usize,
    /// The coordinator binary (default: `segprop-coord` next to this executable).
    #[arg(long)]
    coordinator_bin: Option<PathBuf>,
    /// Heartbeat interval given to the coordinator (SEGPROP_HEARTBEAT_INTERVAL_MS).
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Task lease (SEGPROP_LEASE_MS); default 10 x the heartbeat interval.
    #[arg(long)]
    lease_ms: Option<u64>,
    /// HTTP/2 channels the simulated workers share.
    #[arg(long, default_value_t = 16)]
    channels: usize,
    /// Jobs submitted per second (ignored with --burst).
    #[arg(long, default_value_t = 4.0)]
    submit_rate: f64,
    /// Submit every job at once (back to back) instead of spacing them.
    #[arg(long)]
    burst: bool,
    /// Simulated task run time in ms, `MIN-MAX` (uniform, seeded) or a single value.
    #[arg(long, default_value = "20-50")]
    task_ms: String,
    /// Job spec whose copies are submitted (`name:` is replaced by a unique one).
    #[arg(long, default_value = "configs/jobs/tiny-segprop.yaml")]
    spec: PathBuf,
    /// Directory under which the coordinator's state and artifact directories are created
    /// (default: the system temp directory). Its disk's fsync cost is part of what is measured.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Seed of the simulated task durations.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Give up (exit non-zero) when the jobs have not finished after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Print the results as one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Runs the whole test; `Ok(false)`: it ran, but something unexpected happened (printed).
async fn run(args: Args) -> anyhow::Result<bool> {
    if args.workers == 0 || args.jobs == 0 || args.channels == 0 {
        bail!("--workers, --jobs and --channels must be greater than 0");
    }
    if !args.burst && !(args.submit_rate > 0.0) {
        bail!("--submit-rate must be greater than 0");
    }
    let task_ms = parse_range(&args.task_ms)?;
    let lease_ms = args.lease_ms.unwrap_or(10 * args.heartbeat_ms);
    if args.heartbeat_ms == 0 || lease_ms < 2 * args.heartbeat_ms {
        bail!("--heartbeat-ms must be > 0 and --lease-ms at least twice it");
    }
    let spec = std::fs::read_to_string(&args.spec)
        .with_context(|| format!("cannot read the job spec {}", args.spec.display()))?;
    // Fail before starting anything if the spec cannot be renamed.
    unique_spec(&spec, 0)?;
    let coordinator_bin = match &args.coordinator_bin {
        Some(path) => path.clone(),
        None => std::env::current_exe()
            .context("cannot locate this executable")?
            .with_file_name("segprop-coord"),
    };
    if !coordinator_bin.is_file() {
        bail!(
            "coordinator binary {} not found (build it with `cargo build --release -p \
             segprop-coordinator`, or pass --coordinator-bin)",
            coordinator_bin.display()
        );
    }

    let parent = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let dir = parent.join(format!("segprop-loadtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let token = random_token()?;
    let mut coordinator =
        Coordinator::start(&coordinator_bin, &dir, &token, args.heartbeat_ms, lease_ms)?;
    let outcome = drive(&args, &spec, task_ms, lease_ms, &token, &mut coordinator).await;
    let stopped = coordinator.stop();
    let log = coordinator.log_lines();
    match (outcome, stopped) {
        (Ok(results), Ok(())) => {
            results.print(args.json, &log);
            let ok = results.ok();
            if ok {
                let _ = std::fs::remove_dir_all(&dir);
            } else {
                eprintln!(
                    "the coordinator's state and log are kept in {}",
                    dir.display()
                );
            }
            Ok(ok)
        }
        (Err(e), _) | (Ok(_), Err(e)) => {
            for line in log.iter().rev().take(20).rev() {
                eprintln!("coordinator: {line}");
            }
            eprintln!(
                "the coordinator's state and log are kept in {}",
                dir.display()
            );
            Err(e)
        }
    }
}

/// Everything after the coordinator started: connect, register, load, measure.
async fn drive(
    args: &Args,
    spec: &str,
    task_ms: (u64, u64),
    lease_ms: u64,
    token: &str,
    coordinator: &mut Coordinator,
) -> anyhow::Result<Results> {
    let url = format!("http://{}", coordinator.addr);
    let auth = AttachToken::new(token).map_err(anyhow::Error::msg)?;
    let mut jobs_client = coordinator.wait_ready(&url, &auth).await?;

    let mut channels = Vec::with_capacity(args.channels);
    for _ in 0..args.channels {
        channels.push(connect(&url).await?);
    }
    let interval = Duration::from_millis(args.heartbeat_ms);
    let shared = Arc::new(Shared::default());

    // Register every worker before the measured window starts.
    let mut registrations = JoinSet::new();
    for index in 0..args.workers {
        let mut client = ClusterServiceClient::with_interceptor(
            channels[index % channels.len()].clone(),
            auth.clone(),
        );
        registrations.spawn(async move {
            let id = register(&mut client, index).await;
            (index, client, id)
        });
    }
    let mut workers = Vec::with_capacity(args.workers);
    let mut failed = Vec::new();
    while let Some(joined) = registrations.join_next().await {
        let (index, client, id) = joined.context("a registration task panicked")?;
        match id {
            Ok(id) => workers.push((index, client, id)),
            Err(e) => failed.push(format!("worker {index}: {e:#}")),
        }
    }
    if !failed.is_empty() {
        bail!(
            "{} of {} workers could not register, e.g. {}",
            failed.len(),
            args.workers,
            failed[0]
        );
    }
    workers.sort_by_key(|(index, _, _)| *index);

    // The measured window: from here to the last report.
    let cpu_start = cpu_ticks(coordinator.pid)?;
    let self_start = cpu_ticks(std::process::id())?;
    let start = Instant::now();
    let mut fleet = JoinSet::new();
    for (index, client, id) in workers {
        let sim = SimWorker {
            index,
            id,
            client,
            interval,
            task_ms,
            rng: SplitMix64::new(args.seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
            shared: shared.clone(),
        };
        fleet.spawn(sim.run());
    }

    let deadline = start + Duration::from_secs(args.timeout_s);
    let mut total_tasks = 0u64;
    let mut submitted = 0usize;
    let mut timed_out = false;
    for i in 0..args.jobs {
        if !args.burst {
            let at = start + Duration::from_secs_f64(i as f64 / args.submit_rate);
            tokio::time::sleep_until(at.into()).await;
        }
        let request = pb::SubmitJobRequest {
            spec_yaml: unique_spec(spec, i)?,
            source_name: format!("loadtest-{i}.yaml"),
        };
        match jobs_client.submit_job(request).await {
            Ok(reply) => {
                let now = Instant::now();
                let Some(job) = reply.into_inner().job else {
                    shared.error(format!("SubmitJob {i}: the reply has no job"));
                    continue;
                };
                total_tasks += job.tasks.len() as u64;
                submitted += 1;
                shared.became_ready(&job.job_id, 0, now);
            }
            Err(status) => shared.error(format!("SubmitJob {i}: {status}")),
        }
        if coordinator.exited() {
            break;
        }
    }
    let submit_done = start.elapsed();

    // Wait for every task of every submitted job to be reported.
    loop {
        let progressed = shared.progress.notified();
        if shared.reports.load(Ordering::SeqCst) >= total_tasks {
            break;
        }
        if coordinator.exited() {
            shared.error("the coordinator process exited during the run".into());
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), progressed).await;
    }
    let wall = start.elapsed();
    let cpu_end = cpu_ticks(coordinator.pid)?;
    let self_end = cpu_ticks(std::process::id())?;
    let memory = memory_kib(coordinator.pid)?;
    shared.stop.store(true, Ordering::SeqCst);
    fleet.shutdown().await;

    let tick = clock_ticks_per_second();
    let latency = shared.latencies();
    Ok(Results {
        workers: args.workers,
        channels: args.channels,
        jobs_submitted: submitted,
        jobs_requested: args.jobs,
        tasks_total: total_tasks,
        tasks_reported: shared.reports.load(Ordering::SeqCst),
        heartbeat_ms: args.heartbeat_ms,
        lease_ms,
        task_ms,
        submit_mode: if args.burst {
            "burst".into()
        } else {
            format!("{} jobs/s", args.submit_rate)
        },
        submit_s: submit_done.as_secs_f64(),
        wall_s: wall.as_secs_f64(),
        coordinator_cpu_s: cpu_end.saturating_sub(cpu_start) as f64 / tick,
        loadgen_cpu_s: self_end.saturating_sub(self_start) as f64 / tick,
        peak_rss_kib: memory.peak,
        rss_kib: memory.now,
        idle_heartbeats: shared.idle_heartbeats.load(Ordering::SeqCst),
        busy_heartbeats: shared.busy_heartbeats.load(Ordering::SeqCst),
        latency,
        errors: shared.errors.load(Ordering::SeqCst),
        error_samples: lock(&shared.error_samples).clone(),
        timed_out,
    })
}

/// (job id, task index).
type TaskKey = (String, u32);

/// An assignment as a simulated worker received it.
struct Received {
    task: TaskKey,
    epoch: u64,
    at: Instant,
}

/// State the simulated workers and the submitter share.
#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    /// Tasks reported succeeded (accepted by the coordinator).
    reports: AtomicU64,
    progress: Notify,
    idle_heartbeats: AtomicU64,
    busy_heartbeats: AtomicU64,
    /// When each task became assignable, as the client saw it.
    ready: Mutex<HashMap<TaskKey, Instant>>,
    /// Every assignment received.
    received: Mutex<Vec<Received>>,
    errors: AtomicU64,
    error_samples: Mutex<Vec<String>>,
}

impl Shared {
    fn error(&self, message: String) {
        if self.stop.load(Ordering::SeqCst) {
            return;
        }
        self.errors.fetch_add(1, Ordering::SeqCst);
        let mut samples = lock(&self.error_samples);
        if samples.len() < ERROR_SAMPLES {
            samples.push(message);
        }
    }

    fn became_ready(&self, job_id: &str, task_index: u32, at: Instant) {
        lock(&self.ready).insert((job_id.to_string(), task_index), at);
    }

    /// Joins assignments with readiness; leases beyond the first of a task are errors here
    /// (nothing fails or expires in this test).
    fn latencies(&self) -> Latency {
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

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// One simulated worker: the pull loop of `segprop-worker serve` without the training.
struct SimWorker {
    index: usize,
    id: String,
    client: ClusterClient,
    interval: Duration,
    task_ms: (u64, u64),
    rng: SplitMix64,
    shared: Arc<Shared>,
}

impl SimWorker {
    async fn run(mut self) {
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
    async fn run_task(&mut self, a: &pb::Assignment) {
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

async fn register(client: &mut ClusterClient, index: usize) -> anyhow::Result<String> {
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

async fn connect(url: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to the coordinator at {url}"))
}

/// The spec with its top-level `name:` replaced by `loadtest-<i>`.
fn unique_spec(spec: &str, i: usize) -> anyhow::Result<String> {
    let mut found = false;
    let lines: Vec<String> = spec
        .lines()
        .map(|line| {
            if !found && line.starts_with("name:") {
                found = true;
                format!("name: loadtest-{i:05}")
            } else {
                line.to_string()
            }
        })
        .collect();
    if !found {
        bail!("the job spec has no top-level `name:` line to make unique");
    }
    Ok(lines.join("\n") + "\n")
}

fn parse_range(text: &str) -> anyhow::Result<(u64, u64)> {
    let parse = |s: &str| {
        s.trim()
            .parse::<u64>()
            .with_context(|| format!("--task-ms `{text}`: expected MIN-MAX or MS"))
    };
    let (low, high) = match text.split_once('-') {
        Some((a, b)) => (parse(a)?, parse(b)?),
        None => {
            let v = parse(text)?;
            (v, v)
        }
    };
    if low > high {
        bail!("--task-ms `{text}`: MIN is greater than MAX");
    }
    Ok((low, high))
}

/// A small seeded generator (SplitMix64), enough for reproducible task durations.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("getrandom: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// The coordinator child process.
struct Coordinator {
    child: Child,
    pid: u32,
    addr: SocketAddr,
    log_path: PathBuf,
    stopped: bool,
}

impl Coordinator {
    fn start(
        bin: &Path,
        dir: &Path,
        token: &str,
        heartbeat_ms: u64,
        lease_ms: u64,
    ) -> anyhow::Result<Self> {
        let addr = free_port()?;
        let log_path = dir.join("coordinator.log");
        let log = File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let state_dir = dir.join("state");
        let artifact_root = dir.join("artifacts");
        // The settings go in a config file (the coordinator's `--config`), which also exercises
        // the file path of its configuration.
        let quote = |p: &Path| serde_json::Value::from(p.display().to_string()).to_string();
        let config_path = dir.join("coordinator.yaml");
        std::fs::write(
            &config_path,
            format!(
                "listen: \"{addr}\"\nstate_dir: {}\nartifact_root: {}\ntoken: \"{token}\"\n\
                 heartbeat_interval_ms: {heartbeat_ms}\nlease_ms: {lease_ms}\n",
                quote(&state_dir),
                quote(&artifact_root),
            ),
        )
        .with_context(|| format!("cannot write {}", config_path.display()))?;
        let mut command = Command::new(bin);
        command.arg("serve").arg("--config").arg(&config_path);
        // Only our settings: no SEGPROP_* variable of the caller's shell leaks in.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("SEGPROP_") {
                command.env_remove(key);
            }
        }
        command
            .env("SEGPROP_TOKEN", token)
            .env("SEGPROP_LISTEN", addr.to_string())
            .env("SEGPROP_STATE_DIR", &state_dir)
            .env("SEGPROP_ARTIFACT_ROOT", &artifact_root)
            .env("SEGPROP_HEARTBEAT_INTERVAL_MS", heartbeat_ms.to_string())
            .env("SEGPROP_LEASE_MS", lease_ms.to_string())
            .env("SEGPROP_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Ok(Self {
            pid: child.id(),
            child,
            addr,
            log_path,
            stopped: false,
        })
    }

    /// Waits until the coordinator answers an authenticated call; returns a JobService client.
    async fn wait_ready(&mut self, url: &str, auth: &AttachToken) -> anyhow::Result<JobClient> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last_error = String::from("no attempt");
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("the coordinator exited during startup ({status})");
            }
            match Endpoint::from_shared(url.to_string())?
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .connect()
                .await
            {
                Ok(channel) => {
                    let mut client = JobServiceClient::with_interceptor(channel, auth.clone());
                    match client.list_jobs(pb::ListJobsRequest {}).await {
                        Ok(_) => return Ok(client),
                        Err(status) => last_error = status.to_string(),
                    }
                }
                Err(e) => last_error = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the coordinator did not accept calls within 30 s: {last_error}")
    }

    /// Whether the process has ended (a zombie until waited for counts as ended).
    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then up to 10 s for it to exit, then SIGKILL.
    fn stop(&mut self) -> anyhow::Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        if let Some(status) = self.child.try_wait()? {
            bail!("the coordinator had already exited ({status})");
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        bail!("the coordinator did not exit within 10 s of SIGTERM (killed)")
    }

    fn log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log_path)
            .map(|text| text.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot find a free loopback port")?;
    Ok(listener.local_addr()?)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("{path}: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: field {n} missing"))
    };
    Ok(field(14)? + field(15)?)
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

struct Memory {
    peak: u64,
    now: u64,
}

fn memory_kib(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("{path}: no {name}"))
    };
    Ok(Memory {
        peak: field("VmHWM:")?,
        now: field("VmRSS:")?,
    })
}

/// Dispatch latency statistics, in ms.
#[derive(Debug, Default, Clone)]
struct Latency {
    count: usize,
    overtook: u64,
    p50: f64,
    p90: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

impl Latency {
    fn from_samples(mut ms: Vec<f64>, overtook: u64) -> Self {
        if ms.is_empty() {
            return Self::default();
        }
        ms.sort_by(f64::total_cmp);
        // Nearest rank.
        let rank = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        Self {
            count: ms.len(),
            overtook,
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: ms[ms.len() - 1],
            mean: ms.iter().sum::<f64>() / ms.len() as f64,
        }
    }
}

struct Results {
    workers: usize,
    channels: usize,
    jobs_submitted: usize,
    jobs_requested: usize,
    tasks_total: u64,
    tasks_reported: u64,
    heartbeat_ms: u64,
    lease_ms: u64,
    task_ms: (u64, u64),
    submit_mode: String,
    submit_s: f64,
    wall_s: f64,
    coordinator_cpu_s: f64,
    loadgen_cpu_s: f64,
    peak_rss_kib: u64,
    rss_kib: u64,
    idle_heartbeats: u64,
    busy_heartbeats: u64,
    latency: Latency,
    errors: u64,
    error_samples: Vec<String>,
    timed_out: bool,
}

impl Results {
    fn ok(&self) -> bool {
        self.errors == 0
            && !self.timed_out
            && self.jobs_submitted == self.jobs_requested
            && self.tasks_reported == self.tasks_total
    }

    fn print(&self, json: bool, coordinator_log: &[String]) {
        let mib = |kib: u64| kib as f64 / 1024.0;
        let cores = |cpu_s: f64| cpu_s / self.wall_s.max(1e-9);
        let l = &self.latency;
        if json {
            let value = serde_json::json!({
                "workers": self.workers,
                "channels": self.channels,
                "jobs": self.jobs_submitted,
                "jobs_requested": self.jobs_requested,
                "tasks_total": self.tasks_total,
                "tasks_dispatched": l.count,
                "tasks_reported": self.tasks_reported,
                "heartbeat_ms": self.heartbeat_ms,
                "lease_ms": self.lease_ms,
                "task_ms": [self.task_ms.0, self.task_ms.1],
                "submit": self.submit_mode,
                "submit_s": self.submit_s,
                "wall_s": self.wall_s,
                "dispatch_latency_ms": {
                    "p50": l.p50, "p90": l.p90, "p99": l.p99, "max": l.max, "mean": l.mean,
                    "overtook": l.overtook,
                },
                "coordinator_cpu_s": self.coordinator_cpu_s,
                "coordinator_cores": cores(self.coordinator_cpu_s),
                "loadgen_cores": cores(self.loadgen_cpu_s),
                "coordinator_peak_rss_mib": mib(self.peak_rss_kib),
                "coordinator_rss_mib": mib(self.rss_kib),
                "idle_heartbeats": self.idle_heartbeats,
                "busy_heartbeats": self.busy_heartbeats,
                "unexpected_errors": self.errors,
                "error_samples": self.error_samples,
                "timed_out": self.timed_out,
                "coordinator_log_lines": coordinator_log.len(),
                "ok": self.ok(),
            });
            println!("{value}");
            return;
        }
        let mut out = String::new();
        let _ = std::fmt::Write::write_fmt(
            &mut out,
            format_args!(
                "segprop-loadtest results\n\
                 workers {} ({} channels), jobs {}/{} ({}, submitted over {:.1} s), \
                 heartbeat {} ms, lease {} ms, task {}-{} ms\n\
                 tasks dispatched {}, reported {}/{}\n\
                 dispatch latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}  (mean {:.2}; \
                 {} assignment(s) overtook the report reply, counted as 0)\n\
                 coordinator cpu {:.2} cores (avg over {:.1} s; {:.1} cpu-s), peak RSS {:.1} MiB \
                 (RSS at end {:.1} MiB)\n\
                 load generator cpu {:.2} cores (same machine)\n\
                 rpcs: {} idle heartbeats ({:.0}/s), {} busy heartbeats, {} reports\n\
                 unexpected errors {}{}\n",
                self.workers,
                self.channels,
                self.jobs_submitted,
                self.jobs_requested,
                self.submit_mode,
                self.submit_s,
                self.heartbeat_ms,
                self.lease_ms,
                self.task_ms.0,
                self.task_ms.1,
                l.count,
                self.tasks_reported,
                self.tasks_total,
                l.p50,
                l.p90,
                l.p99,
                l.max,
                l.mean,
                l.overtook,
                cores(self.coordinator_cpu_s),
                self.wall_s,
                self.coordinator_cpu_s,
                mib(self.peak_rss_kib),
                mib(self.rss_kib),
                cores(self.loadgen_cpu_s),
                self.idle_heartbeats,
                self.idle_heartbeats as f64 / self.wall_s.max(1e-9),
                self.busy_heartbeats,
                self.tasks_reported,
                self.errors,
                if self.timed_out {
                    " (TIMED OUT before every task was reported)"
                } else {
                    ""
                },
            ),
        );
        for sample in &self.error_samples {
            out.push_str(&format!("  error: {sample}\n"));
        }
        if !coordinator_log.is_empty() {
            out.push_str(&format!(
                "coordinator logged {} line(s) at warn or above, first:\n",
                coordinator_log.len()
            ));
            for line in coordinator_log.iter().take(5) {
                out.push_str(&format!("  {line}\n"));
            }
        }
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
    }
}
