//! `segprop-bench chaos`: a soak of the control plane under failures, on loopback. N SegProp
//! jobs (mid-stage checkpoints on) run on M real `segprop-worker serve` processes while workers
//! are SIGKILLed at random and restarted on their work directories, and the coordinator is
//! SIGKILLed and restarted on its address (twice by default). At the end:
//! - every job has succeeded;
//! - each stage has exactly one committed state (one attempt directory holding `state`);
//! - every stage's steps appear exactly once in the job's metrics;
//! - every exported model equals, weight for weight, and its held-out loss equals, the job's
//!   undisturbed standalone run (`segprop-worker train`).
//!
//! Seeded: which worker dies and when follow `--seed`, so a failing soak can be rerun. The
//! coordinator allows more attempts than its default (`max_attempts` 50): the soak kills far
//! more often than a production retry budget is sized for. Loopback only; binaries from the
//! directory of this one (build them: `cargo build --release -p segprop-coordinator -p
//! segprop-worker -p segprop-bench`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use segprop_harness::{Binaries, WORKER};
use segprop_proto::v1 as pb;
use segprop_proto::v1::job_service_client::JobServiceClient;

use crate::procs::{self, Coordinator, Process};
use crate::rng::SplitMix64;

/// The coordinator's settings for the soak: short leases, quick retries, a large retry budget.
const COORDINATOR_ENV: &[(&str, &str)] = &[
    ("SEGPROP_LEASE_MS", "3000"),
    ("SEGPROP_BACKOFF_BASE_MS", "100"),
    ("SEGPROP_MAX_ATTEMPTS", "50"),
];

fn coordinator(bins: &Binaries, dir: &Path, listen: &str) -> Result<Coordinator> {
    procs::coordinator(bins, dir, listen, COORDINATOR_ENV, true)
}

fn worker(bins: &Binaries, dir: &Path, addr: &str, name: &str) -> Result<Process> {
    procs::worker(bins, dir, addr, name, true)
}

#[derive(clap::Args, Debug, Clone)]
pub struct ChaosArgs {
    /// Jobs submitted at the start.
    #[arg(long, default_value_t = 3)]
    pub jobs: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 3)]
    pub workers: usize,
    /// Mean time between worker kills (each kill picks a worker at random).
    #[arg(long, default_value_t = 4000)]
    pub kill_every_ms: u64,
    /// Coordinator kills (each at an even share of the tasks done).
    #[arg(long, default_value_t = 2)]
    pub coordinator_restarts: usize,
    /// Training steps of each stage-2 segment (stage 1 takes 12).
    #[arg(long, default_value_t = 16)]
    pub segment_steps: u64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Give up (and fail) after this long.
    #[arg(long, default_value_t = 1200)]
    pub limit_s: u64,
    /// Keep the run's files here (default: a temporary directory, removed at the end).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// The job spec of soak job `i`: configs/jobs/tiny-soak.yaml (tiny, 3 stages and the export,
/// checkpoints every 4 steps) with its own name, seed and segment length.
fn spec(i: usize, segment_steps: u64) -> String {
    const TEMPLATE: &str = include_str!("../../../configs/jobs/tiny-soak.yaml");
    let text = TEMPLATE
        .replace("name: tiny-soak", &format!("name: chaos-{i}"))
        .replace(
            "segment: { max_steps: 10 }",
            &format!("segment: {{ max_steps: {segment_steps} }}"),
        )
        .replace("seed: 11", &format!("seed: {}", 11 + i));
    debug_assert!(text.contains(&format!("max_steps: {segment_steps} }}")));
    text
}

/// Every job's current record, or `None` while the coordinator is unreachable (restarting).
async fn poll(addr: &str, ids: &[String]) -> Option<Vec<pb::Job>> {
    let mut client = JobServiceClient::connect(format!("http://{addr}"))
        .await
        .ok()?;
    let mut jobs = Vec::with_capacity(ids.len());
    for id in ids {
        let req = procs::get_job(id).ok()?;
        jobs.push(client.get_job(req).await.ok()?.into_inner());
    }
    Some(jobs)
}

fn terminal(job: &pb::Job) -> bool {
    [
        pb::JobState::Succeeded,
        pb::JobState::Failed,
        pb::JobState::Cancelled,
    ]
    .iter()
    .any(|s| job.state == *s as i32)
}

/// What the soak did.
struct Disturbed {
    worker_kills: usize,
    coordinator_kills: usize,
    wall: Duration,
}

pub fn chaos(args: &ChaosArgs) -> Result<()> {
    let bins = Binaries::beside_current_exe()?;
    let tmp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let specs: Vec<PathBuf> = (0..args.jobs)
        .map(|i| {
            let path = dir.join(format!("chaos-{i}.yaml"));
            std::fs::write(&path, spec(i, args.segment_steps)).map(|()| path)
        })
        .collect::<std::io::Result<_>>()?;
    println!(
        "chaos: {} jobs on {} workers, a worker killed every ~{} ms, {} coordinator restarts, \
         seed {}",
        args.jobs, args.workers, args.kill_every_ms, args.coordinator_restarts, args.seed
    );
    let (jobs, disturbed) = soak(args, &bins, &dir, &specs)?;
    report(args, &bins, &dir, &specs, &jobs, &disturbed)
}

/// Runs the jobs under failures until every one has ended; returns their final records.
fn soak(
    args: &ChaosArgs,
    bins: &Binaries,
    dir: &Path,
    specs: &[PathBuf],
) -> Result<(Vec<pb::Job>, Disturbed)> {
    let started = Instant::now();
    let mut coord = coordinator(bins, dir, "127.0.0.1:0")?;
    let addr = coord.addr.clone();
    let names: Vec<String> = (0..args.workers).map(|w| format!("w{w}")).collect();
    let mut workers = names
        .iter()
        .map(|n| worker(bins, dir, &addr, n))
        .collect::<Result<Vec<_>>>()?;
    let ids = specs
        .iter()
        .map(|spec| coord.submit(spec))
        .collect::<Result<Vec<_>>>()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut rng = SplitMix64::new(args.seed);
    let next_kill = |rng: &mut SplitMix64| {
        Duration::from_millis(args.kill_every_ms / 2 + rng.next() % args.kill_every_ms.max(1))
    };
    let mut kill_at = Instant::now() + next_kill(&mut rng);
    let (mut worker_kills, mut coordinator_kills) = (0, 0);
    let last = loop {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(args.limit_s),
            "the soak did not finish in {} s (logs in {})",
            args.limit_s,
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(100));
        let Some(jobs) = runtime.block_on(poll(&addr, &ids)) else {
            continue;
        };
        if jobs.iter().all(terminal) {
            break jobs;
        }
        let tasks: usize = jobs.iter().map(|j| j.tasks.len()).sum();
        let done = jobs
            .iter()
            .flat_map(|j| &j.tasks)
            .filter(|t| t.state == pb::TaskState::Succeeded as i32)
            .count();
        // The coordinator dies at even shares of the work: 1/3 and 2/3 of the tasks with two.
        if coordinator_kills < args.coordinator_restarts
            && done * (args.coordinator_restarts + 1) >= tasks * (coordinator_kills + 1)
            && done > 0
        {
            drop(coord); // SIGKILL
            coordinator_kills += 1;
            std::thread::sleep(Duration::from_millis(300));
            coord = coordinator(bins, dir, &addr)?;
            println!(
                "  {:>6.1} s: coordinator killed and restarted ({done}/{tasks} tasks done)",
                started.elapsed().as_secs_f64()
            );
        }
        if Instant::now() >= kill_at {
            let w = (rng.next() % workers.len() as u64) as usize;
            let _ = workers[w].0.kill(); // SIGKILL
            let _ = workers[w].0.wait();
            std::thread::sleep(Duration::from_millis(100));
            workers[w] = worker(bins, dir, &addr, &names[w])?;
            worker_kills += 1;
            kill_at = Instant::now() + next_kill(&mut rng);
            println!(
                "  {:>6.1} s: worker {} killed and restarted ({done}/{tasks} tasks done)",
                started.elapsed().as_secs_f64(),
                names[w]
            );
        }
    };
    drop(workers);
    drop(coord);
    Ok((
        last,
        Disturbed {
            worker_kills,
            coordinator_kills,
            wall: started.elapsed(),
        },
    ))
}

/// The run's final model (every weight's bits) and held-out loss, from its run directory.
fn outputs(run_dir: &Path) -> Result<(Vec<u32>, f64)> {
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json"))?)?;
    let (model, _) = segprop_model::hf::import::<segprop_train::CpuBackend>(
        &run_dir.join("model"),
        &Default::default(),
    )?;
    let bits = segprop_train::segprop::parameter_values(&model)
        .into_iter()
        .flat_map(|(_, values)| values)
        .collect();
    let loss = summary["final_eval_loss"]
        .as_f64()
        .context("summary.json has no final_eval_loss")?;
    Ok((bits, loss))
}

/// Stages whose directory holds other than exactly one committed state.
fn committed_twice(run_dir: &Path) -> Result<Vec<String>> {
    let mut bad = Vec::new();
    for stage in std::fs::read_dir(run_dir.join("stages"))? {
        let stage = stage?.path();
        let states = std::fs::read_dir(&stage)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("state").exists())
            .count();
        if states != 1 {
            bad.push(format!("{} ({states} states)", stage.display()));
        }
    }
    Ok(bad)
}

/// Stages whose steps are not 1..=n, each once, in the job's metrics.
fn steps_not_once(metrics: &Path) -> Result<Vec<String>> {
    let mut steps: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for line in std::fs::read_to_string(metrics)?.lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if v["event"] == "step" {
            steps
                .entry(v["stage"].as_str().unwrap_or_default().to_string())
                .or_default()
                .push(v["step"].as_u64().unwrap_or_default());
        }
    }
    Ok(steps
        .into_iter()
        .filter(|(_, s)| *s != (1..=s.len() as u64).collect::<Vec<_>>())
        .map(|(stage, _)| stage)
        .collect())
}

fn report(
    args: &ChaosArgs,
    bins: &Binaries,
    dir: &Path,
    specs: &[PathBuf],
    jobs: &[pb::Job],
    disturbed: &Disturbed,
) -> Result<()> {
    println!();
    println!(
        "| job | state | task attempts | committed states | steps once | model and loss = standalone |"
    );
    println!("|---|---|---:|---|---|---|");
    let mut failures = Vec::new();
    for (i, (job, spec)) in jobs.iter().zip(specs).enumerate() {
        let succeeded = job.state == pb::JobState::Succeeded as i32;
        let attempts: u32 = job.tasks.iter().map(|t| t.attempts).sum();
        let run_dir = PathBuf::from(&job.run_dir);
        let (states, steps, same) = if succeeded {
            let states = committed_twice(&run_dir)?;
            let steps = steps_not_once(&run_dir.join("metrics.jsonl"))?;
            let alone = dir.join(format!("alone-{i}"));
            let out = Command::new(bins.path(WORKER))
                .args(["train", &spec.display().to_string(), "--quiet", "--out"])
                .arg(&alone)
                .env("SEGPROP_LOG", "warn")
                .output()?;
            anyhow::ensure!(
                out.status.success(),
                "standalone run of {}: {}",
                spec.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let same = outputs(&run_dir)? == outputs(&alone)?;
            (states, steps, same)
        } else {
            (Vec::new(), Vec::new(), false)
        };
        let ok = succeeded && states.is_empty() && steps.is_empty() && same;
        if !ok {
            failures.push(format!(
                "{}: state {}, error {:?}, stages not committed once {states:?}, steps not \
                 once {steps:?}, equal to standalone {same}",
                job.job_id, job.state, job.error
            ));
        }
        println!(
            "| {} | {} | {attempts} (for {} tasks) | {} | {} | {} |",
            job.job_id,
            segprop_coordinator::client::job_state_name(job.state),
            job.tasks.len(),
            if states.is_empty() {
                "one per stage"
            } else {
                "NO"
            },
            if steps.is_empty() { "yes" } else { "NO" },
            if same { "yes" } else { "NO" },
        );
    }
    println!();
    println!(
        "{} jobs, {} workers: {} worker kills, {} coordinator kills, {:.0} s; {}",
        args.jobs,
        args.workers,
        disturbed.worker_kills,
        disturbed.coordinator_kills,
        disturbed.wall.as_secs_f64(),
        if failures.is_empty() {
            "every check passed".to_string()
        } else {
            format!("{} jobs failed a check", failures.len())
        }
    );
    anyhow::ensure!(
        disturbed.coordinator_kills == args.coordinator_restarts,
        "the jobs ended before every coordinator restart ({} of {})",
        disturbed.coordinator_kills,
        args.coordinator_restarts
    );
    anyhow::ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}
