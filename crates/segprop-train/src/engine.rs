//! The trainer: one model, one dataset, and what every regime shares: the parameters a route
//! trains, evaluation, the frozen prefix and its snapshots. The stage loop is `stage.rs`, one
//! optimizer step `step.rs`, and the algorithm that sequences stages `segprop.rs`.

use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::AdamWConfig;
#[cfg(any(test, feature = "testing"))]
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, ElementConversion};
use segprop_core::{JobSpec, LlamaConfig, StagePlan, StagePlanEntry};
use segprop_model::model::cross_entropy;
use segprop_model::precision::to_dtype;
use segprop_model::{Block, Llama, LlamaInit, LmHead, ParamIds, RopeTables};
use segprop_shard::Collective as _;

use crate::adapter::IdentityAdapter;
use crate::data::{Batch, Dataset};
use crate::error::TrainError;
use crate::exit::{ExitReason, ExitTracker, GlobalExitTracker};
use crate::metrics::StageRecord;
use crate::precision;
use crate::rank::ShardRank;
use crate::route::{Route, RouteInput};
use crate::sharded::{ModelShards, Placement};
use crate::snapcheck::{SnapshotCache, SnapshotKey, Split};

pub use crate::params::{AdamWOptimizer, Trainable};

/// Where a job stands between stages: what the plan carries from one stage to the next (besides
/// the weights and optimizer state). Saved in every checkpoint.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PlanProgress {
    /// Index of the next stage to run (`stages.len()` when the plan is done).
    pub next_stage: usize,
    /// Records of the stages done so far.
    pub records: Vec<StageRecord>,
    /// Set when the global exit criterion stopped stage 2 early (the model was pruned).
    pub early_exit: Option<ExitReason>,
    /// Stage 2's global exit criterion, armed after stage 1.
    pub global_exit: Option<GlobalExitTracker>,
}

/// Where a stage stands after an optimizer step: enough to resume it bit-exactly (with the
/// weights and both optimizers' state saved alongside).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct StageProgress {
    pub stage_index: usize,
    /// Optimizer steps done in this stage.
    pub step: u64,
    /// Full epochs done in this stage.
    pub epoch: u64,
    /// Steps (chunks of `grad_accum` batches) done in the current epoch.
    pub chunk: usize,
    pub tracker: ExitTracker,
    pub last_loss: f64,
    pub last_eval: Option<(u64, f64)>,
    /// Wall time spent in this stage before the checkpoint (summed across attempts).
    pub wall_s: f64,
}

/// A stage to resume: its progress and its local optimizer's state.
pub struct StageResume<B: AutodiffBackend> {
    pub progress: StageProgress,
    pub local_optimizer: AdamWOptimizer<B>,
}

/// Saves mid-stage checkpoints (the worker daemon writes them to the artifact store).
pub trait Checkpointer<B: AutodiffBackend> {
    /// Steps between checkpoints; 0 saves none (except on cancellation).
    fn every_steps(&self) -> u64;

    /// Saves the trainer as it is after `progress.step` steps of the current stage.
    fn save(
        &mut self,
        trainer: &Trainer<B>,
        local_optimizer: &AdamWOptimizer<B>,
        progress: &StageProgress,
    ) -> Result<(), TrainError>;

    /// Where the ranks of a trainer with sharded units write the checkpoint after
    /// `progress.step` steps (the same directory on every rank, `checkpoint::save_sharded`);
    /// `None` when this checkpointer keeps whole checkpoints only.
    fn sharded_dir(&self, _progress: &StageProgress) -> Option<PathBuf> {
        None
    }

    /// Rank 0, once every rank's files of the sharded checkpoint in `dir` are in place.
    fn sharded_saved(
        &mut self,
        _dir: &Path,
        _digest: &segprop_core::checksum::Digest,
        _progress: &StageProgress,
    ) -> Result<(), TrainError> {
        Ok(())
    }
}

/// The baseline weights of LL(r)'s decoder blocks, taken when stage 2 begins (head policy reset).
#[derive(Clone)]
pub struct HeadBaseline<B: AutodiffBackend> {
    pub blocks: Vec<Block<B>>,
}

/// Runs training stages of one job on one device.
pub struct Trainer<B: AutodiffBackend> {
    pub spec: JobSpec,
    pub config: LlamaConfig,
    pub plan: StagePlan,
    pub data: Dataset,
    pub model: Llama<B>,
    pub device: B::Device,
    pub adapter: IdentityAdapter,
    /// SnapCheck cache, when enabled for the regime.
    pub cache: Option<SnapshotCache<B::InnerBackend>>,
    /// The persistent optimizer of LL(r) (SegProp only).
    pub head_optimizer: Option<AdamWOptimizer<B>>,
    /// Global optimizer steps taken so far (x axis of the concatenated loss curve).
    pub global_step: u64,
    /// Depth of the committed (frozen) prefix: embed + blocks `0..committed_depth`.
    pub committed_depth: usize,
    pub(crate) rope: RopeTables<B>,
    pub(crate) rope_inner: RopeTables<B::InnerBackend>,
    /// Inner-backend copy of the frozen prefix (embed + blocks `0..depth`) taken at stage start.
    pub(crate) frozen: Option<FrozenPrefix<B::InnerBackend>>,
    pub work_dir: PathBuf,
    /// Stages done, records, global exit state.
    pub progress: PlanProgress,
    /// LL(r)'s decoder blocks as stage 2 found them (head policy `reset`).
    pub head_baseline: Option<HeadBaseline<B>>,
    /// Mid-stage checkpoints, when the caller wants them.
    pub checkpointer: Option<Box<dyn Checkpointer<B>>>,
    /// Set by a checkpoint load: the next `train_stage` of this stage resumes from it.
    pub resume: Option<StageResume<B>>,
    /// Whether a commit advances the cached snapshots in place (one process runs the whole plan).
    /// A worker daemon turns it off: separate `advance_snapshots` tasks produce them instead.
    pub advance_in_place: bool,
    /// This rank's place in a sharded gang (FSDP units, activation checkpointing); `None` trains
    /// the whole model on this device.
    pub shard: Option<ShardRank>,
    /// The compute dtype (`resources.precision`): f32, or bf16/f16 with fp32 masters for the
    /// trained units ([`crate::precision`]).
    pub compute: DType,
    /// This rank's shards of every unit, kept sharded between stages ([`Trainer::new_sharded`]):
    /// `model` then holds placeholders only and no rank ever holds the model whole. `None`: the
    /// trainer holds `model` whole between stages (and shards it per stage when `shard` is set).
    pub shards: Option<ModelShards<B>>,
}

impl<B: AutodiffBackend> Trainer<B> {
    /// Builds the model (random with `spec.seed`, or imported from `model.from.hf_dir`) and loads
    /// the data. `work_dir` holds SnapCheck spill files.
    pub fn new(spec: JobSpec, device: B::Device, work_dir: &Path) -> Result<Self, TrainError> {
        let (model, config) = Self::whole_model(&spec, &device)?;
        Self::with_model(spec, device, work_dir, model, config, None)
    }

    /// A trainer for rank `shard` of a sharded gang that never holds the model whole: each unit
    /// (the embedding, each block, the head) is made (seeded init) or read (`model.from.hf_dir`,
    /// tensor by tensor) and sharded at once, and stays sharded between stages.
    pub fn new_sharded(
        spec: JobSpec,
        device: B::Device,
        work_dir: &Path,
        shard: ShardRank,
    ) -> Result<Self, TrainError> {
        precision::check_backend::<B>(spec.resources.precision, &device)?;
        let compute = precision::compute_dtype(spec.resources.precision);
        let place = Placement::of(&shard, compute, &device);
        let (shards, config) = match &spec.model.from {
            Some(from) => {
                let (shards, config) = ModelShards::<B>::import_hf(&from.hf_dir, place, &device)
                    .map_err(TrainError::Checkpoint)?;
                spec.validate_against_model(&config)?;
                spec.check_tokenizer(&config)?;
                (shards, config)
            }
            None => {
                let config = Self::resolve_config(&spec)?;
                let shards = ModelShards::init(&config, spec.seed, place, &device);
                (shards, config)
            }
        };
        let model = shards.skeleton();
        let mut trainer = Self::with_model(spec, device, work_dir, model, config, Some(shards))?;
        trainer.shard = Some(shard);
        Ok(trainer)
    }

    pub(crate) fn resolve_config(spec: &JobSpec) -> Result<LlamaConfig, TrainError> {
        let mut config = spec.resolve_model_config()?;
        spec.check_tokenizer(&config)?;
        if config.tie_embeddings {
            // SegProp trains embed and LM head in different stages, so they cannot share a
            // tensor: the head is its own parameter (docs/adr/0002).
            tracing::info!("tied embeddings are trained as an untied LM head");
            config.tie_embeddings = false;
        }
        Ok(config)
    }

    fn whole_model(
        spec: &JobSpec,
        device: &B::Device,
    ) -> Result<(Llama<B>, LlamaConfig), TrainError> {
        Ok(match &spec.model.from {
            Some(from) => {
                let (model, config) = segprop_model::hf::import::<B>(&from.hf_dir, device)
                    .map_err(TrainError::Checkpoint)?;
                spec.validate_against_model(&config)?;
                spec.check_tokenizer(&config)?;
                (model, config)
            }
            None => {
                let config = Self::resolve_config(spec)?;
                (LlamaInit::random::<B>(&config, spec.seed, device), config)
            }
        })
    }

    pub(crate) fn with_model(
        spec: JobSpec,
        device: B::Device,
        work_dir: &Path,
        model: Llama<B>,
        config: LlamaConfig,
        shards: Option<ModelShards<B>>,
    ) -> Result<Self, TrainError> {
        precision::check_backend::<B>(spec.resources.precision, &device)?;
        let compute = precision::compute_dtype(spec.resources.precision);
        let data = Dataset::load(&spec)?;
        let plan = StagePlan::new(&spec, config.num_layers);
        let (snapcheck, budget) = match spec.regime {
            segprop_core::Regime::Segprop => {
                (spec.segprop.snapcheck, spec.segprop.snapcheck_memory_bytes)
            }
            segprop_core::Regime::Lw => (spec.lw.snapcheck, spec.lw.snapcheck_memory_bytes),
            segprop_core::Regime::E2e => (false, 0),
        };
        let cache = snapcheck.then(|| {
            SnapshotCache::new(budget, &work_dir.join("snapshots"), &device).with_dtype(compute)
        });
        let rope = RopeTables::new(&config, spec.data.seq_len, &device).cast(compute);
        let rope_inner = RopeTables::new(&config, spec.data.seq_len, &device).cast(compute);
        Ok(Self {
            spec,
            config,
            plan,
            data,
            model,
            device,
            adapter: IdentityAdapter,
            cache,
            head_optimizer: None,
            global_step: 0,
            committed_depth: 0,
            rope,
            rope_inner,
            frozen: None,
            work_dir: work_dir.to_path_buf(),
            progress: PlanProgress::default(),
            head_baseline: None,
            checkpointer: None,
            resume: None,
            advance_in_place: true,
            shard: None,
            compute,
            shards,
        })
    }

    pub fn route(&self, entry: &StagePlanEntry) -> Route {
        Route::new(entry.kind, self.config.num_layers, self.plan.head_layers)
    }

    /// Which parameters `route` trains.
    pub fn trainable(&self, route: Route) -> Trainable {
        let m = &self.model;
        let mut local = ParamIds::default();
        let mut head = ParamIds::default();
        match route {
            Route::Full { .. } => local.extend_from(m),
            Route::Stage1 {
                base_depth,
                head_start,
                num_layers,
            } => {
                local.extend_from(&m.embed_tokens);
                for b in &m.blocks[0..base_depth] {
                    local.extend_from(b);
                }
                for b in &m.blocks[head_start..num_layers] {
                    head.extend_from(b);
                }
                head.extend_from(&m.head);
            }
            Route::Segment {
                start,
                end,
                head_start,
                num_layers,
            } => {
                for b in &m.blocks[start..end] {
                    local.extend_from(b);
                }
                for b in &m.blocks[head_start..num_layers] {
                    head.extend_from(b);
                }
                head.extend_from(&m.head);
            }
            Route::LwBlock { block } => {
                if block == 0 {
                    local.extend_from(&m.embed_tokens);
                }
                local.extend_from(&m.blocks[block]);
                local.extend_from(&m.head);
            }
        }
        Trainable {
            local: local.0,
            head: head.0,
        }
    }

    /// The optimizer settings as the sharded AdamW takes them (the same update as burn's).
    pub fn sharded_adamw(&self) -> segprop_shard::AdamWConfig {
        let o = &self.spec.optimizer;
        segprop_shard::AdamWConfig {
            beta_1: o.betas[0] as f32,
            beta_2: o.betas[1] as f32,
            epsilon: o.eps as f32,
            weight_decay: o.weight_decay as f32,
        }
    }

    pub fn new_optimizer(&self) -> AdamWOptimizer<B> {
        let o = &self.spec.optimizer;
        AdamWConfig::new()
            .with_beta_1(o.betas[0] as f32)
            .with_beta_2(o.betas[1] as f32)
            .with_epsilon(o.eps as f32)
            .with_weight_decay(o.weight_decay as f32)
            .init::<B, Llama<B>>()
    }

    pub(crate) fn tokens<Bk: Backend>(
        values: &[i64],
        batch: &Batch,
        device: &Bk::Device,
    ) -> Tensor<Bk, 2, Int> {
        Tensor::from_data(
            TensorData::new(values.to_vec(), [batch.batch, batch.seq]),
            device,
        )
    }

    /// Takes an inner-backend (no autodiff) view of embed + blocks `0..depth`; the frozen prefix
    /// runs on it. Only the prefix is kept, so trained blocks are not held twice.
    pub fn freeze_prefix(&mut self, depth: usize) {
        self.frozen = Some(FrozenPrefix {
            embed: self.model.embed_tokens.valid(),
            blocks: self.model.blocks[..depth]
                .iter()
                .map(|b| b.valid())
                .collect(),
        });
    }

    /// `StopGrad(f^{[0:depth]}(x))`: from SnapCheck when cached, else recomputed on the frozen copy
    /// (and stored, filling the cache on first use).
    pub fn prefix_output(
        &mut self,
        depth: usize,
        split: Split,
        batch: &Batch,
    ) -> Tensor<B::InnerBackend, 3> {
        let key = SnapshotKey {
            depth,
            split,
            id: batch.id,
        };
        if let Some(cache) = &mut self.cache
            && let Some(z) = cache.get(key)
        {
            return z;
        }
        assert!(
            self.shards.is_none(),
            "a trainer with sharded units runs its frozen prefix through its stage's shards"
        );
        if self.frozen.as_ref().is_none_or(|f| f.blocks.len() < depth) {
            self.freeze_prefix(depth);
        }
        let frozen = self.frozen.as_ref().expect("frozen prefix was just taken");
        let tokens = Self::tokens::<B::InnerBackend>(&batch.inputs, batch, &self.device);
        let z = frozen.forward(tokens, depth, &self.rope_inner);
        if let Some(cache) = &mut self.cache
            && let Err(err) = cache.put(key, z.clone())
        {
            tracing::warn!(error = %err, depth, "cannot store snapshot; continuing without it");
        }
        z
    }

    /// The batches SnapCheck keeps snapshots of: every train batch, then every evaluated eval
    /// batch (`eval.max_batches` of them), in id order.
    pub fn snapshot_batches(&self) -> Vec<(Split, Batch)> {
        let limit = match self.spec.eval.max_batches {
            0 => self.data.eval.len(),
            n => n.min(self.data.eval.len()),
        };
        self.data
            .train
            .iter()
            .map(|b| (Split::Train, b.clone()))
            .chain(
                self.data.eval[..limit]
                    .iter()
                    .map(|b| (Split::Eval, b.clone())),
            )
            .collect()
    }

    /// SnapCheck's advance step for one batch: `S[to] = F_{from:to}(S[from])` when `S[from]` is
    /// cached (or its source has it): one segment's forward; else the committed prefix's full
    /// forward (the same bits). Returns the output and whether it was advanced. `S[to]` is not
    /// cached.
    pub fn advance_batch(
        &mut self,
        from: usize,
        to: usize,
        split: Split,
        batch: &Batch,
    ) -> (Tensor<B::InnerBackend, 3>, bool) {
        let key = SnapshotKey {
            depth: from,
            split,
            id: batch.id,
        };
        let input = match (&mut self.cache, from) {
            (Some(cache), 1..) => cache.get(key),
            _ => None,
        };
        match input {
            Some(z) => {
                let model = self.model.valid();
                (model.forward_blocks(z, from..to, &self.rope_inner), true)
            }
            None => {
                if self.frozen.as_ref().is_none_or(|f| f.blocks.len() < to) {
                    self.freeze_prefix(to);
                }
                let frozen = self.frozen.as_ref().expect("frozen prefix was just taken");
                let tokens = Self::tokens::<B::InnerBackend>(&batch.inputs, batch, &self.device);
                (frozen.forward(tokens, to, &self.rope_inner), false)
            }
        }
    }

    /// SnapCheck's advance step for a whole dataset: `S[to]` for every train batch and every
    /// evaluated eval batch, from `S[from]` where cached (one segment's forward), else from the
    /// committed prefix (a full forward; the same bits). Returns (advanced, recomputed).
    pub fn fill_snapshots(&mut self, from: usize, to: usize) -> (usize, usize) {
        let (mut advanced, mut recomputed) = (0, 0);
        for (split, batch) in self.snapshot_batches() {
            let key = SnapshotKey {
                depth: to,
                split,
                id: batch.id,
            };
            if self.cache.as_mut().is_none_or(|c| c.get(key).is_some()) {
                continue;
            }
            let (out, was_advanced) = self.advance_batch(from, to, split, &batch);
            if was_advanced {
                advanced += 1;
            } else {
                recomputed += 1;
            }
            if let Some(cache) = self.cache.as_mut()
                && let Err(err) = cache.put(key, out)
            {
                tracing::warn!(error = %err, "cannot store snapshot");
            }
        }
        if let Some(cache) = self.cache.as_mut()
            && from != to
        {
            cache.drop_depth(from);
        }
        (advanced, recomputed)
    }

    /// The route's input for `batch` when it is not the embedding: `S[depth]` of the whole
    /// batch (its passes take rows of it).
    pub(crate) fn route_prefix(
        &mut self,
        route: Route,
        batch: &Batch,
    ) -> Option<Tensor<B::InnerBackend, 3>> {
        match route.input() {
            RouteInput::Embed => None,
            RouteInput::Prefix { depth } => Some(self.prefix_output(depth, Split::Train, batch)),
        }
    }

    /// Forward + loss of one micro-batch on the autodiff model.
    #[cfg(any(test, feature = "testing"))]
    fn loss(&mut self, route: Route, batch: &Batch) -> Tensor<B, 1> {
        let prefix = self.route_prefix(route, batch);
        self.loss_on(route, batch, prefix)
    }

    /// Forward + loss of `batch` from `prefix` (the route's input when it does not start at
    /// the embedding).
    pub(crate) fn loss_on(
        &self,
        route: Route,
        batch: &Batch,
        prefix: Option<Tensor<B::InnerBackend, 3>>,
    ) -> Tensor<B, 1> {
        let x = match prefix {
            Some(z) => Tensor::from_inner(z),
            None => {
                let tokens = Self::tokens::<B>(&batch.inputs, batch, &self.device);
                to_dtype(self.model.embed(tokens), self.compute)
            }
        };
        let logits = route.forward(&self.model, x, &self.adapter, &self.rope);
        let targets = Self::tokens::<B>(&batch.targets, batch, &self.device);
        cross_entropy(logits, targets)
    }

    /// Ids of every parameter that receives a gradient from one micro-batch of `route` (tests use
    /// it to prove the frozen prefix gets none).
    #[cfg(any(test, feature = "testing"))]
    pub fn gradient_param_ids(&mut self, route: Route, batch: &Batch) -> Vec<ParamId> {
        let grads = self.loss(route, batch).backward();
        let all = GradientsParams::from_grads::<B, _>(grads, &self.model);
        ParamIds::of(&self.model)
            .0
            .into_iter()
            .filter(|id| has_grad::<B>(&all, &self.model, *id))
            .collect()
    }

    /// Whether any rank of the gang was cancelled (every rank must ask at the same point).
    pub fn gang_cancelled(&mut self, local: bool) -> Result<bool, TrainError> {
        let Some(shard) = self.shard.as_mut() else {
            return Ok(local);
        };
        let mut flag = [if local { 1.0 } else { 0.0 }];
        shard.collective.all_reduce(&mut flag)?;
        Ok(flag[0] > 0.0)
    }

    /// Mean held-out loss of the network `route` describes, on the current weights.
    pub fn evaluate(&mut self, route: Route) -> f64 {
        assert!(
            self.shards.is_none(),
            "a trainer with sharded units evaluates one unit at a time (Trainer::final_eval, its \
             stage's step), never on the whole model"
        );
        let model = self.model.valid();
        let limit = match self.spec.eval.max_batches {
            0 => self.data.eval.len(),
            n => n.min(self.data.eval.len()),
        };
        let batches: Vec<Batch> = self.data.eval[..limit].to_vec();
        let mut losses = Vec::with_capacity(batches.len());
        for batch in &batches {
            let x = match route.input() {
                RouteInput::Embed => to_dtype(
                    model.embed(Self::tokens(&batch.inputs, batch, &self.device)),
                    self.compute,
                ),
                RouteInput::Prefix { depth } => self.prefix_output(depth, Split::Eval, batch),
            };
            let logits = route.forward(&model, x, &self.adapter, &self.rope_inner);
            let targets = Self::tokens(&batch.targets, batch, &self.device);
            losses.push(cross_entropy(logits, targets).into_scalar().elem::<f64>());
        }
        crate::data::held_out_mean(&losses, &batches)
    }

    /// Held-out loss of the current model as an ordinary model (full forward, no snapshots).
    pub fn evaluate_full_model(&mut self) -> f64 {
        self.evaluate(Route::Full {
            num_layers: self.model.num_layers(),
        })
    }

    pub(crate) fn save_checkpoint(
        &mut self,
        local_optimizer: &AdamWOptimizer<B>,
        progress: &StageProgress,
    ) -> Result<(), TrainError> {
        let Some(mut checkpointer) = self.checkpointer.take() else {
            return Ok(());
        };
        let saved = checkpointer.save(self, local_optimizer, progress);
        self.checkpointer = Some(checkpointer);
        saved
    }

    /// A fresh local head for the layer-wise baseline (same init for every block, seeded).
    pub fn fresh_local_head(&self) -> LmHead<B> {
        LlamaInit::head(
            &self.config,
            self.spec.seed.wrapping_add(1000),
            &self.device,
        )
    }
}

/// The committed prefix `f^{[0:depth]}` on the inner backend: forward only, no graph.
pub struct FrozenPrefix<B: Backend> {
    embed: burn::nn::Embedding<B>,
    blocks: Vec<Block<B>>,
}

impl<B: Backend> FrozenPrefix<B> {
    /// # Shapes
    /// - tokens: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    fn forward(
        &self,
        tokens: Tensor<B, 2, Int>,
        depth: usize,
        rope: &RopeTables<B>,
    ) -> Tensor<B, 3> {
        let x = to_dtype(self.embed.forward(tokens), rope.dtype());
        self.blocks[..depth]
            .iter()
            .fold(x, |x, block| block.forward(x, rope))
    }
}

/// Whether `grads` holds a gradient for parameter `id` of `model`.
#[cfg(any(test, feature = "testing"))]
fn has_grad<B: AutodiffBackend>(grads: &GradientsParams, model: &Llama<B>, id: ParamId) -> bool {
    struct Probe<'a> {
        grads: &'a GradientsParams,
        id: ParamId,
        found: bool,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Probe<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if param.id == self.id {
                self.found = self.grads.get::<B::InnerBackend, D>(param.id).is_some();
            }
        }
    }
    let mut probe = Probe {
        grads,
        id,
        found: false,
    };
    model.visit(&mut probe);
    probe.found
}

/// Number of scalar parameters among `ids`.
pub fn count_params<B: Backend>(model: &Llama<B>, ids: &[ParamId]) -> u64 {
    struct Count<'a> {
        ids: &'a [ParamId],
        total: u64,
    }
    impl<B: Backend> ModuleVisitor<B> for Count<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if self.ids.contains(&param.id) {
                self.total += param.shape().num_elements() as u64;
            }
        }
    }
    let mut count = Count { ids, total: 0 };
    model.visit(&mut count);
    count.total
}
