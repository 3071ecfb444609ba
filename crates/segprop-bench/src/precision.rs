//! `precision`: mixed precision on the CPU engine. The same steps (same init, same batches) run
//! in f32 on ndarray (the f32 CPU backend), f32 on flex, and bf16 and f16 on flex (the
//! mixed-precision CPU backend, docs/adr/0003-cpu-backends.md), one round of steps of each in
//! turn so machine drift hits them alike. Reported per workload: tokens/s and its ratio to f32,
//! and the largest relative step-loss difference to the f32 run. Then, for a stage-2 segment,
//! the bytes of frozen and held weights and of SnapCheck snapshots per precision, beside the
//! planner's prediction.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::backend::AutodiffBackend;
use segprop_core::planner::{Cluster, plan, preflight::stage_workload};
use segprop_core::{JobSpec, StageKind};
use segprop_train::data::Batch;
use segprop_train::precision::{param_bytes, set_layout};
use segprop_train::route::{Route, RouteInput};
use segprop_train::snapcheck::Split;
use segprop_train::{CpuBackend, CpuHalfBackend, Trainer};

use crate::{entry, median, spec};

/// One variant, ready to step: its trainer, route and optimizer behind a backend-free face.
trait Runner {
    /// One optimizer step on batch `i` (of the four the runner cycles through): (seconds, loss).
    fn step(&mut self, i: usize) -> (f64, f64);
}

struct Prepared<B: AutodiffBackend> {
    trainer: Trainer<B>,
    route: Route,
    trainable: segprop_train::engine::Trainable,
    optimizer: segprop_train::engine::AdamWOptimizer<B>,
    batches: Vec<Batch>,
}

impl<B: AutodiffBackend> Runner for Prepared<B> {
    fn step(&mut self, i: usize) -> (f64, f64) {
        let batch = &self.batches[i % self.batches.len()];
        let start = Instant::now();
        let (loss, _) = self.trainer.train_step(
            self.route,
            &[batch],
            0,
            &self.trainable,
            &mut self.optimizer,
            1e-3,
        );
        (start.elapsed().as_secs_f64(), loss)
    }
}

/// A trainer for stage `kind` of `spec` with the stage's precision layout (fp32 masters for what
/// it trains) and, for a segment, its prefix snapshots cached.
fn prepare<B: AutodiffBackend>(
    spec: JobSpec,
    kind: StageKind,
    dir: &std::path::Path,
) -> Result<Prepared<B>> {
    let mut trainer = Trainer::<B>::new(spec, Default::default(), dir)?;
    let route = trainer.route(&entry(kind));
    let trainable = trainer.trainable(route);
    trainer.model = set_layout(trainer.model.clone(), &trainable.all(), trainer.compute);
    let batches: Vec<Batch> = trainer.data.train.iter().take(4).cloned().collect();
    if let RouteInput::Prefix { depth } = route.input() {
        trainer.freeze_prefix(depth);
        for b in &batches {
            trainer.prefix_output(depth, Split::Train, b);
        }
    }
    let optimizer = trainer.new_optimizer();
    Ok(Prepared {
        trainer,
        route,
        trainable,
        optimizer,
        batches,
    })
}

const VARIANTS: [(&str, &str); 4] = [
    ("f32, ndarray", "f32"),
    ("f32, flex", "f32"),
    ("bf16, flex", "bf16"),
    ("f16, flex", "f16"),
];

fn runner(
    variant: usize,
    spec: JobSpec,
    kind: StageKind,
    dir: &std::path::Path,
) -> Result<Box<dyn Runner>> {
    Ok(match variant {
        0 => Box::new(prepare::<CpuBackend>(spec, kind, dir)?),
        1 => Box::new(prepare::<burn::backend::Autodiff<burn::backend::Flex>>(
            spec, kind, dir,
        )?),
        _ => Box::new(prepare::<CpuHalfBackend>(spec, kind, dir)?),
    })
}

/// A workload: label, model, data, regime, stage.
type Workload = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    StageKind,
);

fn workloads() -> Vec<Workload> {
    vec![
        (
            "e2e, tiny (h=64, 8 blocks), batch 16 x 64",
            "{ preset: tiny }",
            "{ corpus: builtin:synthetic, seq_len: 64, batch_size: 16, synthetic_tokens: 40000 }",
            "regime: e2e",
            StageKind::E2e,
        ),
        (
            "SegProp segment [8, 9), r = 2, SnapCheck, h=128, 16 blocks, batch 8 x 128",
            crate::MODEL16,
            crate::DATA16,
            "regime: segprop\nsegprop: { base_depth: 8, head_layers: 2, snapcheck: true }",
            StageKind::Segment { start: 8, end: 9 },
        ),
    ]
}

pub fn precision(steps: usize) -> Result<()> {
    println!("## Mixed precision on CPU: step time and loss against f32 (same init, same batches)");
    println!(
        "| workload | variant | tok/s | step / f32 ndarray | step / f32 flex | worst loss rel diff vs f32 |"
    );
    println!("|---|---|---:|---:|---:|---:|");
    let rounds = 3;
    let per_round = steps.div_ceil(rounds).max(1);
    for (label, model, data, regime, kind) in workloads() {
        let dir = tempfile::tempdir()?;
        let mut runners = Vec::new();
        for (i, (_, precision)) in VARIANTS.iter().enumerate() {
            let s = spec(
                model,
                data,
                &format!("{regime}\nresources: {{ precision: {precision} }}"),
            )?;
            runners.push(runner(i, s, kind, &dir.path().join(i.to_string()))?);
        }
        let tokens = {
            let s = spec(model, data, regime)?;
            (s.data.batch_size.get() * s.data.seq_len) as f64
        };
        // One warmup step each (allocates the optimizer state), then rounds.
        let mut times = vec![Vec::new(); runners.len()];
        let mut losses = vec![Vec::new(); runners.len()];
        for r in runners.iter_mut() {
            r.step(0);
        }
        for round in 0..rounds {
            for (v, r) in runners.iter_mut().enumerate() {
                for s in 0..per_round {
                    let (t, loss) = r.step(1 + round * per_round + s);
                    times[v].push(t);
                    losses[v].push(loss);
                }
            }
        }
        let medians: Vec<f64> = times.iter().map(|t| median(t)).collect();
        for (v, (name, _)) in VARIANTS.iter().enumerate() {
            let worst = losses[v]
                .iter()
                .zip(&losses[0])
                .map(|(l, f)| (l - f).abs() / f.abs())
                .fold(0.0, f64::max);
            println!(
                "| {label} | {name} | {:.0} | {:.2} | {:.2} | {worst:.2e} |",
                tokens / medians[v],
                medians[v] / medians[0],
                medians[v] / medians[1],
            );
        }
    }
    bytes()
}

/// Frozen and held weights and snapshots of a stage-2 segment per precision, against the planner.
fn bytes() -> Result<()> {
    let kind = StageKind::Segment { start: 8, end: 9 };
    let regime = "regime: segprop\nsegprop: { base_depth: 8, head_layers: 2, snapcheck: true }";
    println!();
    println!(
        "## Bytes per precision: SegProp segment [8, 9) of the 16-block model (h=128), 4 batches of 8 x 128"
    );
    println!(
        "| precision | trained (fp32 masters) | frozen + held weights | planner: frozen + held | snapshots S[8] | formula: batches x b x s x h x a |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for (precision, a) in [("f32", 4u64), ("bf16", 2), ("f16", 2)] {
        let s = spec(
            crate::MODEL16,
            crate::DATA16,
            &format!("{regime}\nresources: {{ precision: {precision} }}"),
        )?;
        let config = s.resolve_model_config()?;
        let dir = tempfile::tempdir()?;
        let (trained, frozen, snapshots) = if precision == "f32" {
            measure::<CpuBackend>(s.clone(), kind, dir.path())?
        } else {
            measure::<CpuHalfBackend>(s.clone(), kind, dir.path())?
        };
        // The planner's per-GPU plan of this stage on one GPU: frozen weights on the device and
        // held weights parked on the host, in the compute dtype.
        let w = stage_workload(&s, &kind, config.num_layers);
        let cluster = Cluster {
            gpus: 1,
            ..Cluster::a100_40g_x8()
        };
        let p = plan(&config, &cluster, &w, 8, 128, a == 2);
        let predicted = p.memory.frozen_weights + p.memory.host;
        let formula = 4 * 8 * 128 * config.hidden_size as u64 * a;
        println!("| {precision} | {trained} | {frozen} | {predicted} | {snapshots} | {formula} |");
    }
    Ok(())
}

/// (trained fp32 bytes, frozen + held bytes, snapshot bytes in memory) of stage `kind`.
fn measure<B: AutodiffBackend>(
    spec: JobSpec,
    kind: StageKind,
    dir: &std::path::Path,
) -> Result<(u64, u64, u64)> {
    let p = prepare::<B>(spec, kind, dir)?;
    let (full, half) = param_bytes::<B, _>(&p.trainer.model);
    let trained = 4 * segprop_train::engine::count_params(&p.trainer.model, &p.trainable.all());
    let frozen = full + half - trained;
    let snapshots = p
        .trainer
        .cache
        .as_ref()
        .map_or(0, |c| c.stats().memory_bytes);
    Ok((trained, frozen, snapshots))
}
