//! [`split_heads`] and [`merge_heads`]: the attention's change of layout between the
//! projections' `[batch, seq, heads · d]` and the heads-first `[batch, heads, seq, d]` its matmuls
//! take, with the rotary embedding of queries and keys done on the way in. Composed, this was a
//! reshape, RoPE's five element-wise nodes (two products with the tables, a negation, a
//! concatenation, a sum) and a `swap_dims` view that the next reshape copied on one thread
//! through flex's strided iterator, and the same again backward. As one op it is one parallel
//! pass each way (flex f32; the backward pass rotates back by the transposed rotation) and keeps
//! nothing but the tables.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::ops::FloatTensor;

use super::flex_kernels::{self, Rotation};
use super::{Fused, cast, dispatch, flex_f32, wrap};
use crate::rope::RopeTables;

/// `[batch, seq, heads · d] → [batch, heads, seq, d]`, rotated by position when `rope` is given.
///
/// # Shapes
/// - x: `[batch, seq, heads * head_dim]`
/// - output: `[batch, heads, seq, head_dim]`, contiguous
pub fn split_heads<B: Backend>(
    x: Tensor<B, 3>,
    heads: usize,
    rope: Option<&RopeTables<B>>,
) -> Tensor<B, 4> {
    let [batch, seq, width] = x.dims();
    let x = x.reshape([batch, seq, heads, width / heads]);
    if x.dtype() != DType::F32 || rope.is_some_and(|r| r.dtype() != DType::F32) {
        return composed_split(x, rope);
    }
    let op = Op::<B> {
        x: x.into_primitive().tensor(),
        tables: rope.map(|r| {
            (
                r.cos.clone().into_primitive().tensor(),
                r.sin.clone().into_primitive().tensor(),
            )
        }),
        split: true,
    };
    match dispatch::<B, _>(op) {
        Ok(y) => wrap(y),
        Err(op) => wrap(inner::<B>(op.x, op.tables.as_ref(), true)),
    }
}

/// `[batch, heads, seq, d] → [batch, seq, heads · d]`.
pub fn merge_heads<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [batch, heads, seq, d] = x.dims();
    let y: Tensor<B, 4> = if x.dtype() != DType::F32 {
        x.swap_dims(1, 2)
    } else {
        let op = Op::<B> {
            x: x.into_primitive().tensor(),
            tables: None,
            split: false,
        };
        match dispatch::<B, _>(op) {
            Ok(y) => wrap(y),
            Err(op) => wrap(inner::<B>(op.x, None, false)),
        }
    };
    y.reshape([batch, seq, heads * d])
}

/// RoPE then `swap_dims`, from burn's ops (any backend and dtype).
fn composed_split<B: Backend>(x: Tensor<B, 4>, rope: Option<&RopeTables<B>>) -> Tensor<B, 4> {
    match rope {
        Some(rope) => rope.apply(x).swap_dims(1, 2),
        None => x.swap_dims(1, 2),
    }
}

type Tables<B> = (FloatTensor<B>, FloatTensor<B>);

struct Op<B: Backend> {
    /// `[batch, seq, heads, d]` to split, `[batch, heads, seq, d]` to merge.
    x: FloatTensor<B>,
    tables: Option<Tables<B>>,
    split: bool,
}

impl<B: Backend> Fused<B> for Op<B> {
    fn on<I: Backend>(self) -> FloatTensor<B> {
        // The tables are constants: their inner tensors are all the op needs.
        let tables = self.tables.map(|(cos, sin)| {
            let (cos, sin): Tables<Autodiff<I>> = (cast(cos), cast(sin));
            (cos.primitive, sin.primitive)
        });
        cast(forward::<I, NoCheckpointing>(
            cast(self.x),
            tables,
            self.split,
        ))
    }
}

/// Axes 1 and 2 swapped into contiguous memory, rotated on the way in (`split`) or rotated back
/// on the way out (with tables and not `split`: the split's backward pass). Flex's kernel in
/// f32, burn's ops otherwise.
fn inner<I: Backend>(x: FloatTensor<I>, tables: Option<&Tables<I>>, split: bool) -> FloatTensor<I> {
    let Some((cos, sin)) = tables else {
        return match flex_f32::<I, 1>([x]) {
            Ok([x]) => cast(flex_kernels::swap_middle(&x, None)),
            Err([x]) => wrap::<I, 4>(x).swap_dims(1, 2).into_primitive().tensor(),
        };
    };
    match flex_f32::<I, 3>([x, cos.clone(), sin.clone()]) {
        Ok([x, cos, sin]) => {
            let rotation = Rotation {
                cos: &cos,
                sin: &sin,
                // The position is the sequence axis: 1 in `[b, s, h, d]`, 2 in `[b, h, s, d]`.
                position_axis: if split { 1 } else { 2 },
                inverse: !split,
            };
            cast(flex_kernels::swap_middle(&x, Some(rotation)))
        }
        Err([x, cos, sin]) => {
            let x = wrap::<I, 4>(x);
            let (cos, sin) = (wrap::<I, 2>(cos), wrap::<I, 2>(sin));
            let y = if split {
                RopeTables { cos, sin }.apply(x).swap_dims(1, 2)
            } else {
                // Back from `[b, h, s, d]`: the transposed rotation is the rotation by −θ.
                RopeTables {
                    cos,
                    sin: sin.neg(),
                }
                .apply(x.swap_dims(1, 2))
            };
            y.into_primitive().tensor()
        }
    }
}

#[derive(Debug)]
struct HeadsBackward;

impl<I: Backend> Backward<I, 1> for HeadsBackward {
    /// The rotary tables, and whether the forward pass split (else merged).
    type State = (Option<Tables<I>>, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (tables, split) = ops.state;
        unary::<I, _>(ops.parents, ops.node, grads, |g| {
            // The gradient goes the other way: a split's is merged (and rotated back).
            inner::<I>(g, tables.as_ref(), !split)
        });
    }
}

fn forward<I: Backend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<I, C>>,
    tables: Option<Tables<I>>,
    split: bool,
) -> FloatTensor<Autodiff<I, C>> {
    match HeadsBackward
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let y = inner::<I>(x.primitive, tables.as_ref(), split);
            prep.finish((tables, split), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(inner::<I>(x.primitive, tables.as_ref(), split)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_support::{close, value_and_grads};
    use burn::backend::{Flex, NdArray};
    use burn::tensor::backend::AutodiffBackend;
    use segprop_core::LlamaConfig;

    /// Split (rotated or not) then merge, fused or composed: values and input gradient.
    fn run<A: AutodiffBackend>(fused: bool, rotate: bool) -> Vec<Vec<f32>> {
        let mut config = LlamaConfig::preset("tiny").expect("preset");
        config.hidden_size = 4 * 16;
        config.num_heads = 4;
        let rope = RopeTables::<A>::new(&config, 40, &Default::default());
        let (batch, seq, heads, d) = (3, 37, 4, 16);
        value_and_grads::<A, 3, 4>([batch, seq, heads * d], |x| {
            let rope = rotate.then_some(&rope);
            let split = if fused {
                split_heads(x, heads, rope)
            } else {
                composed_split(x.reshape([batch, seq, heads, d]), rope)
            };
            // Merge back and split again so both directions are checked, forward and backward.
            let merged = if fused {
                merge_heads(split * 1.5)
            } else {
                (split * 1.5)
                    .swap_dims(1, 2)
                    .reshape([batch, seq, heads * d])
            };
            let y = if fused {
                split_heads(merged, heads, None)
            } else {
                composed_split(merged.reshape([batch, seq, heads, d]), None)
            };
            (y, vec![])
        })
    }

    #[test]
    fn fused_heads_match_the_composed_ops_in_value_and_gradient() {
        for rotate in [false, true] {
            for (fused, composed) in [
                (
                    run::<Autodiff<Flex>>(true, rotate),
                    run::<Autodiff<Flex>>(false, rotate),
                ),
                (
                    run::<Autodiff<NdArray>>(true, rotate),
                    run::<Autodiff<NdArray>>(false, rotate),
                ),
            ] {
                for (f, c) in fused.iter().zip(&composed) {
                    close(f, c, 1e-6);
                }
            }
        }
    }

    #[test]
    fn inference_on_flex_computes_what_training_computes() {
        let config = LlamaConfig::preset("tiny").expect("preset");
        let (heads, d) = (config.num_heads, config.head_dim());
        let device = Default::default();
        let x = Tensor::<Flex, 3>::random(
            [2, 9, heads * d],
            burn::tensor::Distribution::Default,
            &device,
        );
        let plain = split_heads(
            x.clone(),
            heads,
            Some(&RopeTables::new(&config, 9, &device)),
        );
        let rope = RopeTables::<Autodiff<Flex>>::new(&config, 9, &device);
        let tracked = split_heads(Tensor::from_inner(x).require_grad(), heads, Some(&rope));
        assert_eq!(plain.into_data(), tracked.inner().into_data());
    }
}
