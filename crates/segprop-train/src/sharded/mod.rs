//! Sharded training of one stage (DESIGN §3): the units a stage trains (embedding, each trained
//! decoder block, each block of LL(r), the LM head with the final norm) are flattened and sharded
//! 1/N over the ranks of a [`Collective`], as torchtitan's `fully_shard` does per block, from
//! outside the model. The frozen prefix a route reads (`S[depth]`: the embedding and blocks
//! `0..depth` of a SegProp segment or a layer-wise block) is sharded as well but never stepped:
//! it is read from SnapCheck, and where SnapCheck does not have it, computed through the prefix
//! units gathered one at a time, forward only, and freed ([`ShardedStage::prefix_forward`]).
//! Blocks the stage neither trains nor reads (those of later segments) are sharded and parked:
//! never gathered during the stage.
//!
//! A step over this rank's micro-batches, with activation checkpointing (the default):
//! 1. **forward**, unit by unit in route order: all-gather the unit, run every micro-batch
//!    through it without a graph, keep only the unit's input, free the gathered weights;
//! 2. **loss**: gather the head, forward with a graph from the saved input, backward: the head's
//!    gradient and the gradient at its input;
//! 3. **backward**, unit by unit in reverse: re-gather the unit, recompute its forward from the
//!    saved input with a graph, back-propagate the upstream gradient (`sum(y · g)`), accumulate
//!    the unit's gradient over micro-batches, free the weights, reduce-scatter the gradient;
//! 4. clip over the global norm of the sharded gradients, AdamW on each shard.
//!
//! Each unit is gathered twice and its gradient reduce-scattered once per step: the
//! `3 × unit × (N − 1)/N` wire bytes of FSDP, whatever the number of micro-batches.
//!
//! Prefetch (`sharding.prefetch`, the default): the rank's collectives run on its
//! communication thread ([`CommStream`]); handing a unit to the compute starts the all-gather of
//! the next unit in the step's order, and each unit's reduce-scatter runs while the next unit's
//! gradient is computed. The same calls in the same order, so the same results; two units
//! gathered at once instead of one.
//!
//! Without activation checkpointing every trained unit is gathered once, the whole route runs
//! with a graph as unsharded, and the gathered weights live until backward ends (burn's graph
//! holds them; it cannot re-gather them in place as PyTorch's FSDP hooks do): `2 × unit` wire
//! bytes per step, all trained units gathered at the peak.
//!
//! Where shards live (`segprop_shard::resident`): with `offload: cpu` each rank's chunk of the
//! fp32 master weights and of both AdamW moments is host memory (`Vec<f32>`), stepped by a host
//! AdamW (bit-identical to burn's), the layout of FSDP + CPU offload; with `offload: none` the
//! chunks of the units the stage trains are tensors on the rank's device, stepped there by the
//! same AdamW as tensor operations ([`Placement`]), while frozen units stay in host memory. With
//! `none` a trained unit's all-gather starts from its device chunk and ends in a device buffer
//! whose views are the module's parameters, and its gradient is flattened, reduce-scattered and
//! stepped on the device (`segprop_shard::device`: NCCL on the device buffers, staged through
//! the host collective on CPU ranks); with `cpu` the gathers and reduce-scatters use host
//! buffers and gathered weights are uploaded to the device for use and freed after.
//!
//! Between stages, either the units stay sharded ([`ModelShards`], `model.rs`: a trainer built
//! by `Trainer::new_sharded` never holds the model whole; its checkpoints are one file per rank,
//! `checkpoint.rs`; its evaluations and SnapCheck advances gather one unit at a time, `eval.rs`),
//! or, for a trainer that holds the model whole between stages (a worker daemon's task), the
//! stage is sharded out of the whole model ([`ShardedStage::new`]) and gathered back at its
//! checkpoints and its end ([`ShardedStage::materialize`], with the moments back in burn's
//! optimizers), so its checkpoints and states are the whole files.

use burn::module::AutodiffModule;
use burn::nn::Embedding;
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::backend::AutodiffBackend;
use segprop_model::model::cross_entropy;
use segprop_model::precision::to_dtype;
use segprop_model::{Block, Llama, LmHead, RopeTables};
use segprop_shard::unit::{FsdpUnit, UnitMemory};
use segprop_shard::{
    AdamWConfig, Collective, CollectiveError, CommStream, Flat, clip_factor, global_grad_norm,
};

use crate::adapter::Adapter;
use crate::data::Batch;
use crate::params::{AdamWOptimizer, Trainable};
use crate::route::Route;

/// Which optimizer a unit's parameters belong to in the unsharded engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    /// The stage's own optimizer (fresh each stage).
    Local,
    /// LL(r)'s optimizer, kept across SegProp stages.
    Head,
}

/// Something per kind of unit: `E` for the embedding, `K` for decoder block `index`, `H` for the
/// LM head with the final norm.
// A handful of units per stage: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Part<E, K, H> {
    Embed(E),
    Block(usize, K),
    Head(H),
}

/// A unit's shards.
type Kind<B> = Part<FsdpUnit<Embedding<B>>, FsdpUnit<Block<B>>, FsdpUnit<LmHead<B>>>;
/// A unit's gathered (whole) module.
type Gathered<B> = Part<Embedding<B>, Block<B>, LmHead<B>>;
/// A gathered unit's gradients summed over micro-batches (on the device).
type Accumulated<B> = Part<
    GradientsAccumulator<Embedding<B>>,
    GradientsAccumulator<Block<B>>,
    GradientsAccumulator<LmHead<B>>,
>;

struct Unit<B: AutodiffBackend> {
    kind: Kind<B>,
    group: Group,
}

/// Runs `$body` with `$u` bound to the unit's `FsdpUnit` whatever its module type.
macro_rules! with_unit {
    ($kind:expr, $u:ident => $body:expr) => {
        match $kind {
            Kind::Embed($u) => $body,
            Kind::Block(_, $u) => $body,
            Kind::Head($u) => $body,
        }
    };
}

/// A step's loss (this rank's weighted sum) and every unit's gradient chunk, in unit order.
type LossAndGrads<B> = (f64, Vec<Flat<<B as AutodiffBackend>::InnerBackend>>);

type OptimRecord<B> = <AdamWOptimizer<B> as Optimizer<Llama<B>, B>>::Record;

mod checkpoint;
mod comm;
mod eval;
mod model;
mod moments;

pub use checkpoint::ShardLayoutFile;
pub use eval::{Entry, Flow};
pub use model::{ModelShards, Placement};

pub use crate::rank::{RankMemory, ShardOptions, ShardRank};
use comm::{Gathers, Scatters};
use moments::{export_moments, import_moments};

/// The trained units of one stage on one rank, and the frozen prefix its route reads.
pub struct ShardedStage<B: AutodiffBackend> {
    units: Vec<Unit<B>>,
    /// The frozen prefix in forward order (the embedding, then blocks `0..depth`), sharded but
    /// never stepped; empty when the route starts at the embedding.
    prefix: Vec<Unit<B>>,
    /// Blocks after the route's and before LL(r)'s (later segments): sharded, never gathered
    /// during the stage.
    parked: Vec<Unit<B>>,
    route: Route,
    memory: RankMemory,
    /// Wire bytes of the prefix gathers since the last step: (moved, expected).
    prefix_comm: (u64, u64),
}

/// A micro-batch's input to the route.
pub enum StepInput<I: Backend> {
    /// The micro-batch's token ids (the route starts at the trainable embedding).
    Tokens,
    /// `S[depth]`: the frozen prefix's output.
    Hidden(Tensor<I, 3>),
}

/// One forward/backward pass of this rank: a batch, or some of its rows.
pub struct MicroBatch<I: Backend> {
    pub batch: Batch,
    pub input: StepInput<I>,
    /// Its loss's weight in the step's mean loss: `rows / batch rows / batches of the step`
    /// (all ranks), so the step's gradient does not depend on how batches are split.
    pub weight: f64,
}

fn tokens<Bk: Backend>(values: &[i64], batch: &Batch, device: &Bk::Device) -> Tensor<Bk, 2, Int> {
    Tensor::from_data(
        TensorData::new(values.to_vec(), [batch.batch, batch.seq]),
        device,
    )
}

impl<B: AutodiffBackend> ShardedStage<B> {
    /// Shards the units `route` trains out of `model` (which keeps one-element placeholders in
    /// their place), with AdamW state from `local_opt` / `head_opt` where they have it. The
    /// trained units keep fp32 masters; the frozen prefix and the parked blocks are stored and
    /// gathered in `compute` (16 bits in a mixed-precision job).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: &mut Llama<B>,
        route: Route,
        trainable: &Trainable,
        local_opt: &AdamWOptimizer<B>,
        head_opt: Option<&AdamWOptimizer<B>>,
        adamw: AdamWConfig,
        shard: &ShardRank,
        compute: DType,
    ) -> Self {
        let device = model.head.output.weight.device();
        let mut shards = ModelShards::from_model(model, Placement::of(shard, compute, &device));
        let mut stage = Self::take(&mut shards, route, trainable, adamw, false);
        let local = local_opt.to_record();
        let head = head_opt.map(Optimizer::to_record);
        for unit in &mut stage.units {
            let record = match unit.group {
                Group::Local => Some(&local),
                Group::Head => head.as_ref(),
            };
            if let Some(record) = record {
                with_unit!(&mut unit.kind, u => import_moments::<B, _>(u, record));
            }
        }
        stage
    }

    /// A stage of `units` (trained, in route order), `prefix` and `parked`, with what this rank
    /// holds counted.
    fn assemble_stage(
        units: Vec<Unit<B>>,
        prefix: Vec<Unit<B>>,
        parked: Vec<Unit<B>>,
        route: Route,
        (rank, world): (usize, usize),
    ) -> Self {
        let mut stage = Self {
            units,
            prefix,
            parked,
            route,
            memory: RankMemory {
                rank,
                world,
                ..RankMemory::default()
            },
            prefix_comm: (0, 0),
        };
        stage.memory.units = stage.units.len();
        stage.memory.shards_on_device = stage
            .units
            .iter()
            .all(|u| with_unit!(&u.kind, u => u.is_device_resident()));
        stage.memory.prefix_units = stage.prefix.len();
        for unit in &stage.prefix {
            stage.memory.prefix_bytes += with_unit!(&unit.kind, u => u.memory().params);
        }
        stage.memory.parked_units = stage.parked.len();
        for unit in &stage.parked {
            stage.memory.parked_bytes += with_unit!(&unit.kind, u => u.memory().params);
        }
        for unit in &stage.units {
            let m: UnitMemory = with_unit!(&unit.kind, u => u.memory());
            stage.memory.unit_bytes += m.gathered;
            stage.memory.params_bytes += m.params;
            stage.memory.optimizer_bytes += m.optimizer;
            stage.memory.grad_bytes += m.params;
            stage.memory.transient_bytes = stage.memory.transient_bytes.max(m.full_grad);
        }
        stage
    }

    /// What this rank holds (updated by every step).
    pub fn memory(&self) -> RankMemory {
        self.memory
    }

    /// Gathers every unit's current weights into `model`, the parked blocks included (for a
    /// checkpoint, the end of the stage). Every rank must call it.
    pub fn materialize(
        &self,
        c: &mut dyn Collective,
        model: &mut Llama<B>,
    ) -> Result<(), CollectiveError> {
        self.gather_into(c, model, true)
    }

    /// Gathers what the stage's route runs (the prefix and the trained units) into `model`, for
    /// evaluation. Every rank must call it.
    pub fn materialize_route(
        &self,
        c: &mut dyn Collective,
        model: &mut Llama<B>,
    ) -> Result<(), CollectiveError> {
        self.gather_into(c, model, false)
    }

    fn gather_into(
        &self,
        c: &mut dyn Collective,
        model: &mut Llama<B>,
        parked: bool,
    ) -> Result<(), CollectiveError> {
        let parked = if parked { &self.parked[..] } else { &[] };
        for unit in self.prefix.iter().chain(&self.units).chain(parked) {
            match &unit.kind {
                Kind::Embed(u) => model.embed_tokens = u.gather::<B>(c)?,
                Kind::Block(i, u) => model.blocks[*i] = u.gather::<B>(c)?,
                Kind::Head(u) => model.head = u.gather::<B>(c)?,
            }
        }
        Ok(())
    }

    /// Puts the placeholders back into `model` (after [`Self::materialize`]).
    pub fn dematerialize(&self, model: &mut Llama<B>) {
        for unit in self.prefix.iter().chain(&self.units).chain(&self.parked) {
            match &unit.kind {
                Kind::Embed(u) => model.embed_tokens = u.skeleton().clone(),
                Kind::Block(i, u) => model.blocks[*i] = u.skeleton().clone(),
                Kind::Head(u) => model.head = u.skeleton().clone(),
            }
        }
    }

    /// Gathers the AdamW moments of every unit into the engine's optimizers (the local one, and
    /// LL(r)'s, created if needed), as burn's own `AdamW` would hold them. Every rank must call it.
    pub fn export_optimizers(
        &self,
        c: &mut dyn Collective,
        model: &Llama<B>,
        local_opt: AdamWOptimizer<B>,
        head_opt: Option<AdamWOptimizer<B>>,
        fresh: AdamWOptimizer<B>,
    ) -> Result<(AdamWOptimizer<B>, Option<AdamWOptimizer<B>>), CollectiveError> {
        let mut local = local_opt.to_record();
        let has_head = self.units.iter().any(|u| u.group == Group::Head);
        let head_opt = match head_opt {
            Some(opt) => Some(opt),
            None if has_head => Some(fresh),
            None => None,
        };
        let mut head = head_opt.as_ref().map(Optimizer::to_record);
        for unit in &self.units {
            let record = match unit.group {
                Group::Local => &mut local,
                Group::Head => head.as_mut().expect("a head optimizer exists"),
            };
            let device = model.head.output.weight.device();
            with_unit!(&unit.kind, u => export_moments::<B, _>(u, c, record, &device)?);
        }
        Ok((
            local_opt.load_record(local),
            head_opt.zip(head).map(|(opt, rec)| opt.load_record(rec)),
        ))
    }

    /// One optimizer step over this rank's `micro` passes. Returns (this rank's share of the
    /// step's mean loss: the sum of its weighted losses, global grad norm).
    #[allow(clippy::too_many_arguments)]
    pub fn step<A: Adapter>(
        &mut self,
        shard: &mut ShardRank,
        micro: Vec<MicroBatch<B::InnerBackend>>,
        lr: f64,
        clip: Option<f64>,
        adapter: &A,
        rope: &RopeTables<B>,
        rope_inner: &RopeTables<B::InnerBackend>,
        device: &B::Device,
    ) -> Result<(f64, f64), CollectiveError> {
        let prefetch = shard.options.prefetch;
        let c = &mut shard.collective;
        let before = c.stats().total_wire_bytes();
        let world = c.world_size() as u64;
        // Each unit is gathered for compute (16-bit words in a mixed-precision stage) and its
        // fp32 gradient reduce-scattered.
        let gather = |u: &Unit<B>| with_unit!(&u.kind, u => u.gather_bytes());
        let scatter = |u: &Unit<B>| with_unit!(&u.kind, u => (u.layout.padded() * 4) as u64);
        let gathers: u64 = self.units.iter().map(gather).sum();
        let scatters: u64 = self.units.iter().map(scatter).sum();
        let head = self.units.last().map_or(0, gather);
        let passes = if shard.options.activation_checkpointing {
            2 * gathers - head + scatters
        } else {
            gathers + scatters
        };
        self.memory.expected_comm_bytes_per_step = passes * (world - 1) / world;
        let (loss_sum, shards) = if shard.options.activation_checkpointing {
            self.grads_recompute(c, prefetch, micro, adapter, (rope, rope_inner), device)?
        } else {
            self.grads_keep(c, prefetch, micro, adapter, rope, device)?
        };
        let local: f32 = self
            .units
            .iter()
            .zip(&shards)
            .map(|(u, g)| g.sum_squares(with_unit!(&u.kind, u => u.valid())))
            .sum();
        let norm = global_grad_norm(c, local)?;
        let factor = clip_factor(norm, clip);
        for (unit, grad) in self.units.iter_mut().zip(shards) {
            let grad = match factor {
                Some(f) => grad.scale(f),
                None => grad,
            };
            with_unit!(&mut unit.kind, u => u.step_flat(lr, grad));
        }
        let (prefix_moved, prefix_expected) = std::mem::take(&mut self.prefix_comm);
        self.memory.comm_bytes_per_step = c.stats().total_wire_bytes() - before + prefix_moved;
        self.memory.expected_comm_bytes_per_step += prefix_expected;
        Ok((loss_sum, norm))
    }

    /// `S[depth]` of each of `inputs` (token ids) through the sharded frozen prefix: each unit
    /// all-gathered in turn (the next one prefetched), run forward without a graph on every
    /// input, and freed. Every rank must call it, with any number of inputs (none included).
    pub fn prefix_forward(
        &mut self,
        shard: &mut ShardRank,
        inputs: Vec<Tensor<B::InnerBackend, 2, Int>>,
        rope: &RopeTables<B::InnerBackend>,
    ) -> Result<Vec<Tensor<B::InnerBackend, 3>>, CollectiveError> {
        let s = &shard.collective;
        let before = s.stats().total_wire_bytes();
        let mut gathers = Gathers::new(0..self.prefix.len(), shard.options.prefetch);
        let mut xs: Vec<Tensor<B::InnerBackend, 3>> = Vec::with_capacity(inputs.len());
        let mut inputs = Some(inputs);
        for unit in &self.prefix {
            let full = gathers.next(&self.prefix, s)?;
            match &unit.kind {
                Kind::Embed(u) => {
                    let embed = u.assemble_flat::<B>(full).valid();
                    xs = inputs
                        .take()
                        .expect("the embedding comes first")
                        .into_iter()
                        .map(|t| to_dtype(embed.forward(t), rope.dtype()))
                        .collect();
                }
                Kind::Block(_, u) => {
                    let block = u.assemble_flat::<B>(full).valid();
                    xs = xs.into_iter().map(|x| block.forward(x, rope)).collect();
                }
                Kind::Head(_) => unreachable!("a frozen prefix has no head"),
            }
        }
        let world = s.world_size() as u64;
        let padded: u64 = self
            .prefix
            .iter()
            .map(|u| with_unit!(&u.kind, u => u.gather_bytes()))
            .sum();
        self.prefix_comm.0 += s.stats().total_wire_bytes() - before;
        self.prefix_comm.1 += padded * (world - 1) / world;
        self.memory.gathered_peak_bytes = self.memory.gathered_peak_bytes.max(gathers.peak);
        Ok(xs)
    }

    /// Where the adapter sits: after the unit holding block `depth - 1` (Stage 1 and segments).
    fn adapter_depth(&self) -> Option<usize> {
        match self.route {
            Route::Stage1 { .. } | Route::Segment { .. } => Some(self.route.blocks().0.end),
            Route::Full { .. } | Route::LwBlock { .. } => None,
        }
    }

    /// Activation checkpointing: forward without a graph keeping unit inputs, then per unit in
    /// reverse re-gather, recompute and back-propagate.
    #[allow(clippy::too_many_arguments)]
    fn grads_recompute<A: Adapter>(
        &mut self,
        s: &CommStream,
        prefetch: bool,
        micro: Vec<MicroBatch<B::InnerBackend>>,
        adapter: &A,
        (rope, rope_inner): (&RopeTables<B>, &RopeTables<B::InnerBackend>),
        device: &B::Device,
    ) -> Result<LossAndGrads<B>, CollectiveError> {
        let adapter_depth = self.adapter_depth();
        let n = self.units.len();
        // Forward uses every unit in order, the head included; backward the others in reverse.
        let mut gathers = Gathers::new((0..n).chain((0..n - 1).rev()), prefetch);
        let mut scatters = Scatters::new(n, prefetch);
        let t0 = std::time::Instant::now();
        // Forward: saved[u][m] is unit u's input for micro-batch m (blocks and the head).
        let mut saved: Vec<Vec<Tensor<B::InnerBackend, 3>>> = Vec::with_capacity(n);
        let mut xs: Vec<Tensor<B::InnerBackend, 3>> = Vec::with_capacity(micro.len());
        let mut first = 0;
        if let Some(Unit {
            kind: Kind::Embed(u),
            ..
        }) = self.units.first()
        {
            let embed = u.assemble_flat::<B>(gathers.next(&self.units, s)?).valid();
            for m in &micro {
                let StepInput::Tokens = &m.input else {
                    unreachable!("an embedding unit reads tokens")
                };
                let y = embed.forward(tokens(&m.batch.inputs, &m.batch, device));
                xs.push(to_dtype(y, rope_inner.dtype()));
            }
            saved.push(Vec::new());
            first = 1;
        } else {
            for m in micro.iter() {
                let StepInput::Hidden(x) = &m.input else {
                    unreachable!("a route without the embedding reads S[depth]")
                };
                xs.push(x.clone());
            }
        }
        for unit in &self.units[first..n - 1] {
            let Kind::Block(index, u) = &unit.kind else {
                unreachable!("units between the embedding and the head are blocks")
            };
            let block = u.assemble_flat::<B>(gathers.next(&self.units, s)?).valid();
            saved.push(xs.clone());
            xs = xs
                .into_iter()
                .map(|x| {
                    let y = block.forward(x, rope_inner);
                    if adapter_depth == Some(index + 1) {
                        adapter.forward(y, index + 1)
                    } else {
                        y
                    }
                })
                .collect();
        }
        saved.push(xs);
        self.memory.activation_bytes = saved
            .iter()
            .flatten()
            .map(|x| (x.shape().num_elements() * 4) as u64)
            .sum();

        let t_forward = t0.elapsed();
        // The head: loss, its gradient and the gradient at its input.
        let mut upstream: Vec<Tensor<B::InnerBackend, 3>> = Vec::with_capacity(micro.len());
        let mut loss_sum = 0.0;
        let Kind::Head(head_unit) = &self.units[n - 1].kind else {
            unreachable!("the last unit is the head")
        };
        let head = head_unit.assemble_flat::<B>(gathers.next(&self.units, s)?);
        let mut acc = GradientsAccumulator::<LmHead<B>>::new();
        for (m, x) in micro.iter().zip(saved.pop().expect("the head's input")) {
            let x = Tensor::<B, 3>::from_inner(x).require_grad();
            let logits = head.forward(x.clone());
            let loss = cross_entropy(logits, tokens(&m.batch.targets, &m.batch, device));
            loss_sum += m.weight * loss.clone().into_scalar().elem::<f64>();
            let grads = loss.mul_scalar(m.weight).backward();
            if n > 1 {
                upstream.push(
                    x.grad(&grads)
                        .expect("the head's input requires a gradient"),
                );
            }
            acc.accumulate(&head, GradientsParams::from_grads(grads, &head));
        }
        let acc = head_unit.flatten_grads_flat::<B>(&head, &acc.grads());
        drop(head);
        scatters.start(s, n - 1, head_unit.layout, acc)?;

        let t_head = t0.elapsed();
        // Blocks in reverse: re-gather, recompute, back-propagate.
        for ui in (first..n - 1).rev() {
            let Kind::Block(index, u) = &self.units[ui].kind else {
                unreachable!("units between the embedding and the head are blocks")
            };
            let block = u.assemble_flat::<B>(gathers.next(&self.units, s)?);
            let inputs = saved.pop().expect("a saved input per block");
            let mut acc = GradientsAccumulator::<Block<B>>::new();
            let needs_input_grad = ui > 0;
            for (x, g) in inputs.into_iter().zip(upstream.iter_mut()) {
                let x = Tensor::<B, 3>::from_inner(x);
                let x = if needs_input_grad {
                    x.require_grad()
                } else {
                    x
                };
                let mut y = block.forward(x.clone(), rope);
                if adapter_depth == Some(index + 1) {
                    y = adapter.forward(y, index + 1);
                }
                let surrogate = (y * Tensor::<B, 3>::from_inner(g.clone())).sum();
                let grads = surrogate.backward();
                if needs_input_grad {
                    *g = x
                        .grad(&grads)
                        .expect("the block's input requires a gradient");
                }
                acc.accumulate(&block, GradientsParams::from_grads(grads, &block));
            }
            let acc = u.flatten_grads_flat::<B>(&block, &acc.grads());
            drop(block);
            scatters.start(s, ui, u.layout, acc)?;
        }

        // The embedding.
        if first == 1 {
            let Kind::Embed(u) = &self.units[0].kind else {
                unreachable!("unit 0 is the embedding")
            };
            let embed = u.assemble_flat::<B>(gathers.next(&self.units, s)?);
            let mut acc = GradientsAccumulator::<Embedding<B>>::new();
            for (m, g) in micro.iter().zip(upstream) {
                let y = embed.forward(tokens(&m.batch.inputs, &m.batch, device));
                let y = to_dtype(y, rope.dtype());
                let grads = (y * Tensor::<B, 3>::from_inner(g)).sum().backward();
                acc.accumulate(&embed, GradientsParams::from_grads(grads, &embed));
            }
            let acc = u.flatten_grads_flat::<B>(&embed, &acc.grads());
            drop(embed);
            scatters.start(s, 0, u.layout, acc)?;
        }
        self.memory.gathered_peak_bytes = self.memory.gathered_peak_bytes.max(gathers.peak);
        self.memory.grad_bytes = self.memory.params_bytes + scatters.peak;
        let shards = scatters.finish()?;
        tracing::trace!(
            forward_ms = t_forward.as_secs_f64() * 1e3,
            head_ms = (t_head - t_forward).as_secs_f64() * 1e3,
            backward_ms = (t0.elapsed() - t_head).as_secs_f64() * 1e3,
            "sharded step phases"
        );
        Ok((loss_sum, shards))
    }

    /// No activation checkpointing: gather every trained unit, run the route with a graph, keep
    /// the weights until backward is done.
    fn grads_keep<A: Adapter>(
        &mut self,
        s: &CommStream,
        prefetch: bool,
        micro: Vec<MicroBatch<B::InnerBackend>>,
        adapter: &A,
        rope: &RopeTables<B>,
        device: &B::Device,
    ) -> Result<LossAndGrads<B>, CollectiveError> {
        let adapter_depth = self.adapter_depth();
        let n = self.units.len();
        let mut gathers = Gathers::new(0..n, prefetch);
        let mut gathered: Vec<Gathered<B>> = Vec::with_capacity(n);
        let mut gathered_bytes = 0;
        for unit in &self.units {
            let full = gathers.next(&self.units, s)?;
            gathered.push(match &unit.kind {
                Kind::Embed(u) => Gathered::Embed(u.assemble_flat::<B>(full)),
                Kind::Block(i, u) => Gathered::Block(*i, u.assemble_flat::<B>(full)),
                Kind::Head(u) => Gathered::Head(u.assemble_flat::<B>(full)),
            });
            gathered_bytes += with_unit!(&unit.kind, u => u.memory().gathered);
        }
        let mut accs: Vec<Accumulated<B>> = gathered
            .iter()
            .map(|g| match g {
                Gathered::Embed(_) => Accumulated::Embed(GradientsAccumulator::new()),
                Gathered::Block(i, _) => Accumulated::Block(*i, GradientsAccumulator::new()),
                Gathered::Head(_) => Accumulated::Head(GradientsAccumulator::new()),
            })
            .collect();
        let mut loss_sum = 0.0;
        for m in &micro {
            let mut x = match &m.input {
                StepInput::Tokens => None,
                StepInput::Hidden(x) => Some(Tensor::<B, 3>::from_inner(x.clone())),
            };
            let mut logits = None;
            for g in &gathered {
                match g {
                    Gathered::Embed(e) => {
                        let y = e.forward(tokens(&m.batch.inputs, &m.batch, device));
                        x = Some(to_dtype(y, rope.dtype()));
                    }
                    Gathered::Block(i, b) => {
                        let mut y = b.forward(x.take().expect("a block's input"), rope);
                        if adapter_depth == Some(i + 1) {
                            y = adapter.forward(y, i + 1);
                        }
                        x = Some(y);
                    }
                    Gathered::Head(h) => {
                        logits = Some(h.forward(x.take().expect("the head's input")));
                    }
                }
            }
            let loss = cross_entropy(
                logits.expect("the route ends at the head"),
                tokens(&m.batch.targets, &m.batch, device),
            );
            loss_sum += m.weight * loss.clone().into_scalar().elem::<f64>();
            let mut grads = loss.mul_scalar(m.weight).backward();
            for (g, acc) in gathered.iter().zip(&mut accs) {
                match (g, acc) {
                    (Gathered::Embed(e), Accumulated::Embed(a)) => {
                        a.accumulate(e, GradientsParams::from_module(&mut grads, e));
                    }
                    (Gathered::Block(_, b), Accumulated::Block(_, a)) => {
                        a.accumulate(b, GradientsParams::from_module(&mut grads, b));
                    }
                    (Gathered::Head(h), Accumulated::Head(a)) => {
                        a.accumulate(h, GradientsParams::from_module(&mut grads, h));
                    }
                    _ => unreachable!("one accumulator per gathered unit, same kind"),
                }
            }
        }
        let mut scatters = Scatters::new(n, prefetch);
        for (ui, ((unit, g), acc)) in self.units.iter().zip(&gathered).zip(accs).enumerate() {
            let flat = match (&unit.kind, g, acc) {
                (Kind::Embed(u), Gathered::Embed(e), Accumulated::Embed(mut a)) => {
                    u.flatten_grads_flat::<B>(e, &a.grads())
                }
                (Kind::Block(_, u), Gathered::Block(_, b), Accumulated::Block(_, mut a)) => {
                    u.flatten_grads_flat::<B>(b, &a.grads())
                }
                (Kind::Head(u), Gathered::Head(h), Accumulated::Head(mut a)) => {
                    u.flatten_grads_flat::<B>(h, &a.grads())
                }
                _ => unreachable!("one accumulator per gathered unit, same kind"),
            };
            let layout = with_unit!(&unit.kind, u => u.layout);
            scatters.start(s, ui, layout, flat)?;
        }
        drop(gathered);
        let shards = scatters.finish()?;
        self.memory.gathered_peak_bytes = self.memory.gathered_peak_bytes.max(gathered_bytes);
        self.memory.grad_bytes = self.memory.params_bytes + gathered_bytes;
        self.memory.activation_bytes = 0;
        Ok((loss_sum, shards))
    }
}
