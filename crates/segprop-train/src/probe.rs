//! Measurements of one training step on the CPU engine, for validating the planner
//! (docs/planner.md): the peak heap above what the process held before (a counting global
//! allocator must be installed: [`crate::alloc::CountingAllocator`]), and the matmul FLOPs the
//! model launched ([`segprop_model::flops`]).
//!
//! The step is the engine's own [`Trainer::train_step`] on one micro-batch, after warmup steps
//! that allocate the optimizer state, so the peak is the steady state of training.

use std::path::Path;

use segprop_core::{JobSpec, StageKind, StagePlanEntry};

use crate::alloc;
use crate::engine::Trainer;
use crate::error::TrainError;
use crate::route::RouteInput;
use crate::{CpuBackend, data::Dataset};

/// What one step of a stage held and launched.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepProbe {
    /// Peak live heap bytes during the measured step, above the bytes held before the trainer
    /// was built, less the tokenized dataset (which the planner does not model).
    pub peak_bytes: u64,
    /// Peak of the step's forward and backward passes (up to the accumulated gradients), and of
    /// its optimizer update; `peak_bytes` is the larger.
    pub backward_peak_bytes: u64,
    pub update_peak_bytes: u64,
    /// Live heap bytes between steps (weights, optimizer state), measured the same way.
    pub resident_bytes: u64,
    /// Matmul FLOPs launched by the measured step: forward (including recompute), and the
    /// backward matmuls autodiff runs for them.
    pub forward_flops: u64,
    pub backward_flops: u64,
    /// Tokens of the measured step.
    pub tokens: u64,
}

/// Heap bytes of a tokenized dataset (inputs and targets, i64).
fn dataset_bytes(data: &Dataset) -> u64 {
    data.train
        .iter()
        .chain(&data.eval)
        .map(|b| ((b.inputs.capacity() + b.targets.capacity()) * 8) as u64)
        .sum()
}

/// Trains `warmup` steps of stage `kind` of `spec`, then measures one more. With `snapcheck`,
/// the stage's prefix snapshots are computed first and the step reads them (a stage-2 segment
/// with SnapCheck); without, a segment recomputes its frozen prefix forward-only.
pub fn step(
    spec: JobSpec,
    kind: StageKind,
    warmup: usize,
    work_dir: &Path,
) -> Result<StepProbe, TrainError> {
    warm_backend(&spec, kind, work_dir)?;
    let before = alloc::current_bytes().unwrap_or(0) as u64;
    let mut stage = Stage::new(spec, kind, work_dir)?;
    let data = dataset_bytes(&stage.trainer.data);
    for _ in 0..warmup.max(1) {
        stage.step();
    }
    let resident = alloc::current_bytes().unwrap_or(0) as u64;
    alloc::reset_peak();
    let flops_before = segprop_model::flops::snapshot();
    stage.step();
    let flops = segprop_model::flops::snapshot().since(flops_before);
    let update = alloc::peak_bytes().unwrap_or(0) as u64;
    let backward = alloc::first_phase_peak().unwrap_or(0) as u64;
    let above = |bytes: u64| bytes.saturating_sub(before).saturating_sub(data);
    Ok(StepProbe {
        peak_bytes: above(update.max(backward)),
        backward_peak_bytes: above(backward),
        update_peak_bytes: above(update),
        resident_bytes: above(resident),
        forward_flops: flops.forward,
        backward_flops: flops.backward,
        tokens: (stage.batch.batch * stage.batch.seq) as u64,
    })
}

/// One stage of a job set up to train its first batch again and again: the prefix frozen and,
/// with SnapCheck, its snapshots filled.
struct Stage {
    trainer: Trainer<CpuBackend>,
    route: crate::route::Route,
    trainable: crate::params::Trainable,
    opt: crate::params::AdamWOptimizer<CpuBackend>,
    batch: crate::data::Batch,
    micro: usize,
    lr: f64,
}

impl Stage {
    fn new(spec: JobSpec, kind: StageKind, work_dir: &Path) -> Result<Self, TrainError> {
        let mut trainer = Trainer::<CpuBackend>::new(spec, Default::default(), work_dir)?;
        let entry = StagePlanEntry {
            index: 0,
            name: kind.name(),
            kind,
        };
        let route = trainer.route(&entry);
        let trainable = trainer.trainable(route);
        let opt = trainer.new_optimizer();
        if let RouteInput::Prefix { depth } = route.input() {
            trainer.freeze_prefix(depth);
            if trainer.cache.is_some() {
                trainer.fill_snapshots(depth, depth);
            }
        }
        Ok(Self {
            batch: trainer.data.train[0].clone(),
            lr: trainer.spec.optimizer.lr,
            micro: trainer.spec.micro_batch(&entry.name),
            trainer,
            route,
            trainable,
            opt,
        })
    }

    fn step(&mut self) {
        let Self {
            trainer,
            route,
            trainable,
            opt,
            batch,
            micro,
            lr,
        } = self;
        trainer.train_step(*route, &[&*batch], *micro, trainable, opt, *lr);
    }
}

/// The first training step of a process allocates what the process then keeps for good: the
/// backend's thread pool and its matmul kernels' per-thread packing buffers. They are not the
/// step's memory (a worker pays them once), so the first probe of a process trains one
/// throwaway step of its own job before it reads the heap.
fn warm_backend(spec: &JobSpec, kind: StageKind, work_dir: &Path) -> Result<(), TrainError> {
    static WARM: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if WARM.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Ok(());
    }
    let dir = work_dir.join("backend-warmup");
    Stage::new(spec.clone(), kind, &dir)?.step();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One configuration's prediction against its measurement.
#[derive(Debug, Clone)]
pub struct Validation {
    pub preset: String,
    pub workload: String,
    /// Sequences of the measured batch, and of each of its passes.
    pub batch: usize,
    pub micro_batch: usize,
    pub seq_len: usize,
    pub predicted: segprop_core::planner::CpuStep,
    pub measured: StepProbe,
    /// The planner's matmul FLOPs of the step (forward incl. recompute, backward), with the
    /// CPU engine's dense masked attention.
    pub predicted_forward_flops: f64,
    pub predicted_backward_flops: f64,
}

impl Validation {
    /// `measured / predicted − 1` of the peak heap.
    pub fn memory_error(&self) -> f64 {
        self.measured.peak_bytes as f64 / self.predicted.peak() as f64 - 1.0
    }

    /// `launched / predicted − 1` of all matmul FLOPs of the step.
    pub fn flops_error(&self) -> f64 {
        (self.measured.forward_flops + self.measured.backward_flops) as f64
            / (self.predicted_forward_flops + self.predicted_backward_flops)
            - 1.0
    }
}

/// Runs the planner's comparison workloads that the CPU engine runs unsharded (e2e, SegProp
/// stage 1, the last stage-2 segment with and without SnapCheck) for `preset` with base depth
/// `p`, head depth `r`, segment size `k`, and compares each measured step with the planner: one
/// batch of `batch` sequences, in passes of `micro_batch`.
pub fn validate_planner(
    preset: &str,
    (p, r, k): (usize, usize, usize),
    (batch, micro_batch): (usize, usize),
    seq_len: usize,
    work_dir: &Path,
) -> Result<Vec<Validation>, TrainError> {
    use segprop_core::planner::{self, AttentionKernel, CpuProfile};

    let text = |regime: &str| {
        format!(
            "version: 1\nname: planner-validation\nmodel: {{ preset: {preset} }}\n\
             data: {{ corpus: builtin:synthetic, seq_len: {seq_len}, batch_size: {batch}, \
             micro_batch: {micro_batch}, synthetic_tokens: {} }}\n{regime}\n\
             optimizer: {{ lr: 1.0e-3 }}\nseed: 3\n",
            (batch * seq_len * 8).max(20_000)
        )
    };
    let config = JobSpec::from_yaml_str(&text("regime: e2e"), "planner validation")?
        .resolve_model_config()?;
    let n = config.num_layers;
    let workloads = planner::comparison(n, p, r, k);
    let segment = StageKind::Segment {
        start: n - r - k,
        end: n - r,
    };
    let segprop = |snapcheck: bool| {
        format!(
            "regime: segprop\nsegprop: {{ base_depth: {p}, head_layers: {r}, segment_size: {k}, \
             snapcheck: {snapcheck}, snapcheck_memory_bytes: 0 }}"
        )
    };
    let cases = [
        (0, StageKind::E2e, "regime: e2e".to_string()),
        (3, StageKind::Stage1 { base_depth: p }, segprop(false)),
        (4, segment, segprop(true)),
        (5, segment, segprop(false)),
    ];
    let mut rows = Vec::new();
    for (index, kind, regime) in cases {
        let w = &workloads[index];
        let spec = JobSpec::from_yaml_str(&text(&regime), "planner validation")?;
        let dir = work_dir.join(format!("case-{index}"));
        let measured = step(spec, kind, 1, &dir)?;
        let (fwd, bwd, recompute) =
            planner::step_flops_per_token(&config, w, seq_len, AttentionKernel::DenseMasked);
        let tokens = (batch * seq_len) as f64;
        rows.push(Validation {
            preset: preset.to_string(),
            workload: w.name.clone(),
            batch,
            micro_batch,
            seq_len,
            predicted: planner::cpu_step_in_passes(
                &config,
                &CpuProfile::FLEX_F32,
                w,
                (1, batch, micro_batch),
                seq_len,
            ),
            measured,
            predicted_forward_flops: (fwd + recompute) * tokens,
            predicted_backward_flops: bwd * tokens,
        });
    }
    Ok(rows)
}
