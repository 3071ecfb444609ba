//! [`linear`]: `x · W` for a `[rows, k]` input and a `[k, n]` weight (burn's layout), with its
//! own backward pass on flex f32: `dx = g · Wᵀ` when `x` is tracked and `dW = xᵀ · g` when `W`
//! is, each one gemm call ([`super::gemm`]) into a buffer allocated without flex's zero-and-copy.
//! A frozen weight gets no product at all. Other backends and dtypes take burn's `linear`.

use std::any::TypeId;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorData};
use burn_flex::FlexTensor;

use super::gemm::{Matrix, matmul};
use super::{autodiff_of, cast, wrap};

/// `x · weight`, no bias.
///
/// # Shapes
/// - x: `[rows, k]`
/// - weight: `[k, n]`
/// - output: `[rows, n]`
pub fn linear<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 2>) -> Tensor<B, 2> {
    if x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
        return burn::tensor::module::linear(x, weight, None);
    }
    if TypeId::of::<B>() == TypeId::of::<Flex>() {
        // Inference on flex: the forward product alone.
        let (x, w) = (
            x.into_primitive().tensor(),
            weight.into_primitive().tensor(),
        );
        return wrap(cast(product(&cast(x), &cast(w))));
    }
    if !autodiff_of::<B, Flex>() {
        return burn::tensor::module::linear(x, weight, None);
    }
    let x: FloatTensor<Autodiff<Flex>> = cast(x.into_primitive().tensor());
    let w: FloatTensor<Autodiff<Flex>> = cast(weight.into_primitive().tensor());
    wrap(cast(forward::<NoCheckpointing>(x, w)))
}

/// A contiguous copy (or the tensor itself) and its `[rows, cols]`.
fn contiguous(t: &FlexTensor) -> (FlexTensor, usize, usize) {
    let dims = t.layout().shape();
    assert_eq!(dims.num_dims(), 2, "linear takes matrices");
    let (rows, cols) = (dims[0], dims[1]);
    (t.to_contiguous(), rows, cols)
}

fn view(t: &FlexTensor, rows: usize, cols: usize) -> Matrix<'_> {
    let data = t
        .as_slice::<f32>()
        .expect("linear takes contiguous f32 tensors");
    Matrix::row_major(data, rows, cols)
}

fn tensor(values: Vec<f32>, rows: usize, cols: usize) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, [rows, cols]))
}

/// `x · w`.
fn product(x: &FlexTensor, w: &FlexTensor) -> FlexTensor {
    let ((x, rows, k), (w, _, n)) = (contiguous(x), contiguous(w));
    tensor(matmul(view(&x, rows, k), view(&w, k, n)), rows, n)
}

#[derive(Debug)]
struct LinearBackward;

impl Backward<Flex, 2> for LinearBackward {
    /// `x` and the weight.
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, w) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node);
        let ((g, rows, n), (x, _, k)) = (contiguous(&grad), contiguous(&x));
        let [x_node, w_node] = ops.parents;
        if let Some(node) = x_node {
            let (w, _, _) = contiguous(&w);
            let dx = matmul(view(&g, rows, n), view(&w, k, n).t());
            grads.register::<Flex>(node.id, tensor(dx, rows, k));
        }
        if let Some(node) = w_node {
            let dw = matmul(view(&x, rows, k).t(), view(&g, rows, n));
            grads.register::<Flex>(node.id, tensor(dw, k, n));
        }
    }
}

fn forward<C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<Flex, C>>,
    w: FloatTensor<Autodiff<Flex, C>>,
) -> FloatTensor<Autodiff<Flex, C>> {
    match LinearBackward
        .prepare::<C>([x.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let y = product(&x.primitive, &w.primitive);
            prep.finish((x.primitive, w.primitive), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(product(&x.primitive, &w.primitive)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_support::close;
    use burn::backend::NdArray;
    use burn::tensor::backend::AutodiffBackend;

    const ROWS: usize = 130;
    const K: usize = 48;
    const N: usize = 40;

    fn weight<A: Backend>() -> Tensor<A, 2> {
        let values: Vec<f32> = (0..K * N)
            .map(|i| ((i * 3 % 17) as f32 - 8.0) * 0.05)
            .collect();
        Tensor::from_data(TensorData::new(values, [K, N]), &Default::default())
    }

    /// `y`, `dx` and (when trained) `dW` of `Σ v ⊙ linear(x, W)`, fused or burn's `linear`.
    fn run<A: AutodiffBackend>(fused: bool, trained: bool) -> Vec<Vec<f32>> {
        let device = Default::default();
        let values: Vec<f32> = (0..ROWS * K)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3)
            .collect();
        let x =
            Tensor::<A, 2>::from_data(TensorData::new(values, [ROWS, K]), &device).require_grad();
        let w = weight::<A>();
        let w = if trained { w.require_grad() } else { w };
        let y = if fused {
            linear(x.clone(), w.clone())
        } else {
            burn::tensor::module::linear(x.clone(), w.clone(), None)
        };
        let v: Vec<f32> = (0..ROWS * N)
            .map(|i| ((i * 5 % 7) as f32) * 0.1 - 0.2)
            .collect();
        let v = Tensor::<A, 2>::from_data(TensorData::new(v, [ROWS, N]), &device);
        let grads = (y.clone() * v).sum().backward();
        let flat = |t: Tensor<A::InnerBackend, 2>| t.into_data().to_vec::<f32>().expect("f32");
        let mut out = vec![flat(y.inner()), flat(x.grad(&grads).expect("x is tracked"))];
        if trained {
            out.push(flat(w.grad(&grads).expect("the weight is tracked")));
        }
        out
    }

    #[test]
    fn fused_linear_matches_burns_linear_in_value_and_gradients() {
        for trained in [true, false] {
            let pairs = [
                (
                    run::<Autodiff<Flex>>(true, trained),
                    run::<Autodiff<Flex>>(false, trained),
                ),
                (
                    run::<Autodiff<NdArray>>(true, trained),
                    run::<Autodiff<NdArray>>(false, trained),
                ),
            ];
            for (fused, composed) in pairs {
                assert_eq!(fused.len(), 2 + usize::from(trained));
                for (f, c) in fused.iter().zip(&composed) {
                    close(f, c, 1e-5);
                }
            }
        }
    }

    #[test]
    fn a_frozen_weight_gets_no_gradient() {
        let device = Default::default();
        let x = Tensor::<Autodiff<Flex>, 2>::ones([ROWS, K], &device).require_grad();
        let w = weight::<Autodiff<Flex>>();
        let grads = linear(x.clone(), w.clone()).sum().backward();
        assert!(w.grad(&grads).is_none());
        assert!(x.grad(&grads).is_some());
    }

    #[test]
    fn inference_on_flex_computes_what_training_computes() {
        let device = Default::default();
        let values: Vec<f32> = (0..ROWS * K).map(|i| (i % 9) as f32 * 0.1 - 0.4).collect();
        let plain = linear(
            Tensor::<Flex, 2>::from_data(TensorData::new(values.clone(), [ROWS, K]), &device),
            weight::<Flex>(),
        );
        let tracked = linear(
            Tensor::<Autodiff<Flex>, 2>::from_data(TensorData::new(values, [ROWS, K]), &device)
                .require_grad(),
            weight::<Autodiff<Flex>>().require_grad(),
        );
        assert_eq!(plain.into_data(), tracked.inner().into_data());
    }
}
