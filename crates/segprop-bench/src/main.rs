//! `segprop-bench`: the measurements behind docs/benchmarks.md. Every number is a ratio or a
//! rate measured side by side in one run; run each subcommand on an otherwise idle machine.
//!
//! - `backends`: training throughput of burn's CPU backends (flex vs ndarray) on the same steps;
//! - `matmul`: the machine's square-matmul rate on the training backend (the GFLOP/s ceiling);
//! - `throughput`: training tokens/s and achieved GFLOP/s of the tiny and small presets;
//! - `snapcheck`: stage-2 step time with SnapCheck vs recomputing a p-layer prefix (p = 4, 8, 12
//!   of 16 blocks), and the achieved fraction of the ideal speedup;
//! - `memory`: peak heap of one training step for e2e, stage 1 and every stage-2 segment of a
//!   16-block model at the same batch (a counting global allocator).
//! - `precision`: step time and loss of bf16 and f16 (flex) against f32 (ndarray and flex) on
//!   the same steps, and the bytes of frozen weights and snapshots per precision beside the
//!   planner's prediction;
//! - `shard`: step time of `full_shard` on 2 and 4 CPU ranks (and activation checkpointing) vs
//!   unsharded, and the wire bytes per step vs the FSDP schedule;
//! - `orchestration`: wall time of a job (default: the demo) through `segprop-coord demo`
//!   (coordinator + worker daemon + store, stage tasks with checkpoints) vs `segprop-worker train`
//!   standalone, alternating runs of the release binaries next to this one;
//! - `loadtest`: a real `segprop-coord serve` process under many simulated workers over gRPC
//!   (dispatch latency, coordinator CPU and memory; `src/loadtest/`);
//! - `gpu-check` (feature `cuda`; `nccl` for the NCCL collective): `full_shard` gangs of one
//!   rank on `cuda:0`, with CPU offload and with device-resident shards, against a plain rank,
//!   the same loss curve expected; a bf16
//!   SegProp job on a 70B-width slice with each stage's device memory against the planner; one
//!   70B-width block's forward + backward against PyTorch.

mod chaos;
mod cluster;
#[cfg(feature = "cuda")]
mod gpu_check;
#[cfg(feature = "cuda")]
mod gpu_slice;
mod loadtest;
mod never_whole;
mod planner;
mod precision;
mod procs;
mod rng;
mod shard;
mod throughput;

use std::time::Instant;

use anyhow::{Context, Result};
use burn::backend::{Autodiff, Flex, NdArray};
use burn::tensor::backend::AutodiffBackend;
use clap::{Parser, Subcommand};
use segprop_core::{JobSpec, StageKind, StagePlanEntry};
use segprop_train::CpuBackend;
use segprop_train::Trainer;
use segprop_train::alloc::{self, CountingAllocator};
use segprop_train::data::Batch;
use segprop_train::route::{Route, RouteInput};
use throughput::throughput;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

#[derive(Parser)]
#[command(
    name = "segprop-bench",
    about = "segprop benchmarks (docs/benchmarks.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Timed optimizer steps per measurement (after warmup).
    #[arg(long, global = true, default_value_t = 12)]
    steps: usize,
    /// Backend for `throughput` and `snapcheck`: `cpu`, or `cuda` (build with `--features cuda`).
    #[arg(long, global = true, default_value = "cpu")]
    backend: String,
}

#[derive(Subcommand)]
enum Command {
    Backends,
    /// Demo job through coordinator + worker vs standalone `segprop-worker train` (`--reps`).
    Orchestration {
        #[arg(long, default_value_t = 2)]
        reps: usize,
        /// Job spec to run (default: the built-in demo job).
        #[arg(long)]
        job: Option<std::path::PathBuf>,
    },
    /// Stage-2 wall of a 16-block job: distributed SnapCheck on 2 workers vs 1 vs SnapCheck off
    /// (real coordinator and worker processes; build them first with `cargo build --release`).
    SnapcheckCluster {
        #[arg(long, default_value_t = 2)]
        reps: usize,
        /// Training steps of each stage-2 segment.
        #[arg(long, default_value_t = 20)]
        segment_steps: u64,
    },
    /// Sharding overhead on CPU ranks and bytes moved per step (`--reps` rounds).
    Shard {
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    Matmul,
    /// Mixed precision on CPU: bf16/f16 against f32, step time, loss, bytes.
    Precision,
    /// The coordinator under load: many simulated workers over real gRPC against a real
    /// `segprop-coord serve` process (dispatch latency, coordinator CPU and memory).
    Loadtest(loadtest::LoadtestArgs),
    /// The control plane under failures: jobs on real worker processes while workers and the
    /// coordinator are SIGKILLed and restarted; every job must end as its undisturbed run.
    Chaos(chaos::ChaosArgs),
    /// Peak heap of a whole sharded job with the model never whole vs whole between stages.
    NeverWhole {
        #[arg(long, default_value_t = 3)]
        reps: usize,
    },
    /// Training tokens/s and GFLOP/s of the reference shape and the presets (`--peers`: the
    /// reference shape against PyTorch, run from the repository root).
    Throughput {
        #[arg(long)]
        peers: bool,
        /// Only this model: `reference`, `tiny` or `small` (for a profiler).
        #[arg(long)]
        only: Option<String>,
    },
    Snapcheck,
    Memory,
    /// The planner's CPU memory and FLOPs predictions vs measurement.
    Planner {
        #[arg(long)]
        explore: bool,
    },
    /// On a GPU: sharded gangs of one rank (NCCL with feature `nccl`, activation checkpointing;
    /// CPU offload, then device-resident shards) against a plain rank on `cuda:0`; a bf16
    /// SegProp slice of 70B width against the planner; a 70B-width block against PyTorch.
    GpuCheck,
    /// Everything above, in order.
    All,
}

/// Wall seconds of one run of `bin args…` (stdout and stderr discarded; a failure is an error).
fn timed_run(bin: &std::path::Path, args: &[&std::ffi::OsStr]) -> Result<f64> {
    let started = Instant::now();
    let status = std::process::Command::new(bin)
        .args(args)
        .env("SEGPROP_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    anyhow::ensure!(
        status.success(),
        "{} {:?} failed: {status}",
        bin.display(),
        args
    );
    Ok(started.elapsed().as_secs_f64())
}

fn orchestration(reps: usize, job: Option<&std::path::Path>) -> Result<()> {
    let here = std::env::current_exe()?;
    let coord = here.with_file_name("segprop-coord");
    let worker = here.with_file_name("segprop-worker");
    anyhow::ensure!(
        coord.is_file() && worker.is_file(),
        "build the binaries first: cargo build --release"
    );
    let tmp = tempfile::tempdir()?;
    let (mut cluster, mut alone) = (Vec::new(), Vec::new());
    for rep in 0..reps.max(1) {
        let cdir = tmp.path().join(format!("cluster-{rep}"));
        let odir = tmp.path().join(format!("alone-{rep}"));
        let mut cargs: Vec<&std::ffi::OsStr> = vec![
            "demo".as_ref(),
            "--quiet".as_ref(),
            "--dir".as_ref(),
            cdir.as_os_str(),
        ];
        let mut wargs: Vec<&std::ffi::OsStr> = vec!["train".as_ref()];
        if let Some(job) = job {
            cargs.extend(["--job".as_ref(), job.as_os_str()]);
            wargs.push(job.as_os_str());
        }
        wargs.extend(["--quiet".as_ref(), "--out".as_ref(), odir.as_os_str()]);
        // Alternate the order so drift on the machine does not favour one side.
        let (c, w) = if rep % 2 == 0 {
            let c = timed_run(&coord, &cargs)?;
            (c, timed_run(&worker, &wargs)?)
        } else {
            let w = timed_run(&worker, &wargs)?;
            (timed_run(&coord, &cargs)?, w)
        };
        println!(
            "rep {rep}: coordinator + worker {c:.1} s, standalone {w:.1} s, ratio {:.3}",
            c / w
        );
        cluster.push(c);
        alone.push(w);
    }
    let ratios: Vec<f64> = cluster.iter().zip(&alone).map(|(c, w)| c / w).collect();
    println!(
        "median: coordinator + worker {:.1} s, standalone {:.1} s; median per-rep ratio {:.3}",
        median(&cluster),
        median(&alone),
        median(&ratios)
    );
    Ok(())
}

fn main() -> Result<()> {
    segprop_train::alloc::keep_freed_memory();
    let cli = Cli::parse();
    match cli.command {
        Command::Backends => backends(cli.steps),
        Command::Orchestration { reps, job } => orchestration(reps, job.as_deref()),
        Command::SnapcheckCluster {
            reps,
            segment_steps,
        } => cluster::snapcheck_cluster(reps, segment_steps),
        Command::Shard { reps } => shard::shard(cli.steps, reps),
        Command::Matmul => throughput::matmul().map(|_| ()),
        Command::Precision => precision::precision(cli.steps),
        Command::NeverWhole { reps } => never_whole::never_whole(reps),
        Command::Loadtest(args) => loadtest::loadtest(args),
        Command::Chaos(args) => chaos::chaos(&args),
        Command::Throughput { .. } | Command::Snapcheck if cli.backend == "cuda" => cuda(&cli),
        Command::Throughput { peers, ref only } => throughput::<CpuBackend>(
            cli.steps,
            &Default::default(),
            "cpu",
            peers,
            only.as_deref(),
        ),
        Command::Snapcheck => snapcheck::<CpuBackend>(cli.steps, &Default::default()),
        Command::Memory => memory(),
        Command::GpuCheck => gpu_check(cli.steps),
        Command::Planner { explore } => {
            if explore {
                planner::explore()
            } else {
                planner::validate()
            }
        }
        Command::All => {
            backends(cli.steps)?;
            throughput::<CpuBackend>(cli.steps, &Default::default(), "cpu", false, None)?;
            snapcheck::<CpuBackend>(cli.steps, &Default::default())?;
            memory()
        }
    }
}

/// `throughput` / `snapcheck` on the first CUDA device.
#[cfg(feature = "cuda")]
fn cuda(cli: &Cli) -> Result<()> {
    use segprop_train::cuda::{CudaBackend, cuda_available};
    anyhow::ensure!(cuda_available(), "no CUDA driver on this machine");
    let device = burn::backend::cuda::CudaDevice::new(0);
    match cli.command {
        Command::Snapcheck => snapcheck::<CudaBackend>(cli.steps, &device),
        _ => throughput::<CudaBackend>(cli.steps, &device, "cuda", false, None),
    }
}

#[cfg(feature = "cuda")]
fn gpu_check(steps: usize) -> Result<()> {
    gpu_check::gpu_check(steps)
}

#[cfg(not(feature = "cuda"))]
fn gpu_check(_steps: usize) -> Result<()> {
    anyhow::bail!("segprop-bench was built without the `cuda` feature (use --features nccl)")
}

#[cfg(not(feature = "cuda"))]
fn cuda(_cli: &Cli) -> Result<()> {
    anyhow::bail!("segprop-bench was built without the `cuda` feature")
}

/// A job spec for benchmarks: `model` and `data` YAML fragments, segprop with p, r.
fn spec(model: &str, data: &str, regime: &str) -> Result<JobSpec> {
    let text = format!(
        "version: 1\nname: bench\nmodel: {model}\ndata: {data}\n{regime}\n\
         optimizer: {{ lr: 1.0e-3 }}\neval: {{ every_steps: 100000, max_batches: 1 }}\nseed: 3\n"
    );
    JobSpec::from_yaml_str(&text, "bench").context("bench spec")
}

fn entry(kind: StageKind) -> StagePlanEntry {
    StagePlanEntry {
        index: 0,
        name: kind.name(),
        kind,
    }
}

/// Median seconds per optimizer step of `route` over `steps` steps after `warmup` steps.
fn time_steps<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    route: Route,
    warmup: usize,
    steps: usize,
) -> f64 {
    let trainable = trainer.trainable(route);
    let mut opt = trainer.new_optimizer();
    if let RouteInput::Prefix { depth } = route.input() {
        trainer.freeze_prefix(depth);
    }
    let batches: Vec<Batch> = trainer.data.train.iter().take(4).cloned().collect();
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let batch = &batches[i % batches.len()];
        let start = Instant::now();
        trainer.train_step(route, &[batch], 0, &trainable, &mut opt, 1e-3);
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    median(&times)
}

/// Like [`time_steps`] for several trainers, one step of each in turn, so that machine noise and
/// drift hit every variant alike. Returns the median seconds per step of each.
fn time_interleaved<B: AutodiffBackend>(
    runs: &mut [(&mut Trainer<B>, Route)],
    warmup: usize,
    steps: usize,
) -> Vec<f64> {
    let mut state: Vec<_> = runs
        .iter_mut()
        .map(|(t, route)| {
            if let RouteInput::Prefix { depth } = route.input() {
                t.freeze_prefix(depth);
            }
            let batches: Vec<Batch> = t.data.train.iter().take(4).cloned().collect();
            (
                t.trainable(*route),
                t.new_optimizer(),
                batches,
                Vec::with_capacity(steps),
            )
        })
        .collect();
    for i in 0..warmup + steps {
        for ((t, route), (trainable, opt, batches, times)) in runs.iter_mut().zip(state.iter_mut())
        {
            let batch = &batches[i % batches.len()];
            let start = Instant::now();
            t.train_step(*route, &[batch], 0, trainable, opt, 1e-3);
            if i >= warmup {
                times.push(start.elapsed().as_secs_f64());
            }
        }
    }
    state.iter_mut().map(|s| median(&s.3)).collect()
}

/// The median of `values` (the mean of the middle two for an even count; NaN when empty).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn tokens_per_step(trainer: &Trainer<impl AutodiffBackend>) -> f64 {
    (trainer.spec.data.batch_size.get() * trainer.spec.data.seq_len) as f64
}

/// Training FLOPs per token of a full forward+backward: 6 x matmul params + attention scores.
fn flops_per_token(config: &segprop_core::LlamaConfig, seq: usize) -> f64 {
    let matmul_params = config.num_layers as u64
        * (config.block_params() - 2 * config.hidden_size as u64)
        + (config.vocab_size * config.hidden_size) as u64;
    6.0 * matmul_params as f64 + 6.0 * (config.num_layers * seq * config.hidden_size) as f64
}

fn backends(steps: usize) -> Result<()> {
    println!("## CPU backends: e2e training step, same job, same steps");
    println!("| model | flex tok/s | ndarray tok/s | flex / ndarray |");
    println!("|---|---:|---:|---:|");
    for (label, model) in [
        ("tiny (h=64, 8 blocks)", "{ preset: tiny }"),
        (
            "h=256, 4 blocks",
            "{ preset: tiny, overrides: { hidden_size: 256, intermediate_size: 768, num_layers: 4 } }",
        ),
        (
            "reference (h=256, 8 blocks, 8/2 heads, vocab 512)",
            throughput::REFERENCE_MODEL,
        ),
    ] {
        let s = spec(
            model,
            "{ corpus: builtin:synthetic, seq_len: 64, batch_size: 16, synthetic_tokens: 40000 }",
            "regime: e2e",
        )?;
        let dir = tempfile::tempdir()?;
        let mut flex = Trainer::<Autodiff<Flex>>::new(s.clone(), Default::default(), dir.path())?;
        let mut nd = Trainer::<Autodiff<NdArray>>::new(s, Default::default(), dir.path())?;
        let route = Route::Full {
            num_layers: flex.config.num_layers,
        };
        // Alternate rounds of steps so drift hits both backends alike.
        let (mut tf, mut tn) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            tf.push(time_steps(&mut flex, route, 1, steps.div_ceil(3)));
            tn.push(time_steps(&mut nd, route, 1, steps.div_ceil(3)));
        }
        let (t_flex, t_nd) = (median(&tf), median(&tn));
        let tok = tokens_per_step(&flex);
        println!(
            "| {label} | {:.0} | {:.0} | {:.2} |",
            tok / t_flex,
            tok / t_nd,
            t_nd / t_flex
        );
    }
    Ok(())
}

const MODEL16: &str = "{ preset: tiny, overrides: { hidden_size: 128, intermediate_size: 384, num_layers: 16, num_heads: 4, num_kv_heads: 2 } }";
const DATA16: &str =
    "{ corpus: builtin:synthetic, seq_len: 128, batch_size: 8, synthetic_tokens: 60000 }";

fn snapcheck<B: AutodiffBackend>(steps: usize, device: &B::Device) -> Result<()> {
    println!("## SnapCheck: stage-2 step time, 16 blocks, segment [p, p+1), r = 2");
    println!(
        "| p | recompute prefix (ms) | SnapCheck (ms) | segment + head alone (ms) | speedup | ideal | of ideal |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for p in [4usize, 8, 12] {
        let regime = format!(
            "regime: segprop\nsegprop: {{ base_depth: {p}, head_layers: 2, snapcheck: SNAP }}"
        );
        let dir = tempfile::tempdir()?;
        let plain_spec = spec(MODEL16, DATA16, &regime.replace("SNAP", "false"))?;
        let mut plain = Trainer::<B>::new(plain_spec.clone(), device.clone(), dir.path())?;
        let mut cached = Trainer::<B>::new(
            spec(MODEL16, DATA16, &regime.replace("SNAP", "true"))?,
            device.clone(),
            dir.path(),
        )?;
        let route = plain.route(&entry(StageKind::Segment {
            start: p,
            end: p + 1,
        }));
        // The ideal: the same segment and LL(r) with no prefix at all (blocks p, 14, 15 only;
        // the input is the embedding lookup, which costs next to nothing).
        let mut alone = Trainer::<B>::new(plain_spec, device.clone(), dir.path())?;
        alone.model = alone.model.clone().retain_blocks(&[p, 14, 15]);
        alone.config.num_layers = 3;
        let alone_route = Route::Segment {
            start: 0,
            end: 1,
            head_start: 1,
            num_layers: 3,
        };
        // Warmup covers the 4 batches once, so SnapCheck's cache is filled before timing.
        let times = time_interleaved(
            &mut [
                (&mut plain, route),
                (&mut cached, route),
                (&mut alone, alone_route),
            ],
            4,
            steps,
        );
        let (t_plain, t_snap, t_alone) = (times[0], times[1], times[2]);
        let speedup = t_plain / t_snap;
        let ideal = t_plain / t_alone;
        println!(
            "| {p} | {:.1} | {:.1} | {:.1} | {speedup:.2}x | {ideal:.2}x | {:.0}% |",
            t_plain * 1e3,
            t_snap * 1e3,
            t_alone * 1e3,
            100.0 * speedup / ideal
        );
    }
    println!("(ideal = recompute / (segment + head alone); of ideal = speedup / ideal)");
    Ok(())
}

fn memory() -> Result<()> {
    println!("## Peak heap of one training step, 16 blocks, batch 8 x 128, p = 2, r = 2");
    println!("| stage | trainable params | peak MiB | of e2e |");
    println!("|---|---:|---:|---:|");
    let mut kinds = vec![StageKind::E2e, StageKind::Stage1 { base_depth: 2 }];
    kinds.extend((2..14).map(|q| StageKind::Segment {
        start: q,
        end: q + 1,
    }));
    let mut e2e_peak = 0.0;
    let mut worst_ratio: f64 = 0.0;
    for kind in kinds {
        let regime = match kind {
            StageKind::E2e => "regime: e2e".to_string(),
            // Snapshots spill to disk (budget 0) so only the batch in use is in memory, as on a
            // GPU whose snapshots live in the store.
            _ => "regime: segprop\nsegprop: { base_depth: 2, head_layers: 2, snapcheck: true, snapcheck_memory_bytes: 0 }".to_string(),
        };
        let dir = tempfile::tempdir()?;
        let before = alloc::current_bytes().unwrap_or(0);
        let mut t = Trainer::<CpuBackend>::new(
            spec(MODEL16, DATA16, &regime)?,
            Default::default(),
            dir.path(),
        )?;
        let route = t.route(&entry(kind));
        let trainable = t.trainable(route);
        let params = segprop_train::engine::count_params(&t.model, &trainable.all());
        let mut opt = t.new_optimizer();
        if let RouteInput::Prefix { depth } = route.input() {
            t.freeze_prefix(depth);
        }
        let batch = t.data.train[0].clone();
        // Two warmup steps allocate the optimizer state; then measure one step.
        for _ in 0..2 {
            t.train_step(route, &[&batch], 0, &trainable, &mut opt, 1e-3);
        }
        alloc::reset_peak();
        t.train_step(route, &[&batch], 0, &trainable, &mut opt, 1e-3);
        let peak =
            alloc::peak_bytes().unwrap_or(0).saturating_sub(before) as f64 / (1 << 20) as f64;
        if kind == StageKind::E2e {
            e2e_peak = peak;
        } else if matches!(kind, StageKind::Segment { .. }) {
            worst_ratio = worst_ratio.max(peak / e2e_peak);
        }
        println!(
            "| {} | {params} | {peak:.1} | {:.2} |",
            kind.name(),
            peak / e2e_peak
        );
        drop(t);
    }
    println!("worst stage-2 segment / e2e: {worst_ratio:.2} (target <= 0.25)");
    Ok(())
}
