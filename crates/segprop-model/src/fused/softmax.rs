//! [`causal_softmax`], the attention's `softmax(mask(QKᵀ / √d))`. Composed from burn's tensor
//! ops, autodiff records five element-wise nodes over the `[batch, heads, seq, seq]` scores
//! (scale, mask, and softmax's shift, exp, sum and division), keeps several of those tensors for
//! the backward pass and runs a broadcast division's backward over them. As one op it keeps only
//! the probabilities `y`, and the backward pass is `dx = y ⊙ (g − Σ_row g ⊙ y) / √d` (masked
//! positions have `y = 0`, so their gradient is 0). On flex in f32 both passes are one
//! row-parallel kernel each ([`flex_kernels`]) that reads the causal mask off the row index, so
//! no mask tensor is built or broadcast: composed, flex expanded the `[rows, seq]` mask over the
//! batch on the calling thread (the largest single-threaded cost of the step).

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, FloatDType, TensorPrimitive};

use super::{Fused, cast, dispatch, flex_f32, flex_kernels, wrap};

/// `softmax(mask_fill(scores / divisor, future, −∞))` over the last dimension, taken in fp32
/// when `scores` is a 16-bit type and returned in its dtype. Row `r` of each `[rows, seq]`
/// block is query position `r mod seq` (grouped-query attention stacks the query heads of a
/// key/value head along the rows) and sees key positions `0..=r mod seq`.
///
/// # Shapes
/// - scores: `[batch, heads, rows, seq]`, `rows` a multiple of `seq`
/// - output: same as scores
pub fn causal_softmax<B: Backend>(scores: Tensor<B, 4>, divisor: f64) -> Tensor<B, 4> {
    let [_, _, rows, seq] = scores.dims();
    assert!(
        seq > 0 && rows % seq == 0,
        "causal_softmax: {rows} rows are not whole blocks of {seq} positions"
    );
    let dtype = scores.dtype();
    let wide = matches!(dtype, DType::F32 | DType::F64);
    let scores = if wide {
        scores
    } else {
        scores.cast(FloatDType::F32)
    };
    let x = scores.into_primitive().tensor();
    let y = match dispatch::<B, _>(Op { x, divisor }) {
        Ok(y) => y,
        Err(Op { x, divisor }) => inner_forward::<B>(x, divisor),
    };
    let y = Tensor::<B, 4>::from_primitive(TensorPrimitive::Float(y));
    if wide { y } else { y.cast(dtype) }
}

/// The future positions to hide, `[rows, seq]`: true strictly above the diagonal of each of
/// the `rows / seq` stacked `seq x seq` blocks.
fn causal_mask<B: Backend>(rows: usize, seq: usize, device: &B::Device) -> Tensor<B, 2, Bool> {
    let mask = Tensor::<B, 2, Bool>::tril_mask([seq, seq], 0, device);
    match rows / seq {
        1 => mask,
        blocks => mask.repeat_dim(0, blocks),
    }
}

/// The same function from burn's tensor ops (any backend).
fn composed<B: Backend>(x: FloatTensor<B>, divisor: f64) -> FloatTensor<B> {
    let x = wrap::<B, 4>(x);
    let [_, _, rows, seq] = x.dims();
    let mask = causal_mask::<B>(rows, seq, &x.device()).unsqueeze::<4>();
    burn::tensor::activation::softmax(x.div_scalar(divisor).mask_fill(mask, f32::NEG_INFINITY), 3)
        .into_primitive()
        .tensor()
}

/// Flex's kernel in f32, burn's ops otherwise.
fn inner_forward<I: Backend>(x: FloatTensor<I>, divisor: f64) -> FloatTensor<I> {
    match flex_f32::<I, 1>([x]) {
        Ok([x]) => cast(flex_kernels::causal_softmax_forward(&x, divisor as f32)),
        Err([x]) => composed::<I>(x, divisor),
    }
}

/// `dx = y ⊙ (g − Σ_row g ⊙ y) / divisor`.
fn inner_backward<I: Backend>(
    g: FloatTensor<I>,
    y: FloatTensor<I>,
    divisor: f64,
) -> FloatTensor<I> {
    match flex_f32::<I, 2>([g, y]) {
        Ok([g, y]) => cast(flex_kernels::softmax_backward(&g, &y, divisor as f32)),
        Err([g, y]) => {
            let gy = I::float_mul(g, y.clone());
            let row = I::float_sum_dim(gy.clone(), 3);
            let dx = I::float_sub(gy, I::float_mul(y, row));
            I::float_div_scalar(dx, divisor.into())
        }
    }
}

struct Op<B: Backend> {
    x: FloatTensor<B>,
    divisor: f64,
}

impl<B: Backend> Fused<B> for Op<B> {
    fn on<I: Backend>(self) -> FloatTensor<B> {
        cast(forward::<I, NoCheckpointing>(cast(self.x), self.divisor))
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
            inner_backward::<I>(g, y, divisor)
        });
    }
}

fn forward<I: Backend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<I, C>>,
    divisor: f64,
) -> FloatTensor<Autodiff<I, C>> {
    match CausalSoftmax
        .prepare::<C>([x.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let y = inner_forward::<I>(x.primitive, divisor);
            prep.finish((y.clone(), divisor), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(inner_forward::<I>(x.primitive, divisor)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_support::{close, value_and_grads};
    use burn::backend::{Flex, NdArray};
    use burn::tensor::backend::AutodiffBackend;

    /// Two query heads stacked on each key/value head, rows spanning several kernel chunks.
    const SHAPE: [usize; 4] = [2, 3, 2 * 40, 40];

    /// `y` and `dx` of `Σ w ⊙ softmax(x)`, fused or composed, in `dtype`.
    fn run<A: AutodiffBackend>(fused: bool, dtype: FloatDType) -> Vec<Vec<f32>> {
        value_and_grads::<A, 4, 4>(SHAPE, |x| {
            let x = x.cast(dtype);
            let y = if fused {
                causal_softmax(x, 8f64.sqrt())
            } else {
                let wide = x.cast(FloatDType::F32).into_primitive().tensor();
                wrap::<A, 4>(composed::<A>(wide, 8f64.sqrt())).cast(dtype)
            };
            (y.cast(FloatDType::F32), vec![])
        })
    }

    #[test]
    fn fused_causal_softmax_matches_the_composed_ops_in_value_and_gradient() {
        for (fused, composed) in [
            (
                run::<Autodiff<Flex>>(true, FloatDType::F32),
                run::<Autodiff<Flex>>(false, FloatDType::F32),
            ),
            (
                run::<Autodiff<NdArray>>(true, FloatDType::F32),
                run::<Autodiff<NdArray>>(false, FloatDType::F32),
            ),
        ] {
            for (f, c) in fused.iter().zip(&composed) {
                close(f, c, 1e-6);
            }
            let (y, dx) = (&fused[0], &fused[1]);
            let seq = SHAPE[3];
            // Row 0 sees only position 0: probability 1 there, no gradient anywhere in the row.
            assert_eq!(y[0], 1.0);
            assert!(y[1..seq].iter().chain(&dx[..seq]).all(|v| *v == 0.0));
            // Row `seq` is the second stacked head's position 0: the same.
            assert_eq!(y[seq * seq], 1.0);
            // Every row sums to one.
            for row in y.chunks(seq) {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
            }
        }
        let fused = run::<Autodiff<Flex>>(true, FloatDType::BF16);
        let composed = run::<Autodiff<Flex>>(false, FloatDType::BF16);
        for (f, c) in fused.iter().zip(&composed) {
            close(f, c, 1e-2);
        }
    }

    #[test]
    fn inference_on_flex_computes_what_training_computes() {
        let device = Default::default();
        let n: usize = SHAPE.iter().product();
        let values: Vec<f32> = (0..n).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3).collect();
        let plain = causal_softmax(
            Tensor::<Flex, 4>::from_data(TensorData::new(values.clone(), SHAPE), &device),
            2.0,
        );
        let tracked = causal_softmax(
            Tensor::<Autodiff<Flex>, 4>::from_data(TensorData::new(values, SHAPE), &device)
                .require_grad(),
            2.0,
        );
        assert_eq!(plain.into_data(), tracked.inner().into_data());
    }

    #[test]
    fn the_fused_op_runs_on_the_training_backends_only() {
        fn runs<B: Backend>() -> bool {
            let device = Default::default();
            let x = Tensor::<B, 4>::zeros([1, 1, 2, 2], &device)
                .into_primitive()
                .tensor();
            dispatch::<B, _>(Op::<B> { x, divisor: 1.0 }).is_ok()
        }
        assert!(runs::<Autodiff<Flex>>());
        assert!(runs::<Autodiff<NdArray>>());
        assert!(!runs::<Flex>());
        assert!(!runs::<NdArray>());
    }
}
