//! Segmented Propagation, as Algorithm 1 of the papers (seeds/002, seeds/003) states it.
//!
//! - **Stage 1** ([`stage1`]): train embed, the base prefix `f^{[0:p]}` and the global head
//!   `LL(r) = f_LM ∘ F_{n-r:n}` jointly, skipping the intermediate blocks; then commit (freeze)
//!   the prefix.
//! - **Stage 2** ([`stage2_segment`]), for each segment `[q, q+k)` of the intermediate blocks:
//!   `z = S[q, batch]` (SnapCheck) or `StopGrad(f^{[0:q]}(x))`; train the segment, the adapter and
//!   LL(r) on `LL(r)(A(F_{q:q+k}(z)))`; [`commit_segment`]: freeze the segment, discard its
//!   adapter, extend the prefix and advance the snapshots `S[q+k, b] = F_{q:q+k}(S[q, b])`.
//!   Head policy `persistent` keeps training LL(r) across segments (TMLR); `reset` returns LL's
//!   decoder blocks to their baseline weights at each new segment and keeps only `f_LM`'s
//!   updates (ICLR). A **global exit criterion** may stop stage 2 early: the model is then the
//!   committed prefix + LL(r), the untrained intermediate blocks are pruned.
//! - Baselines in the same engine: `e2e` ([`e2e`]) and layer-wise `lw` ([`lw_block`]).

use burn::module::{AutodiffModule, ParamId};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use segprop_core::{HeadPolicy, Regime, StageKind, StagePlanEntry};
use segprop_model::ParamIds;

use crate::engine::Trainer;
use crate::error::TrainError;
use crate::exit::{ExitReason, GlobalExitTracker};
use crate::metrics::{StageRecord, TrainObserver};

/// What running a job's stage plan produced.
#[derive(Debug, Clone)]
pub struct PlanOutcome {
    pub stages: Vec<StageRecord>,
    /// Set when the global exit criterion stopped stage 2 early.
    pub early_exit: Option<ExitReason>,
}

pub use crate::engine::HeadBaseline;

/// Runs every remaining stage of the trainer's plan in order (Algorithm 1 for SegProp).
pub fn run_plan<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    observer: &mut dyn TrainObserver,
) -> Result<PlanOutcome, TrainError> {
    while run_next_stage(trainer, observer)?.is_some() {}
    Ok(PlanOutcome {
        stages: trainer.progress.records.clone(),
        early_exit: trainer.progress.early_exit,
    })
}

/// Whether every stage of the plan has run (or stage 2 stopped early).
pub fn plan_done<B: AutodiffBackend>(trainer: &Trainer<B>) -> bool {
    trainer.progress.early_exit.is_some()
        || trainer.progress.next_stage >= trainer.plan.stages.len()
}

/// Runs the next stage of the plan with its commit step; `None` when the plan is done. A worker
/// runs one stage per task this way, saving the trainer between tasks.
pub fn run_next_stage<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    observer: &mut dyn TrainObserver,
) -> Result<Option<StageRecord>, TrainError> {
    if plan_done(trainer) {
        return Ok(None);
    }
    let entry = trainer.plan.stages[trainer.progress.next_stage].clone();
    // One span per stage (exported with the worker's task span as its parent, see
    // segprop_telemetry::trace); its outcome is recorded when it ends.
    let span = tracing::info_span!(
        "stage",
        otel.name = %format!("stage {}", entry.name),
        stage.index = entry.index,
        stage.name = %entry.name,
        stage.steps = tracing::field::Empty,
        stage.exit = tracing::field::Empty,
        stage.final_train_loss = tracing::field::Empty,
        stage.eval_loss = tracing::field::Empty,
        stage.tokens_per_s = tracing::field::Empty,
    );
    let _entered = span.enter();
    let record = match entry.kind {
        StageKind::E2e => e2e(trainer, &entry, observer)?,
        StageKind::LwBlock { block } => lw_block(trainer, &entry, block, observer)?,
        StageKind::LwGlobal { block } => lw_global(trainer, &entry, block, observer)?,
        StageKind::LwHead => lw_head(trainer, &entry, observer)?,
        StageKind::Stage1 { base_depth } => {
            let record = stage1(trainer, &entry, observer)?;
            commit_prefix(trainer, base_depth);
            if trainer.spec.regime == Regime::Segprop
                && let Some(spec) = &trainer.spec.segprop.exit.global
            {
                trainer.progress.global_exit = Some(GlobalExitTracker::new(spec, record.eval_loss));
            }
            record
        }
        StageKind::Segment { start, end } => {
            // A stage resumed mid-way already took its baseline or reset its head.
            let resuming = resuming(trainer, &entry);
            if trainer.spec.segprop.head_policy == HeadPolicy::Reset
                && !resuming
                && let Some(shards) = trainer.shards.as_mut()
            {
                let n = shards.num_layers();
                match shards.has_baseline() {
                    false => shards.take_baseline(n - trainer.plan.head_layers..n),
                    true => shards.reset_to_baseline(),
                }
            } else if trainer.spec.segprop.head_policy == HeadPolicy::Reset && !resuming {
                match trainer.head_baseline.take() {
                    None => trainer.head_baseline = Some(head_baseline(trainer)),
                    Some(b) => {
                        reset_head(trainer, &b);
                        trainer.head_baseline = Some(b);
                    }
                }
            }
            let record = stage2_segment(trainer, &entry, observer)?;
            commit_segment(trainer, start, end)?;
            let reason = trainer
                .progress
                .global_exit
                .as_mut()
                .and_then(|g| g.on_commit(record.eval_loss));
            if let Some(reason) = reason {
                prune_to_committed(trainer, end);
                trainer.progress.early_exit = Some(reason);
            }
            record
        }
    };
    span.record("stage.steps", record.steps);
    span.record("stage.exit", tracing::field::debug(&record.exit_reason));
    span.record("stage.final_train_loss", record.final_train_loss);
    span.record("stage.eval_loss", record.eval_loss);
    span.record("stage.tokens_per_s", record.tokens_per_s);
    trainer.progress.records.push(record.clone());
    trainer.progress.next_stage += 1;
    if plan_done(trainer)
        && let Some(cache) = &mut trainer.cache
    {
        for depth in cache.depths() {
            cache.drop_depth(depth);
        }
    }
    Ok(Some(record))
}

/// Stage 1: embed + base prefix `0..p` + LL(r), intermediate blocks skipped; then commit the
/// prefix (it is frozen from here on: no later stage trains it).
pub fn stage1<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    entry: &StagePlanEntry,
    observer: &mut dyn TrainObserver,
) -> Result<StageRecord, TrainError> {
    let exit = match trainer.spec.regime {
        Regime::Lw => trainer.spec.lw.stage1_exit(),
        _ => trainer.spec.segprop.exit.stage1.clone(),
    };
    trainer.train_stage(entry, &exit, observer)
}

/// Commits the base prefix after stage 1: embed and blocks `0..p` are frozen from here on (no
/// later route trains them; they run forward-only on the frozen copy).
pub fn commit_prefix<B: AutodiffBackend>(trainer: &mut Trainer<B>, p: usize) {
    trainer.committed_depth = p;
}

/// One stage-2 segment: trains blocks `q..q+k`, the adapter and LL(r) on `StopGrad` prefix
/// outputs (SnapCheck snapshots when enabled).
pub fn stage2_segment<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    entry: &StagePlanEntry,
    observer: &mut dyn TrainObserver,
) -> Result<StageRecord, TrainError> {
    let exit = trainer.spec.segprop.exit.segment.clone();
    trainer.train_stage(entry, &exit, observer)
}

/// Commits segment `[q, q+k)`: the prefix becomes `0..q+k` and SnapCheck advances every cached
/// batch by one segment forward, `S[q+k, b] = F_{q:q+k}(S[q, b])`, instead of recomputing
/// the prefix. The identity adapter has nothing to discard.
pub fn commit_segment<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    q: usize,
    end: usize,
) -> Result<(), TrainError> {
    debug_assert_eq!(trainer.committed_depth, q, "segments commit in order");
    trainer.committed_depth = end;
    advance_snapshots(trainer, q, end)
}

/// `S[to, b] = F_{from:to}(S[from, b])` for every cached batch, on the current (committed) weights.
pub fn advance_snapshots<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    from: usize,
    to: usize,
) -> Result<(), TrainError> {
    let Some(cache) = trainer.cache.as_mut() else {
        return Ok(());
    };
    if !trainer.advance_in_place {
        cache.drop_depth(from);
        return Ok(());
    }
    if trainer.shards.is_some() {
        return trainer.advance_sharded(from, to);
    }
    let committed = trainer.model.valid();
    let rope =
        segprop_model::RopeTables::new(&trainer.config, trainer.spec.data.seq_len, &trainer.device)
            .cast(trainer.compute);
    let spill = trainer.work_dir.join("snapshots");
    cache
        .advance(from, to, |z| committed.forward_blocks(z, from..to, &rope))
        .map_err(TrainError::io(spill))
}

/// Takes LL(r)'s decoder blocks as they are when stage 2 begins.
pub fn head_baseline<B: AutodiffBackend>(trainer: &Trainer<B>) -> HeadBaseline<B> {
    let n = trainer.config.num_layers;
    let r = trainer.plan.head_layers;
    HeadBaseline {
        blocks: trainer.model.blocks[n - r..n].to_vec(),
    }
}

/// Head policy `reset`: LL's decoder blocks return to their baseline weights and lose their
/// optimizer state; the LM head (final norm + output) keeps its weights and moments.
pub fn reset_head<B: AutodiffBackend>(trainer: &mut Trainer<B>, baseline: &HeadBaseline<B>) {
    let n = trainer.config.num_layers;
    let r = trainer.plan.head_layers;
    let mut reset_ids: Vec<ParamId> = Vec::new();
    for (slot, block) in trainer.model.blocks[n - r..n]
        .iter_mut()
        .zip(&baseline.blocks)
    {
        reset_ids.extend(ParamIds::of(block).0);
        *slot = block.clone();
    }
    if let Some(opt) = trainer.head_optimizer.take() {
        use burn::optim::Optimizer;
        let mut record = opt.to_record();
        record.retain(|id, _| !reset_ids.contains(id));
        trainer.head_optimizer = Some(opt.load_record(record));
    }
}

/// Early exit: keep the committed prefix `0..end` and LL(r)'s blocks; prune the rest.
pub fn prune_to_committed<B: AutodiffBackend>(trainer: &mut Trainer<B>, end: usize) {
    let n = trainer.config.num_layers;
    let r = trainer.plan.head_layers;
    let keep: Vec<usize> = (0..end).chain(n - r..n).collect();
    trainer.model = trainer.model.clone().retain_blocks(&keep);
    if let Some(shards) = trainer.shards.as_mut() {
        shards.retain_blocks(&keep);
    }
    trainer.config.num_layers = keep.len();
    if let Some(cache) = &mut trainer.cache {
        for depth in cache.depths() {
            cache.drop_depth(depth);
        }
    }
}

/// End-to-end baseline: every parameter, full backprop, one stage.
pub fn e2e<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    entry: &StagePlanEntry,
    observer: &mut dyn TrainObserver,
) -> Result<StageRecord, TrainError> {
    let exit = trainer.spec.e2e.exit.clone();
    trainer.train_stage(entry, &exit, observer)
}

/// Layer-wise baseline, block `i`: a fresh local head (an aux copy of the LM head's init) is
/// trained with the block on `StopGrad(f^{[0:i]}(x))`; then the block commits and the snapshots
/// advance. The last block's local head becomes the model's head.
pub fn lw_block<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    entry: &StagePlanEntry,
    block: usize,
    observer: &mut dyn TrainObserver,
) -> Result<StageRecord, TrainError> {
    if !resuming(trainer, entry) {
        install_fresh_head(trainer);
    }
    lw_global(trainer, entry, block, observer)
}

/// Whether the trainer resumes `entry` mid-way (it already set the stage's head up).
fn resuming<B: AutodiffBackend>(trainer: &Trainer<B>, entry: &StagePlanEntry) -> bool {
    trainer
        .resume
        .as_ref()
        .is_some_and(|r| r.progress.stage_index == entry.index)
}

/// Replaces the model's LM head (this rank's shards of it in a sharded trainer) with a fresh
/// local head.
fn install_fresh_head<B: AutodiffBackend>(trainer: &mut Trainer<B>) {
    let head = trainer.fresh_local_head();
    trainer.model.head = match trainer.shards.as_mut() {
        Some(shards) => shards.replace_head(head),
        None => head,
    };
}

/// Layer-wise with a base prefix (the ICLR paper's "w/o LL"), block `i >= p`: the block trains
/// on `StopGrad(f^{[0:i]}(x))` under the model's LM head alone, which keeps training (with its
/// optimizer state) from stage 1 on; then the block commits and the snapshots advance.
pub fn lw_global<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    entry: &StagePlanEntry,
    block: usize,
    observer: &mut dyn TrainObserver,
) -> Result<StageRecord, TrainError> {
    debug_assert_eq!(trainer.spec.regime, Regime::Lw);
    let exit = trainer.spec.lw.exit.clone();
    let record = trainer.train_stage(entry, &exit, observer)?;
    trainer.committed_depth = block + 1;
    advance_snapshots(trainer, block, block + 1)?;
    Ok(record)
}

/// Layer-wise's last stage (the TMLR paper's `fc` stage): every block frozen, the LM head alone
/// trains on `S[n]`. After `local_heads` the head starts from a fresh initialisation with a fresh
/// optimizer (the model's global head was never trained); after `base_prefix` it goes on from
/// the head the blocks were trained under.
pub fn lw_head<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    entry: &StagePlanEntry,
    observer: &mut dyn TrainObserver,
) -> Result<StageRecord, TrainError> {
    debug_assert_eq!(trainer.spec.regime, Regime::Lw);
    if !resuming(trainer, entry) && trainer.spec.lw.variant == segprop_core::LwVariant::LocalHeads {
        install_fresh_head(trainer);
        trainer.head_optimizer = None;
    }
    let exit = trainer
        .spec
        .lw
        .final_head
        .clone()
        .unwrap_or_else(|| trainer.spec.lw.exit.clone());
    trainer.train_stage(entry, &exit, observer)
}

/// Bit-exact copy of every parameter value, by parameter id (tests compare before/after).
pub fn parameter_values<B: Backend, M: burn::module::Module<B>>(
    module: &M,
) -> Vec<(ParamId, Vec<u32>)> {
    use burn::module::{ModuleVisitor, Param};
    struct Collect(Vec<(ParamId, Vec<u32>)>);
    impl<B: Backend> ModuleVisitor<B> for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let values: Vec<f32> = param
                .val()
                .into_data()
                .convert::<f32>()
                .into_vec()
                .unwrap_or_default();
            self.0
                .push((param.id, values.iter().map(|v| v.to_bits()).collect()));
        }
    }
    let mut c = Collect(Vec::new());
    module.visit(&mut c);
    c.0
}
