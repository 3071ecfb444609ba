//! `segprop-bench loadtest`: drives a real `segprop-coord serve` process with many simulated workers
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

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use segprop_coordinator::auth::AttachToken;
use segprop_proto::v1 as pb;
use segprop_proto::v1::cluster_service_client::ClusterServiceClient;
use segprop_proto::v1::job_service_client::JobServiceClient;
use tokio::task::JoinSet;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::rng::SplitMix64;

mod process;
mod report;
mod sim;

use process::*;
use report::*;
use sim::*;

type ClusterClient = ClusterServiceClient<InterceptedService<Channel, AttachToken>>;
type JobClient = JobServiceClient<InterceptedService<Channel, AttachToken>>;

/// How many unexpected errors are printed (all are counted).
const ERROR_SAMPLES: usize = 10;

#[derive(clap::Args, Debug, Clone)]
pub struct LoadtestArgs {
    /// Simulated workers (one free slot each).
    #[arg(long, default_value_t = 1000)]
    pub workers: usize,
    /// Jobs to submit.
    #[arg(long, default_value_t = 200)]
    pub jobs: usize,
    /// The coordinator binary (default: `segprop-coord` next to this executable).
    #[arg(long)]
    pub coordinator_bin: Option<PathBuf>,
    /// Heartbeat interval given to the coordinator (SEGPROP_HEARTBEAT_INTERVAL_MS).
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// Task lease (SEGPROP_LEASE_MS); default 10 x the heartbeat interval.
    #[arg(long)]
    pub lease_ms: Option<u64>,
    /// HTTP/2 channels the simulated workers share.
    #[arg(long, default_value_t = 16)]
    pub channels: usize,
    /// Jobs submitted per second (ignored with --burst).
    #[arg(long, default_value_t = 4.0)]
    pub submit_rate: f64,
    /// Submit every job at once (back to back) instead of spacing them.
    #[arg(long)]
    pub burst: bool,
    /// Simulated task run time in ms, `MIN-MAX` (uniform, seeded) or a single value.
    #[arg(long, default_value = "20-50")]
    pub task_ms: String,
    /// Job spec whose copies are submitted (`name:` is replaced by a unique one).
    #[arg(long, default_value = "configs/jobs/tiny-segprop.yaml")]
    pub spec: PathBuf,
    /// Directory under which the coordinator's state and artifact directories are created
    /// (default: the system temp directory). Its disk's fsync cost is part of what is measured.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Seed of the simulated task durations.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Give up (exit non-zero) when the jobs have not finished after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    /// Print the results as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs the load test; an error when it could not run or saw something unexpected (printed).
pub fn loadtest(args: LoadtestArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if runtime.block_on(run(args))? {
        Ok(())
    } else {
        bail!("the load test saw unexpected errors or did not complete (above)")
    }
}

/// Runs the whole test; `Ok(false)`: it ran, but something unexpected happened (printed).
async fn run(args: LoadtestArgs) -> anyhow::Result<bool> {
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
    let dir = parent.join(format!("segprop-bench-loadtest-{}", std::process::id()));
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
    args: &LoadtestArgs,
    spec: &str,
    task_ms: (u64, u64),
    lease_ms: u64,
    token: &str,
    coordinator: &mut Coordinator,
) -> anyhow::Result<Results> {
    let url = coordinator.url();
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

fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("getrandom: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}
