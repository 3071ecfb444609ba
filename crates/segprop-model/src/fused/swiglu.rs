//! [`swiglu`]: the MLP's `silu(gate) ⊙ up` as one op. Composed, autodiff recorded a sigmoid, a
//! product with `gate` and a product with `up`, keeping the sigmoid, `silu(gate)` and both
//! inputs. As one op it keeps `gate` and `up`, recomputes `σ(gate)` in the backward pass, and
//! gives `d gate = g ⊙ up ⊙ σ (1 + gate (1 − σ))`, `d up = g ⊙ silu(gate)`.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::prelude::*;
use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::ops::FloatTensor;

use super::{Fused, cast, dispatch, flex_f32, flex_kernels, wrap};

/// `silu(gate) ⊙ up`, in the inputs' dtype. 16-bit inputs take burn's composition: the fused
/// backward pass rounded in 16 bits drifted further from an f32 run (`tests/mixed_precision.rs`
/// in segprop-train: f16 worst step 0.073 against 0.024).
///
/// # Shapes
/// - gate, up: `[batch, seq, intermediate]`
/// - output: the same
pub fn swiglu<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
    if gate.dtype() != burn::tensor::DType::F32 {
        return silu(gate) * up;
    }
    let op = Op::<B> {
        gate: gate.into_primitive().tensor(),
        up: up.into_primitive().tensor(),
    };
    match dispatch::<B, _>(op) {
        Ok(y) => wrap(y),
        Err(Op { gate, up }) => wrap(inner_forward::<B>(gate, up)),
    }
}

struct Op<B: Backend> {
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
}

impl<B: Backend> Fused<B> for Op<B> {
    fn on<I: Backend>(self) -> FloatTensor<B> {
        cast(forward::<I, NoCheckpointing>(
            cast(self.gate),
            cast(self.up),
        ))
    }
}

/// Flex's kernel in f32, burn's ops otherwise.
fn inner_forward<I: Backend>(gate: FloatTensor<I>, up: FloatTensor<I>) -> FloatTensor<I> {
    match flex_f32::<I, 2>([gate, up]) {
        Ok([gate, up]) => cast(flex_kernels::swiglu_forward(&gate, &up)),
        Err([gate, up]) => (silu(wrap::<I, 3>(gate)) * wrap::<I, 3>(up))
            .into_primitive()
            .tensor(),
    }
}

/// `(d gate, d up)`.
fn inner_backward<I: Backend>(
    grad: FloatTensor<I>,
    gate: FloatTensor<I>,
    up: FloatTensor<I>,
) -> (FloatTensor<I>, FloatTensor<I>) {
    match flex_f32::<I, 3>([grad, gate, up]) {
        Ok([grad, gate, up]) => {
            let (dgate, dup) = flex_kernels::swiglu_backward(&grad, &gate, &up);
            (cast(dgate), cast(dup))
        }
        Err([grad, gate, up]) => {
            let (g, a, b) = (wrap::<I, 3>(grad), wrap::<I, 3>(gate), wrap::<I, 3>(up));
            let s = sigmoid(a.clone());
            let silu = a.clone() * s.clone();
            let dgate = g.clone() * b * s.clone() * (a * (s.neg() + 1.0) + 1.0);
            let dup = g * silu;
            (
                dgate.into_primitive().tensor(),
                dup.into_primitive().tensor(),
            )
        }
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl<I: Backend> Backward<I, 2> for SwigluBackward {
    /// `gate` and `up`.
    type State = (FloatTensor<I>, FloatTensor<I>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (gate, up) = ops.state;
        let grad = grads.consume::<I>(&ops.node);
        let (dgate, dup) = inner_backward::<I>(grad, gate, up);
        let [gate_node, up_node] = ops.parents;
        if let Some(node) = gate_node {
            grads.register::<I>(node.id, dgate);
        }
        if let Some(node) = up_node {
            grads.register::<I>(node.id, dup);
        }
    }
}

fn forward<I: Backend, C: CheckpointStrategy>(
    gate: FloatTensor<Autodiff<I, C>>,
    up: FloatTensor<Autodiff<I, C>>,
) -> FloatTensor<Autodiff<I, C>> {
    match SwigluBackward
        .prepare::<C>([gate.node.clone(), up.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let y = inner_forward::<I>(gate.primitive.clone(), up.primitive.clone());
            prep.finish((gate.primitive, up.primitive), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(inner_forward::<I>(gate.primitive, up.primitive)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_support::{close, value_and_grads};
    use burn::backend::{Flex, NdArray};
    use burn::tensor::backend::AutodiffBackend;

    /// `y`, `d gate` and `d up` of `Σ w ⊙ swiglu(gate, up)`, fused or composed.
    fn run<A: AutodiffBackend>(fused: bool) -> Vec<Vec<f32>> {
        let shape = [4, 75, 61];
        let up: Vec<f32> = (0..4 * 75 * 61)
            .map(|i| ((i * 3 % 13) as f32 - 6.0) * 0.25)
            .collect();
        let up = Tensor::<A, 1>::from_floats(up.as_slice(), &Default::default()).require_grad();
        value_and_grads::<A, 3, 3>(shape, |gate| {
            let u = up.clone().reshape(shape);
            let y = if fused {
                swiglu(gate, u)
            } else {
                silu(gate) * u
            };
            (y, vec![up.clone()])
        })
    }

    #[test]
    fn fused_swiglu_matches_the_composed_ops_in_value_and_gradients() {
        for (fused, composed) in [
            (run::<Autodiff<Flex>>(true), run::<Autodiff<Flex>>(false)),
            (
                run::<Autodiff<NdArray>>(true),
                run::<Autodiff<NdArray>>(false),
            ),
        ] {
            for (f, c) in fused.iter().zip(&composed) {
                close(f, c, 1e-5);
            }
        }
    }
}
