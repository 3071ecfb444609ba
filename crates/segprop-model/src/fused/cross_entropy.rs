//! [`cross_entropy`]: the mean next-token loss over `[rows, vocab]` logits as one op on flex f32.
//! Composed, the log-softmax ran its max, shift, exp, sum, log and difference as separate passes
//! over the logits on one thread and autodiff kept several vocabulary-wide tensors; as one op
//! it is one parallel pass each way and keeps only the logits and one log-sum-exp per row. The
//! backward pass is `(softmax(x) − onehot(target)) · g / rows`. Other backends and dtypes take
//! the composition.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorData};
use burn_flex::FlexTensor;

use super::{autodiff_of, cast, flex_kernels, same, wrap};

/// A target the loss skips: a prompt token of a chat example, or padding (PyTorch's
/// `ignore_index` default). Re-exported as `segprop_model::model::IGNORE_TARGET`.
pub const IGNORE_TARGET: i64 = -100;

/// Mean cross-entropy of `logits` against `targets`, in fp32, over the rows whose target is not
/// [`IGNORE_TARGET`] (0 when every row is ignored; those rows get no gradient).
///
/// # Shapes
/// - logits: `[rows, vocab]` (f32)
/// - targets: `[rows]`
/// - output: `[1]`
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    if logits.dtype() != DType::F32 {
        return composed(logits, targets);
    }
    let on_flex = autodiff_of::<B, Flex>();
    let primitive = logits.into_primitive().tensor();
    let primitive = match same::<FloatTensor<B>, FlexTensor>(primitive) {
        // Inference on flex: the forward kernel alone.
        Ok(x) => {
            let (loss, _) = flex_kernels::cross_entropy_forward(&x, &indices(targets));
            return wrap(cast(scalar(loss)));
        }
        Err(primitive) => primitive,
    };
    if !on_flex {
        return composed(wrap(primitive), targets);
    }
    let x: FloatTensor<Autodiff<Flex>> = cast(primitive);
    wrap(cast(forward::<NoCheckpointing>(x, indices(targets))))
}

/// burn's log-softmax and gather (any backend and dtype).
fn composed<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let [rows, _] = logits.dims();
    let counted = indices(targets.clone())
        .iter()
        .filter(|t| **t != flex_kernels::SKIP)
        .count();
    let logp = log_softmax(logits, 1);
    if counted == rows {
        return logp.gather(1, targets.reshape([rows, 1])).mean().neg();
    }
    let skipped = targets.clone().equal_elem(IGNORE_TARGET);
    let safe = targets.mask_fill(skipped.clone(), 0);
    let picked = logp.gather(1, safe.reshape([rows, 1])).reshape([rows]);
    picked
        .mask_fill(skipped, 0.0)
        .sum()
        .div_scalar(counted.max(1) as f64)
        .neg()
}

/// Row targets as class indices, [`flex_kernels::SKIP`] for [`IGNORE_TARGET`].
fn indices<B: Backend>(targets: Tensor<B, 1, Int>) -> Vec<usize> {
    targets
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .expect("integer targets")
        .into_iter()
        .map(|t| {
            if t == IGNORE_TARGET {
                flex_kernels::SKIP
            } else {
                usize::try_from(t).expect("a target is a token id or IGNORE_TARGET")
            }
        })
        .collect()
}

fn scalar(value: f32) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(vec![value], [1]))
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl Backward<Flex, 1> for CrossEntropyBackward {
    /// The logits, each row's log-sum-exp, and the targets.
    type State = (FlexTensor, Vec<f32>, Vec<usize>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (logits, lse, targets) = ops.state;
        unary::<Flex, _>(ops.parents, ops.node, grads, |g| {
            let g = g.to_contiguous();
            let g = g.as_slice::<f32>().expect("an f32 scalar gradient")[0];
            let counted = targets.iter().filter(|t| **t != flex_kernels::SKIP).count();
            let scale = g / counted.max(1) as f32;
            flex_kernels::cross_entropy_backward(&logits, &lse, &targets, scale)
        });
    }
}

fn forward<C: CheckpointStrategy>(
    logits: FloatTensor<Autodiff<Flex, C>>,
    targets: Vec<usize>,
) -> FloatTensor<Autodiff<Flex, C>> {
    match CrossEntropyBackward
        .prepare::<C>([logits.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (loss, lse) = flex_kernels::cross_entropy_forward(&logits.primitive, &targets);
            prep.finish((logits.primitive, lse, targets), scalar(loss))
        }
        OpsKind::UnTracked(prep) => {
            let (loss, _) = flex_kernels::cross_entropy_forward(&logits.primitive, &targets);
            prep.finish(scalar(loss))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_support::close;
    use burn::tensor::backend::AutodiffBackend;

    /// Loss and logits gradient, fused or composed, over rows spanning several chunks.
    fn run<A: AutodiffBackend>(fused: bool) -> (Vec<f32>, Vec<f32>) {
        run_masked::<A>(fused, false)
    }

    /// As [`run`], with every third row's target skipped when `masked`.
    fn run_masked<A: AutodiffBackend>(fused: bool, masked: bool) -> (Vec<f32>, Vec<f32>) {
        let device = Default::default();
        let (rows, vocab) = (150, 37);
        let values: Vec<f32> = (0..rows * vocab)
            .map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.4)
            .collect();
        let targets: Vec<i64> = (0..rows)
            .map(|i| {
                if masked && i % 3 == 0 {
                    IGNORE_TARGET
                } else {
                    (i * 5 % vocab) as i64
                }
            })
            .collect();
        let x = Tensor::<A, 1>::from_floats(values.as_slice(), &device)
            .reshape([rows, vocab])
            .require_grad();
        let t = Tensor::<A, 1, Int>::from_ints(targets.as_slice(), &device);
        let loss = if fused {
            cross_entropy(x.clone(), t)
        } else {
            composed(x.clone(), t)
        };
        let grads = (loss.clone() * 3.0).backward();
        let g = x.grad(&grads).expect("tracked");
        (
            loss.inner().into_data().to_vec::<f32>().expect("f32"),
            g.into_data().to_vec::<f32>().expect("f32"),
        )
    }

    #[test]
    fn fused_cross_entropy_matches_the_composed_ops_in_value_and_gradient() {
        let ((fl, fg), (cl, cg)) = (run::<Autodiff<Flex>>(true), run::<Autodiff<Flex>>(false));
        close(&fl, &cl, 1e-6);
        close(&fg, &cg, 1e-6);
        // Plain flex (inference) computes the training value.
        let device = Default::default();
        let x = Tensor::<Flex, 2>::random([9, 11], burn::tensor::Distribution::Default, &device);
        let t = Tensor::<Flex, 1, Int>::from_ints([1, 2, 3, 4, 5, 6, 7, 8, 9], &device);
        let plain = cross_entropy(x.clone(), t.clone()).into_data();
        let tracked = cross_entropy(
            Tensor::<Autodiff<Flex>, 2>::from_inner(x).require_grad(),
            Tensor::from_inner(t),
        );
        assert_eq!(plain, tracked.inner().into_data());
    }

    #[test]
    fn skipped_targets_leave_the_mean_and_get_no_gradient() {
        let ((fl, fg), (cl, cg)) = (
            run_masked::<Autodiff<Flex>>(true, true),
            run_masked::<Autodiff<Flex>>(false, true),
        );
        close(&fl, &cl, 1e-6);
        close(&fg, &cg, 1e-6);
        let vocab = 37;
        for (row, g) in fg.chunks(vocab).enumerate() {
            let zero = g.iter().all(|v| *v == 0.0);
            assert_eq!(zero, row % 3 == 0, "row {row}");
        }
        // The mean is over the 100 counted rows: their losses, by the unmasked run's gradient
        // scale (3 / 150 per row there, 3 / 100 here).
        let (_, all) = run_masked::<Autodiff<Flex>>(true, false);
        for (row, (m, a)) in fg.chunks(vocab).zip(all.chunks(vocab)).enumerate() {
            if row % 3 != 0 {
                close(m, &a.iter().map(|v| v * 1.5).collect::<Vec<_>>(), 1e-6);
            }
        }
        // Every row skipped: loss 0.
        let device = Default::default();
        let x = Tensor::<Flex, 2>::random([4, 5], burn::tensor::Distribution::Default, &device);
        let t = Tensor::<Flex, 1, Int>::from_ints([-100, -100, -100, -100], &device);
        assert_eq!(cross_entropy(x.clone(), t.clone()).into_scalar(), 0.0);
        assert_eq!(composed(x, t).into_scalar(), 0.0);
    }
}
