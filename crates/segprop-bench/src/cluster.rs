//! `segprop-bench snapcheck-cluster`: stage-2 wall time of a 16-block SegProp job run by real
//! coordinator and worker processes, with distributed SnapCheck on 2 workers vs 1 worker vs
//! SnapCheck off. Stage 2 runs from the moment stage 1 is committed to the moment the last
//! segment is, so it includes every snapshot advance (the first full prefix forward too).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Result;
use segprop_harness::Binaries;
use segprop_proto::v1 as pb;
use segprop_proto::v1::job_service_client::JobServiceClient;

use crate::median;
use crate::procs;

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

/// Stage-2 wall seconds of one run of `setup`.
fn run_once(bins: &Binaries, dir: &Path, setup: &Setup, steps: u64) -> Result<f64> {
    std::fs::create_dir_all(dir)?;
    let coord = procs::coordinator(bins, dir, "127.0.0.1:0", &[], false)?;
    let addr = coord.addr.clone();
    let _workers = (0..setup.workers)
        .map(|w| procs::worker(bins, dir, &addr, &format!("w{w}"), false))
        .collect::<Result<Vec<_>>>()?;
    let spec_path = dir.join("job.yaml");
    std::fs::write(&spec_path, spec(setup, steps))?;
    let job_id = coord.submit(&spec_path)?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut client = JobServiceClient::connect(format!("http://{addr}")).await?;
        let mut stage1_done: Option<Instant> = None;
        let started = Instant::now();
        loop {
            let job = client.get_job(procs::get_job(&job_id)?).await?.into_inner();
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
    let bins = Binaries::beside_current_exe()?;
    let tmp = tempfile::tempdir()?;
    let mut walls: Vec<Vec<f64>> = vec![Vec::new(); SETUPS.len()];
    for rep in 0..reps.max(1) {
        // Rotate the order so drift on the machine favours no setup.
        for k in 0..SETUPS.len() {
            let i = (k + rep) % SETUPS.len();
            let setup = &SETUPS[i];
            let wall = run_once(
                &bins,
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
