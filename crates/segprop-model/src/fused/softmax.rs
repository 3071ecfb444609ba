//! [`causal_softmax`], the attention's `softmax(mask(QKᵀ / √d))`. Composed from burn's tensor
//! ops, autodiff records five element-wise nodes over the `[batch, heads, seq, seq]` scores
//! (scale, mask, and softmax's shift, exp, sum and division), keeps several of those tensors for
//! the backward pass and runs a broadcast division's backward over them. As one op the forward
//! pass runs on the inner backend (burn's flex backend fuses the softmax into one row-parallel
//! kernel), keeps only the probabilities `y`, and the backward pass is
//! `dx = y ⊙ (g − Σ_row g ⊙ y) / √d` (masked positions have `y = 0`, so their gradient is 0).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::prelude::*;
use burn::tensor::ops::{BoolTensor, FloatTensor};
use burn::tensor::{DType, FloatDType, TensorPrimitive};

use super::{Fused, cast, dispatch};

/// `softmax(mask_fill(scores / divisor, mask, −∞))` over the last dimension, taken in fp32
/// when `scores` is a 16-bit type and returned in its dtype.
///
/// # Shapes
/// - scores: `[batch, heads, rows, seq]`
/// - mask: `[rows, seq]`, true where a score is hidden
/// - output: same as scores
pub fn causal_softmax<B: Backend>(
    scores: Tensor<B, 4>,
    mask: Tensor<B, 2, Bool>,
    divisor: f64,
) -> Tensor<B, 4> {
    let dtype = scores.dtype();
    let wide = matches!(dtype, DType::F32 | DType::F64);
    let scores = if wide {
        scores
    } else {
        scores.cast(FloatDType::F32)
    };
    let mask = mask.unsqueeze::<4>();
    let x = scores.into_primitive().tensor();
    let m = mask.into_primitive();
    let y = match dispatch::<B, _>(Op {
        x,
        mask: m,
        divisor,
    }) {
        Ok(y) => Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(y)),
        Err(Op { x, mask, divisor }) => composed::<B>(x, mask, divisor),
    };
    if wide { y } else { y.cast(dtype) }
}

/// The same function from burn's tensor ops (any backend; also the forward pass of the fused op).
fn composed<B: Backend>(x: FloatTensor<B>, mask: BoolTensor<B>, divisor: f64) -> Tensor<B, 4> {
    let x = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(x));
    let mask = Tensor::<B, 4, Bool>::from_primitive(mask);
    burn::tensor::activation::softmax(x.div_scalar(divisor).mask_fill(mask, f32::NEG_INFINITY), 3)
}

struct Op<B: Backend> {
    x: FloatTensor<B>,
    mask: BoolTensor<B>,
    divisor: f64,
}

impl<B: Backend> Fused<B> for Op<B> {
    fn on<I: Backend>(self) -> FloatTensor<B> {
        // Autodiff's bool tensors are its inner backend's.
        let y = forward::<I, NoCheckpointing>(cast(self.x), cast(self.mask), self.divisor);
        cast(y)
    }
}

#[derive(Debug)]
struct CausalSoftmax;

impl<I: Backend> Backward<I, 1> for CausalSoftmax {
    /// The probabilities `y` and the divisor.
    type State = (FloatTensor<I>, f64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (y, divisor) = ops.state;
        unary::<I, _>(ops.parents, ops.node, grads, |g| {
            let gy = I::float_mul(g, y.clone());
            let row = I::float_sum_dim(gy.clone(), 3);
            let dx = I::float_sub(gy, I::float_mul(y, row));
            I::float_div_scalar(dx, divisor.into())
        });
    }
}

fn forward<I: Backend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<I, C>>,
    mask: BoolTensor<I>,
    divisor: f64,
) -> FloatTensor<Autodiff<I, C>> {
    match CausalSoftmax
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let y = composed::<I>(x.primitive, mask, divisor)
                .into_primitive()
                .tensor();
            prep.finish((y.clone(), divisor), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(
            composed::<I>(x.primitive, mask, divisor)
                .into_primitive()
                .tensor(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Flex, NdArray};

    /// Value and gradient of `Σ w ⊙ f(x)` for the fused op and for the composition.
    fn both<A: burn::tensor::backend::AutodiffBackend>(
        dtype: FloatDType,
    ) -> [(Vec<f32>, Vec<f32>); 2] {
        let device = Default::default();
        let (rows, seq) = (6, 3); // two query heads stacked on one key/value head
        let values: Vec<f32> = (0..2 * rows * seq)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3)
            .collect();
        let weights: Vec<f32> = (0..2 * rows * seq)
            .map(|i| ((i * 5 % 7) as f32) * 0.1)
            .collect();
        let w = Tensor::<A, 4>::from_data(TensorData::new(weights, [1, 2, rows, seq]), &device);
        let mask = Tensor::<A, 2, Bool>::tril_mask([seq, seq], 0, &device).repeat_dim(0, 2);
        let run = |fused: bool| {
            let x = Tensor::<A, 4>::from_data(
                TensorData::new(values.clone(), [1, 2, rows, seq]),
                &device,
            )
            .cast(dtype)
            .require_grad();
            let y = if fused {
                causal_softmax(x.clone(), mask.clone(), 8f64.sqrt())
            } else {
                let wide = x.clone().cast(FloatDType::F32);
                composed::<A>(
                    wide.into_primitive().tensor(),
                    mask.clone().unsqueeze::<4>().into_primitive(),
                    8f64.sqrt(),
                )
                .cast(dtype)
            };
            let grads = (y.clone().cast(FloatDType::F32) * w.clone())
                .sum()
                .backward();
            let g = x.grad(&grads).expect("x is tracked");
            let flat = |t: Tensor<A::InnerBackend, 4>| {
                t.into_data()
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .expect("f32")
            };
            (flat(y.inner()), flat(g))
        };
        [run(true), run(false)]
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (a, b) in a.iter().zip(b) {
            assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn fused_causal_softmax_matches_the_composed_ops_in_value_and_gradient() {
        for [(fy, fg), (cy, cg)] in [
            both::<Autodiff<Flex>>(FloatDType::F32),
            both::<Autodiff<NdArray>>(FloatDType::F32),
        ] {
            close(&fy, &cy, 1e-6);
            close(&fg, &cg, 1e-6);
            // Row 0 sees only position 0: probability 1 there, no gradient anywhere in the row.
            assert_eq!(&fy[..3], &[1.0, 0.0, 0.0]);
            assert_eq!(&fg[..3], &[0.0, 0.0, 0.0]);
        }
        let [(fy, fg), (cy, cg)] = both::<Autodiff<Flex>>(FloatDType::BF16);
        close(&fy, &cy, 1e-2);
        close(&fg, &cg, 1e-2);
    }

    #[test]
    fn the_fused_op_runs_on_the_training_backends_only() {
        fn runs<B: Backend>() -> bool {
            let device = Default::default();
            let x = Tensor::<B, 4>::zeros([1, 1, 2, 2], &device)
                .into_primitive()
                .tensor();
            let mask = Tensor::<B, 2, Bool>::tril_mask([2, 2], 0, &device).unsqueeze::<4>();
            let op = Op::<B> {
                x,
                mask: mask.into_primitive(),
                divisor: 1.0,
            };
            dispatch::<B, _>(op).is_ok()
        }
        assert!(runs::<Autodiff<Flex>>());
        assert!(runs::<Autodiff<NdArray>>());
        assert!(!runs::<Flex>());
        assert!(!runs::<NdArray>());
    }
}
