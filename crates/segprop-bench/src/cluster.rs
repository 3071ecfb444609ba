//! `segprop-bench snapcheck-cluster`: stage-2 wall time of a 16-block SegProp job run by real
//! coordinator and worker processes, with distributed SnapCheck on 2 workers vs 1 worker vs
//! SnapCheck off. Stage 2 runs from the moment stage 1 is committed to the moment the last
//! segment is, so it includes every snapshot advance (the first full prefix forward too).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use segprop_proto::v1 as pb;
use segprop_proto::v1::job_service_client::JobServiceClient;

use crate::median;

const TOKEN: &str = "bench-token";

/// A configuration of the comparison.
struct Setup {
    name: &'static str,
    workers: usize,
    snapcheck: bool,
}

const SETUPS: [Setup; 3] = [
    Setup {
        name: "snapcheck, 2 workers",
        workers: 2,
        snapcheck: true,
    },
    Setup {
        name: "snapcheck, 1 worker",
        workers: 1,
        snapcheck: true,
    },
    Setup {
        name: "snapcheck off, 1 worker",
        workers: 1,
        snapcheck: false,
    },
];

fn spec(setup: &Setup, steps: u64) -> String {
    format!(
        "version: 1
name: bench-16
model: {{ preset: tiny, overrides: {{ num_layers: 16 }} }}
data: {{ corpus: builtin:synthetic, seq_len: 64, batch_size: 8, eval_fraction: 0.05, synthetic_tokens: 20000 }}
regime: segprop
segprop:
  base_depth: 2
  head_layers: 2
  segment_size: 2
  head_policy: persistent
  snapcheck: {}
  snapshot_shards: {}
  exit: {{ stage1: {{ max_steps: 10 }}, segment: {{ max_steps: {steps} }} }}
optimizer: {{ lr: 3.0e-3, grad_clip: 1.0 }}
eval: {{ every_steps: 1000, max_batches: 2 }}
checkpoint: {{ every_steps: 0 }}
seed: 5
",
        setup.snapcheck, setup.workers
    )
}

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Stage-2 wall seconds of one run of `setup`.
fn run_once(bin_dir: &Path, dir: &Path, setup: &Setup, steps: u64) -> Result<f64> {
    std::fs::create_dir_all(dir)?;
    let mut coord = Command::new(bin_dir.join("segprop-coord"))
        .arg("serve")
        .env("SEGPROP_TOKEN", TOKEN)
        .env("SEGPROP_LISTEN", "127.0.0.1:0")
        .env("SEGPROP_STATE_DIR", dir.join("state"))
        .env("SEGPROP_ARTIFACT_ROOT", dir.join("artifacts"))
        .env("SEGPROP_HEARTBEAT_INTERVAL_MS", "200")
        .env("SEGPROP_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start segprop-coord")?;
    let mut line = String::new();
    if let Some(out) = coord.stdout.take() {
        BufReader::new(out).read_line(&mut line)?;
    }
    let mut children = Killed(vec![coord]);
    let addr = line
        .trim()
        .strip_prefix("coordinator listening on ")
        .with_context(|| format!("unexpected coordinator output {line:?}"))?
        .to_string();
    for w in 0..setup.workers {
        children.0.push(
            Command::new(bin_dir.join("segprop-worker"))
                .args(["serve", "--coordinator", &format!("http://{addr}")])
                .args(["--name", &format!("w{w}"), "--work-dir"])
                .arg(dir.join(format!("w{w}")))
                .env("SEGPROP_TOKEN", TOKEN)
                .env("SEGPROP_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start segprop-worker")?,
        );
    }
    let spec_path = dir.join("job.yaml");
    std::fs::write(&spec_path, spec(setup, steps))?;
    let submitted = Command::new(bin_dir.join("segprop-coord"))
        .arg("submit")
        .arg(&spec_path)
        .env("SEGPROP_COORDINATOR", format!("http://{addr}"))
        .env("SEGPROP_TOKEN", TOKEN)
        .output()?;
    anyhow::ensure!(
        submitted.status.success(),
        "submit failed: {}",
        String::from_utf8_lossy(&submitted.stderr)
    );
    let job_id = String::from_utf8_lossy(&submitted.stdout)
        .trim()
        .to_string();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut client = JobServiceClient::connect(format!("http://{addr}")).await?;
        let mut stage1_done: Option<Instant> = None;
        let started = Instant::now();
        loop {
            let mut req = tonic::Request::new(pb::GetJobRequest {
                job_id: job_id.clone(),
            });
            req.metadata_mut()
                .insert("authorization", format!("Bearer {TOKEN}").parse()?);
            let job = client.get_job(req).await?.into_inner();
            let succeeded = |t: &pb::Task| t.state == pb::TaskState::Succeeded as i32;
            if job.state == pb::JobState::Failed as i32
                || job.state == pb::JobState::Cancelled as i32
            {
                anyhow::bail!("{}: job ended {}: {}", setup.name, job.state, job.error);
            }
            if stage1_done.is_none() && job.tasks.first().is_some_and(succeeded) {
                stage1_done = Some(Instant::now());
            }
            let segments: Vec<&pb::Task> = job
                .tasks
                .iter()
                .filter(|t| t.name.starts_with("segment-"))
                .collect();
            if let Some(t0) = stage1_done
                && !segments.is_empty()
                && segments.iter().all(|t| succeeded(t))
            {
                return Ok(t0.elapsed().as_secs_f64());
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(1800),
                "{}: timed out",
                setup.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

pub fn snapcheck_cluster(reps: usize, steps: u64) -> Result<()> {
    let here = std::env::current_exe()?;
    let bin_dir: PathBuf = here
        .parent()
        .context("the bench binary has no directory")?
        .to_path_buf();
    anyhow::ensure!(
        bin_dir.join("segprop-coord").is_file() && bin_dir.join("segprop-worker").is_file(),
        "build the binaries first: cargo build --release"
    );
    let tmp = tempfile::tempdir()?;
    let mut walls: Vec<Vec<f64>> = vec![Vec::new(); SETUPS.len()];
    for rep in 0..reps.max(1) {
        // Rotate the order so drift on the machine favours no setup.
        for k in 0..SETUPS.len() {
            let i = (k + rep) % SETUPS.len();
            let setup = &SETUPS[i];
            let wall = run_once(
                &bin_dir,
                &tmp.path().join(format!("rep{rep}-{i}")),
                setup,
                steps,
            )?;
            println!("rep {rep}: {:<24} stage-2 wall {wall:.2} s", setup.name);
            walls[i].push(wall);
        }
    }
    let base = median(&walls[1]);
    println!("median stage-2 wall (16 blocks, segments of 2, {steps} steps each):");
    for (setup, w) in SETUPS.iter().zip(&walls) {
        println!(
            "  {:<24} {:.2} s   x{:.2} of 1-worker SnapCheck",
            setup.name,
            median(w),
            median(w) / base
        );
    }
    Ok(())
}
