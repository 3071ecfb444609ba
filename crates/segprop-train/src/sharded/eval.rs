//! Forward-only passes over sharded units, one unit gathered at a time: held-out losses of a
//! stage's route and of the whole model, and SnapCheck advances, without ever gathering more
//! than one unit.

use burn::module::AutodiffModule;
use burn::prelude::*;
use burn::tensor::ElementConversion;
use burn::tensor::backend::AutodiffBackend;
use segprop_model::RopeTables;
use segprop_model::model::cross_entropy;
use segprop_model::precision::to_dtype;
use segprop_shard::{CollectiveError, CommStream};

use super::model::ModelShards;
use super::{Kind, ShardedStage};
use crate::adapter::Adapter;

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// What flows between units of a forward-only pass.
pub enum Flow<I: Backend> {
    /// Token ids (before the embedding).
    Tokens(Vec<Tensor<I, 2, Int>>),
    /// Hidden states `[batch, seq, hidden]`.
    Hidden(Vec<Tensor<I, 3>>),
}

/// Runs `flow` through `units` in order, each all-gathered in its compute dtype, applied to
/// every input without a graph and freed; the head ends with the loss of each input against
/// `targets`. `adapter_depth`: the adapter follows block `adapter_depth - 1`.
pub(super) fn losses<B: AutodiffBackend, A: Adapter>(
    units: &[&Kind<B>],
    s: &CommStream,
    mut flow: Flow<Inner<B>>,
    targets: &[Tensor<Inner<B>, 2, Int>],
    (adapter, adapter_depth): (&A, Option<usize>),
    rope: &RopeTables<Inner<B>>,
) -> Result<Vec<f64>, CollectiveError> {
    for kind in units {
        flow = match (kind, flow) {
            (Kind::Embed(u), Flow::Tokens(tokens)) => {
                let embed = u
                    .assemble_flat::<B>(u.start_gather_flat::<B::InnerBackend>(s).wait()?)
                    .valid();
                Flow::Hidden(
                    tokens
                        .into_iter()
                        .map(|t| to_dtype(embed.forward(t), rope.dtype()))
                        .collect(),
                )
            }
            (Kind::Block(index, u), Flow::Hidden(xs)) => {
                let block = u
                    .assemble_flat::<B>(u.start_gather_flat::<B::InnerBackend>(s).wait()?)
                    .valid();
                Flow::Hidden(
                    xs.into_iter()
                        .map(|x| {
                            let y = block.forward(x, rope);
                            if adapter_depth == Some(index + 1) {
                                adapter.forward(y, index + 1)
                            } else {
                                y
                            }
                        })
                        .collect(),
                )
            }
            (Kind::Head(u), Flow::Hidden(xs)) => {
                let head = u
                    .assemble_flat::<B>(u.start_gather_flat::<B::InnerBackend>(s).wait()?)
                    .valid();
                return Ok(xs
                    .into_iter()
                    .zip(targets)
                    .map(|(x, t)| {
                        cross_entropy(head.forward(x), t.clone())
                            .into_scalar()
                            .elem::<f64>()
                    })
                    .collect());
            }
            _ => unreachable!("units run embedding, blocks, head, in that order"),
        };
    }
    unreachable!("a forward pass ends at the head")
}

impl<B: AutodiffBackend> ShardedStage<B> {
    /// The loss of each input through the stage's trained units (its route after the frozen
    /// prefix). Every rank must call it, with any number of inputs.
    pub fn route_losses<A: Adapter>(
        &mut self,
        s: &CommStream,
        flow: Flow<Inner<B>>,
        targets: &[Tensor<Inner<B>, 2, Int>],
        adapter: &A,
        rope: &RopeTables<Inner<B>>,
    ) -> Result<Vec<f64>, CollectiveError> {
        // What an evaluation moves is not a training step's traffic.
        self.prefix_comm = (0, 0);
        let units: Vec<&Kind<B>> = self.units.iter().map(|u| &u.kind).collect();
        losses(
            &units,
            s,
            flow,
            targets,
            (adapter, self.adapter_depth()),
            rope,
        )
    }
}

impl<B: AutodiffBackend> ModelShards<B> {
    /// The loss of each token input through the whole model (embedding, every block, head).
    /// Every rank must call it, with any number of inputs.
    pub fn full_losses(
        &self,
        s: &CommStream,
        tokens: Vec<Tensor<Inner<B>, 2, Int>>,
        targets: &[Tensor<Inner<B>, 2, Int>],
        rope: &RopeTables<Inner<B>>,
    ) -> Result<Vec<f64>, CollectiveError> {
        const HELD: &str = "units are in their slots between stages";
        let embed = self.embed.as_ref().expect(HELD);
        let m = embed
            .assemble_flat::<B>(embed.start_gather_flat::<B::InnerBackend>(s).wait()?)
            .valid();
        let mut xs: Vec<Tensor<Inner<B>, 3>> = tokens
            .into_iter()
            .map(|t| to_dtype(m.forward(t), rope.dtype()))
            .collect();
        drop(m);
        for slot in &self.blocks {
            let u = slot.as_ref().expect(HELD);
            let block = u
                .assemble_flat::<B>(u.start_gather_flat::<B::InnerBackend>(s).wait()?)
                .valid();
            xs = xs.into_iter().map(|x| block.forward(x, rope)).collect();
        }
        let head = self.head.as_ref().expect(HELD);
        let m = head
            .assemble_flat::<B>(head.start_gather_flat::<B::InnerBackend>(s).wait()?)
            .valid();
        Ok(xs
            .into_iter()
            .zip(targets)
            .map(|(x, t)| {
                cross_entropy(m.forward(x), t.clone())
                    .into_scalar()
                    .elem::<f64>()
            })
            .collect())
    }

    /// Gathers each block of `range` in turn for `step(b, block)` (a SnapCheck advance runs
    /// it over every cached input) and frees it before the next. Every rank must call it; an
    /// I/O error of `step` names `spill` (the SnapCheck spill directory).
    pub fn for_each_block(
        &self,
        s: &CommStream,
        range: std::ops::Range<usize>,
        spill: &std::path::Path,
        mut step: impl FnMut(usize, &segprop_model::Block<Inner<B>>) -> std::io::Result<()>,
    ) -> Result<(), crate::TrainError> {
        for b in range {
            let u = self.blocks[b].as_ref().expect("units are in their slots");
            let block = u
                .assemble_flat::<B>(u.start_gather_flat::<B::InnerBackend>(s).wait()?)
                .valid();
            step(b, &block).map_err(crate::TrainError::io(spill))?;
        }
        Ok(())
    }
}

/// One input of [`ModelShards::forward_to`]: token ids (entering at the embedding) or hidden
/// states `S[depth]` (entering at block `depth`).
pub enum Entry<I: Backend> {
    Tokens(Tensor<I, 2, Int>),
    Hidden(usize, Tensor<I, 3>),
}

impl<B: AutodiffBackend> ModelShards<B> {
    /// Runs every input from where it enters to the output of block `to - 1`, without a graph,
    /// gathering the embedding (when `from_embed`) and then blocks `first..to` one at a time,
    /// each freed before the next. Every rank calls it with the same `from_embed`, `first` and
    /// `to` (its own inputs may differ, or be none); an input entering at block `d` skips the
    /// blocks below `d`.
    pub fn forward_to(
        &self,
        s: &CommStream,
        inputs: Vec<Entry<Inner<B>>>,
        (from_embed, first, to): (bool, usize, usize),
        rope: &RopeTables<Inner<B>>,
    ) -> Result<Vec<Tensor<Inner<B>, 3>>, CollectiveError> {
        const HELD: &str = "units are in their slots between stages";
        let mut xs: Vec<(usize, Option<Tensor<Inner<B>, 3>>)> = Vec::with_capacity(inputs.len());
        let mut tokens = Vec::new();
        for (i, entry) in inputs.into_iter().enumerate() {
            match entry {
                Entry::Tokens(t) => {
                    tokens.push((i, t));
                    xs.push((0, None));
                }
                Entry::Hidden(depth, z) => xs.push((depth, Some(z))),
            }
        }
        assert!(
            from_embed || tokens.is_empty(),
            "token inputs need the embedding gathered"
        );
        if from_embed {
            let embed = self.embed.as_ref().expect(HELD);
            let m = embed
                .assemble_flat::<B>(embed.start_gather_flat::<B::InnerBackend>(s).wait()?)
                .valid();
            for (i, t) in tokens {
                xs[i].1 = Some(to_dtype(m.forward(t), rope.dtype()));
            }
        }
        for b in first..to {
            let u = self.blocks[b].as_ref().expect(HELD);
            let block = u
                .assemble_flat::<B>(u.start_gather_flat::<B::InnerBackend>(s).wait()?)
                .valid();
            for (depth, x) in xs.iter_mut() {
                if *depth <= b {
                    let z = x.take().expect("every input has entered by its depth");
                    *x = Some(block.forward(z, rope));
                }
            }
        }
        Ok(xs
            .into_iter()
            .map(|(_, x)| x.expect("every input ran"))
            .collect())
    }
}
