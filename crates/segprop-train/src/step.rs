//! One optimizer step of a stage, applied from outside the stage loop (torchtitan's
//! "parallelism is applied from outside"): [`Trainer::train_stage`] runs Algorithm 1's loop over
//! a [`StageStep`], which is either [`LocalStep`] (the whole model on this device: burn's AdamW,
//! accumulation over passes, global-norm clipping) or [`ShardedStep`] (FSDP units of this rank
//! of a gang: gathers, reduce-scatters and the sharded AdamW of [`crate::sharded`]). The loop
//! does not know which.

use burn::module::{ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::ElementConversion;
use burn::tensor::backend::AutodiffBackend;
use segprop_model::Llama;
use segprop_shard::Collective as _;

use crate::alloc;
use crate::data::{Batch, pass_weight};
use crate::engine::{AdamWOptimizer, StageProgress, Trainable, Trainer};
use crate::error::TrainError;
use crate::rank::{RankMemory, ShardRank};
use crate::route::{Route, RouteInput};
use crate::sharded::{MicroBatch, ShardedStage, StepInput};
use crate::snapcheck::{SnapshotKey, Split};

/// What the stage loop asks of a step, whoever runs it.
pub trait StageStep<B: AutodiffBackend> {
    /// One optimizer step over `batches` (gradient accumulation), each in passes of at most
    /// `micro` sequences: (mean loss, global grad norm before clipping).
    fn step(
        &mut self,
        t: &mut Trainer<B>,
        route: Route,
        batches: &[&Batch],
        micro: usize,
        lr: f64,
    ) -> Result<(f64, f64), TrainError>;

    /// Held-out loss of `route` on the current weights.
    fn evaluate(&mut self, t: &mut Trainer<B>, route: Route) -> Result<f64, TrainError>;

    /// A mid-stage checkpoint of the trainer with the stage's optimizer state (every rank of a
    /// gang calls it at the same step).
    fn save_checkpoint(
        &mut self,
        t: &mut Trainer<B>,
        progress: &StageProgress,
    ) -> Result<(), TrainError>;

    /// Ends the stage: its weights and optimizer state back in the trainer (as whole modules, or
    /// as this rank's shards when the trainer keeps its units sharded).
    /// Returns what this rank held, for a sharded stage.
    fn finish(self: Box<Self>, t: &mut Trainer<B>) -> Result<Option<RankMemory>, TrainError>;
}

/// The whole model on this device.
pub struct LocalStep<B: AutodiffBackend> {
    trainable: Trainable,
    optimizer: AdamWOptimizer<B>,
}

impl<B: AutodiffBackend> LocalStep<B> {
    /// Trains `trainable` with the stage's optimizer `optimizer` (fresh, or resumed).
    pub fn new(trainable: Trainable, optimizer: AdamWOptimizer<B>) -> Self {
        Self {
            trainable,
            optimizer,
        }
    }
}

impl<B: AutodiffBackend> StageStep<B> for LocalStep<B> {
    fn step(
        &mut self,
        t: &mut Trainer<B>,
        route: Route,
        batches: &[&Batch],
        micro: usize,
        lr: f64,
    ) -> Result<(f64, f64), TrainError> {
        Ok(t.train_step(
            route,
            batches,
            micro,
            &self.trainable,
            &mut self.optimizer,
            lr,
        ))
    }

    fn evaluate(&mut self, t: &mut Trainer<B>, route: Route) -> Result<f64, TrainError> {
        Ok(t.evaluate(route))
    }

    fn save_checkpoint(
        &mut self,
        t: &mut Trainer<B>,
        progress: &StageProgress,
    ) -> Result<(), TrainError> {
        t.save_checkpoint(&self.optimizer, progress)
    }

    fn finish(self: Box<Self>, _t: &mut Trainer<B>) -> Result<Option<RankMemory>, TrainError> {
        Ok(None)
    }
}

/// This rank's FSDP units of the stage (`sharding.strategy: full_shard`).
pub struct ShardedStep<B: AutodiffBackend> {
    stage: ShardedStage<B>,
    /// The stage's burn optimizer: it holds the moments only while they are gathered back (for a
    /// checkpoint, at the end); the sharded AdamW steps the shards.
    optimizer: Option<AdamWOptimizer<B>>,
}

impl<B: AutodiffBackend> ShardedStep<B> {
    /// Shards the units `route` trains (and its frozen prefix, and the parked blocks) out of the
    /// trainer's model, with the moments of `optimizer` and of LL(r)'s optimizer.
    /// A trainer whose units stay sharded between stages ([`Trainer::shards`]) lends the
    /// stage its units instead (fresh moments for the stage's own units unless `resuming`).
    pub fn new(
        t: &mut Trainer<B>,
        route: Route,
        trainable: &Trainable,
        optimizer: AdamWOptimizer<B>,
        resuming: bool,
    ) -> Self {
        let adamw = t.sharded_adamw();
        let stage = match t.shards.as_mut() {
            Some(shards) => ShardedStage::take(shards, route, trainable, adamw, !resuming),
            None => ShardedStage::new(
                &mut t.model,
                route,
                trainable,
                &optimizer,
                t.head_optimizer.as_ref(),
                adamw,
                t.shard.as_ref().expect("a sharded step has a shard rank"),
                t.compute,
            ),
        };
        // The frozen prefix is sharded with the stage: no rank keeps it whole.
        t.frozen = None;
        Self {
            stage,
            optimizer: Some(optimizer),
        }
    }

    fn gather_back(&mut self, t: &mut Trainer<B>) -> Result<AdamWOptimizer<B>, TrainError> {
        let optimizer = self
            .optimizer
            .take()
            .expect("the stage's optimizer is back between steps");
        t.materialize(&self.stage, optimizer)
    }
}

impl<B: AutodiffBackend> StageStep<B> for ShardedStep<B> {
    fn step(
        &mut self,
        t: &mut Trainer<B>,
        route: Route,
        batches: &[&Batch],
        micro: usize,
        lr: f64,
    ) -> Result<(f64, f64), TrainError> {
        t.sharded_step(&mut self.stage, route, batches, micro, lr)
    }

    fn evaluate(&mut self, t: &mut Trainer<B>, route: Route) -> Result<f64, TrainError> {
        if t.shards.is_some() {
            return t.evaluate_sharded(&mut self.stage, route);
        }
        t.evaluate_stage(route, Some(&self.stage))
    }

    fn save_checkpoint(
        &mut self,
        t: &mut Trainer<B>,
        progress: &StageProgress,
    ) -> Result<(), TrainError> {
        if t.shards.is_some() {
            return t.save_sharded_checkpoint(&self.stage, progress);
        }
        let optimizer = self.gather_back(t)?;
        let saved = t.save_checkpoint(&optimizer, progress);
        self.optimizer = Some(optimizer);
        self.stage.dematerialize(&mut t.model);
        saved
    }

    fn finish(mut self: Box<Self>, t: &mut Trainer<B>) -> Result<Option<RankMemory>, TrainError> {
        let memory = self.stage.memory();
        match t.shards.as_mut() {
            Some(shards) => self.stage.put_back(shards),
            None => drop(self.gather_back(t)?),
        }
        Ok(Some(memory))
    }
}

impl<B: AutodiffBackend> Trainer<B> {
    /// One optimizer step over `batches` (gradient accumulation), each run in passes of at most
    /// `micro` sequences (0: whole batches) whose gradients are accumulated too: returns (mean
    /// loss, grad norm). The step does not depend on `micro` beyond float rounding.
    pub fn train_step(
        &mut self,
        route: Route,
        batches: &[&Batch],
        micro: usize,
        trainable: &Trainable,
        local_opt: &mut AdamWOptimizer<B>,
        lr: f64,
    ) -> (f64, f64) {
        let mut local_acc = GradientsAccumulator::<Llama<B>>::new();
        let mut head_acc = GradientsAccumulator::<Llama<B>>::new();
        let mut loss_mean = 0.0;
        for batch in batches {
            let passes = batch.passes(micro);
            let prefix = self.route_prefix(route, batch);
            for rows in passes.iter().cloned() {
                let weight = pass_weight(batches, batch, rows.clone());
                let loss = if passes.len() == 1 {
                    self.loss_on(route, batch, prefix.clone())
                } else {
                    let part = batch.rows(rows.clone());
                    let z = prefix.as_ref().map(|z| z.clone().slice([rows]));
                    self.loss_on(route, &part, z)
                };
                loss_mean += weight * loss.clone().into_scalar().elem::<f64>();
                let mut grads = loss.mul_scalar(weight).backward();
                let local = GradientsParams::from_params(&mut grads, &self.model, &trainable.local);
                local_acc.accumulate(&self.model, local);
                if !trainable.head.is_empty() {
                    let head =
                        GradientsParams::from_params(&mut grads, &self.model, &trainable.head);
                    head_acc.accumulate(&self.model, head);
                }
            }
        }
        let mut local = local_acc.grads();
        let mut head = head_acc.grads();
        alloc::end_first_phase();
        let norm = global_grad_norm::<B>(&self.model, &[&local, &head]);
        if let Some(clip) = self.spec.optimizer.grad_clip
            && norm > clip
        {
            let factor = clip / (norm + 1e-6);
            scale_grads::<B>(&self.model, &mut local, factor);
            scale_grads::<B>(&self.model, &mut head, factor);
        }
        self.model = local_opt.step(lr, self.model.clone(), local);
        if !trainable.head.is_empty() {
            if self.head_optimizer.is_none() {
                self.head_optimizer = Some(self.new_optimizer());
            }
            let head_opt = self
                .head_optimizer
                .as_mut()
                .expect("head optimizer was just created");
            self.model = head_opt.step(lr, self.model.clone(), head);
        }
        (loss_mean, norm)
    }

    /// One optimizer step of a sharded stage: this rank takes batches `rank, rank + N, …` of
    /// the step's `batches` (so the global batch, and the loss curve, do not depend on N), each
    /// in passes of at most `micro` sequences. Returns (mean loss over all ranks, global grad
    /// norm).
    pub(crate) fn sharded_step(
        &mut self,
        stage: &mut ShardedStage<B>,
        route: Route,
        batches: &[&Batch],
        micro: usize,
        lr: f64,
    ) -> Result<(f64, f64), TrainError> {
        let mut shard = self.shard.take().expect("a sharded stage has a shard rank");
        let (rank, world) = (shard.rank(), shard.world());
        let mine: Vec<&Batch> = batches.iter().skip(rank).step_by(world).copied().collect();
        let prefixes = match route.input() {
            RouteInput::Embed => vec![None; mine.len()],
            RouteInput::Prefix { depth } => {
                match self.sharded_prefix(stage, &mut shard, (depth, Split::Train), &mine) {
                    Ok(z) => z.into_iter().map(Some).collect(),
                    Err(e) => {
                        self.shard = Some(shard);
                        return Err(e);
                    }
                }
            }
        };
        let mut passes = Vec::new();
        for (batch, prefix) in mine.into_iter().zip(prefixes) {
            let rows = batch.passes(micro);
            let whole = rows.len() == 1;
            for rows in rows {
                let weight = pass_weight(batches, batch, rows.clone());
                let input = match &prefix {
                    None => StepInput::Tokens,
                    Some(z) if whole => StepInput::Hidden(z.clone()),
                    Some(z) => StepInput::Hidden(z.clone().slice([rows.clone()])),
                };
                let batch = if whole {
                    (*batch).clone()
                } else {
                    batch.rows(rows)
                };
                passes.push(MicroBatch {
                    batch,
                    input,
                    weight,
                });
            }
        }
        let stepped = stage
            .step(
                &mut shard,
                passes,
                lr,
                self.spec.optimizer.grad_clip,
                &self.adapter,
                &self.rope,
                &self.rope_inner,
                &self.device,
            )
            .and_then(|(local_loss, norm)| {
                let mut total = [local_loss as f32];
                shard.collective.all_reduce(&mut total)?;
                Ok((f64::from(total[0]), norm))
            });
        self.shard = Some(shard);
        Ok(stepped?)
    }

    /// `S[depth]` of this rank's `batches` in a sharded stage: from SnapCheck where it has them,
    /// else through the stage's sharded frozen prefix (and stored). Every rank gathers the prefix
    /// when any rank misses, so the ranks' collectives stay in step.
    pub(crate) fn sharded_prefix(
        &mut self,
        stage: &mut ShardedStage<B>,
        shard: &mut ShardRank,
        (depth, split): (usize, Split),
        batches: &[&Batch],
    ) -> Result<Vec<Tensor<B::InnerBackend, 3>>, TrainError> {
        let key = |batch: &Batch| SnapshotKey {
            depth,
            split,
            id: batch.id,
        };
        let mut out: Vec<Option<Tensor<B::InnerBackend, 3>>> = batches
            .iter()
            .map(|b| self.cache.as_mut().and_then(|c| c.get(key(b))))
            .collect();
        let missing: Vec<usize> = (0..out.len()).filter(|&i| out[i].is_none()).collect();
        let mut any = [missing.len() as f32];
        shard.collective.all_reduce(&mut any)?;
        if any[0] > 0.0 {
            let tokens = missing
                .iter()
                .map(|&i| {
                    Self::tokens::<B::InnerBackend>(&batches[i].inputs, batches[i], &self.device)
                })
                .collect();
            let computed = stage.prefix_forward(shard, tokens, &self.rope_inner)?;
            for (i, z) in missing.into_iter().zip(computed) {
                if let Some(cache) = &mut self.cache
                    && let Err(err) = cache.put(key(batches[i]), z.clone())
                {
                    tracing::warn!(error = %err, depth, "cannot store snapshot; continuing without it");
                }
                out[i] = Some(z);
            }
        }
        Ok(out
            .into_iter()
            .map(|z| z.expect("every prefix output is cached or computed"))
            .collect())
    }

    /// Gathers a sharded stage's weights into `self.model`, and its optimizer moments into the
    /// engine's optimizers (`local_opt`, `self.head_optimizer`).
    pub(crate) fn materialize(
        &mut self,
        stage: &ShardedStage<B>,
        local_opt: AdamWOptimizer<B>,
    ) -> Result<AdamWOptimizer<B>, TrainError> {
        let fresh = self.new_optimizer();
        let shard = self
            .shard
            .as_mut()
            .expect("a sharded stage has a shard rank");
        let c = &mut shard.collective;
        stage.materialize(c, &mut self.model)?;
        let (local, head) = stage.export_optimizers(
            c,
            &self.model,
            local_opt,
            self.head_optimizer.take(),
            fresh,
        )?;
        self.head_optimizer = head;
        Ok(local)
    }

    /// Evaluates `route`, gathering a sharded stage's weights for it first.
    pub(crate) fn evaluate_stage(
        &mut self,
        route: Route,
        stage: Option<&ShardedStage<B>>,
    ) -> Result<f64, TrainError> {
        let Some(stage) = stage else {
            return Ok(self.evaluate(route));
        };
        let shard = self
            .shard
            .as_mut()
            .expect("a sharded stage has a shard rank");
        stage.materialize_route(&mut shard.collective, &mut self.model)?;
        let loss = self.evaluate(route);
        stage.dematerialize(&mut self.model);
        // The whole prefix evaluation froze goes with the gathered weights.
        self.frozen = None;
        Ok(loss)
    }
}

/// L2 norm over every gradient in `sets` (the global norm that clipping uses).
fn global_grad_norm<B: AutodiffBackend>(model: &Llama<B>, sets: &[&GradientsParams]) -> f64 {
    // Sums on the device and reads back once: one host sync per step, not one per parameter.
    struct Norm<'a, I: Backend> {
        sets: &'a [&'a GradientsParams],
        total: Option<Tensor<I, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Norm<'_, B::InnerBackend> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            for set in self.sets {
                if let Some(g) = set.get::<B::InnerBackend, D>(param.id) {
                    let squares = g.square().sum();
                    self.total = Some(match self.total.take() {
                        Some(total) => total + squares,
                        None => squares,
                    });
                }
            }
        }
    }
    let mut norm = Norm::<B::InnerBackend> { sets, total: None };
    model.visit(&mut norm);
    norm.total
        .map_or(0.0, |t| t.into_scalar().elem::<f64>())
        .sqrt()
}

fn scale_grads<B: AutodiffBackend>(model: &Llama<B>, grads: &mut GradientsParams, factor: f64) {
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: f64,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            if let Some(g) = self.grads.remove::<B::InnerBackend, D>(param.id) {
                self.grads.register(param.id, g.mul_scalar(self.factor));
            }
        }
    }
    model.visit(&mut Scale { grads, factor });
}
