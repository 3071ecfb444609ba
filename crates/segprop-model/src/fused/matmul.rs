//! [`matmul`]: the attention's batched products (`QKᵀ` with `Kᵀ` a transposed view, and `PV`)
//! and, as [`linear`], the model's projections, with their own backward pass on flex f32,
//! `dA = G · Bᵀ`, `dB = Aᵀ · G` (only for the operands that are tracked). Each matrix of a
//! batch is one single-threaded gemm call on strided views ([`super::gemm`]), the batch spread
//! over the pool; a single matrix is split over the pool by gemm. flex's matmul allocated every
//! output on the calling thread (zeroed, then copied to align it), and autodiff's backward
//! passes went through it again. Other backends and dtypes, and batches that broadcast, take
//! burn's `matmul` (and `linear`).

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

use super::gemm::{Matrix, matmul_batched, matrices};
use super::{autodiff_of, cast, wrap};

/// `a · b` over the last two dimensions, batch dimensions equal (no broadcasting).
///
/// # Shapes
/// - a: `[.., m, k]`
/// - b: `[.., k, n]`
/// - output: `[.., m, n]`
pub fn matmul<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> Tensor<B, D> {
    let (da, db) = (a.dims(), b.dims());
    let fits =
        D >= 2 && da[..D - 2] == db[..D - 2] && a.dtype() == DType::F32 && b.dtype() == DType::F32;
    if !fits {
        return a.matmul(b);
    }
    if TypeId::of::<B>() == TypeId::of::<Flex>() {
        // Inference on flex: the forward products alone.
        let (a, b) = (a.into_primitive().tensor(), b.into_primitive().tensor());
        return wrap(cast(product(&cast(a), &cast(b), false, false)));
    }
    if !autodiff_of::<B, Flex>() {
        return a.matmul(b);
    }
    let a: FloatTensor<Autodiff<Flex>> = cast(a.into_primitive().tensor());
    let b: FloatTensor<Autodiff<Flex>> = cast(b.into_primitive().tensor());
    wrap(cast(forward::<NoCheckpointing>(a, b)))
}

/// `x · weight` without bias, burn's layout (`weight: [k, n]`): [`matmul`]'s own backward
/// pass on flex f32 (`dx = g · Wᵀ` when `x` is tracked, `dW = xᵀ · g` when the weight is, so a
/// frozen weight gets no product), burn's `linear` on other backends and dtypes.
///
/// # Shapes
/// - x: `[rows, k]`
/// - weight: `[k, n]`
/// - output: `[rows, n]`
pub fn linear<B: Backend>(x: Tensor<B, 2>, weight: Tensor<B, 2>) -> Tensor<B, 2> {
    let f32s = x.dtype() == DType::F32 && weight.dtype() == DType::F32;
    if f32s && (TypeId::of::<B>() == TypeId::of::<Flex>() || autodiff_of::<B, Flex>()) {
        matmul(x, weight)
    } else {
        burn::tensor::module::linear(x, weight, None)
    }
}

/// `op(a) · op(b)` matrix by matrix, `op` the transpose where asked, as a contiguous tensor.
fn product(a: &FlexTensor, b: &FlexTensor, transpose_a: bool, transpose_b: bool) -> FlexTensor {
    let mut dims: Vec<usize> = a.layout().shape().iter().copied().collect();
    let shape_b = b.layout().shape();
    let rank = dims.len();
    if transpose_a {
        dims[rank - 2] = dims[rank - 1];
    }
    dims[rank - 1] = shape_b[rank - if transpose_b { 2 } else { 1 }];
    let (mut scratch_a, mut scratch_b) = (None, None);
    let views = |t, scratch, transpose: bool| -> Vec<Matrix<'_>> {
        let all = matrices(t, scratch);
        if transpose {
            all.into_iter().map(Matrix::t).collect()
        } else {
            all
        }
    };
    let values = matmul_batched(
        &views(a, &mut scratch_a, transpose_a),
        &views(b, &mut scratch_b, transpose_b),
    );
    FlexTensor::from_data(TensorData::new(values, dims))
}

#[derive(Debug)]
struct MatmulBackward;

impl Backward<Flex, 2> for MatmulBackward {
    /// The two operands (views, as given).
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (a, b) = ops.state;
        let grad = grads.consume::<Flex>(&ops.node);
        let [a_node, b_node] = ops.parents;
        if let Some(node) = a_node {
            grads.register::<Flex>(node.id, product(&grad, &b, false, true));
        }
        if let Some(node) = b_node {
            grads.register::<Flex>(node.id, product(&a, &grad, true, false));
        }
    }
}

fn forward<C: CheckpointStrategy>(
    a: FloatTensor<Autodiff<Flex, C>>,
    b: FloatTensor<Autodiff<Flex, C>>,
) -> FloatTensor<Autodiff<Flex, C>> {
    match MatmulBackward
        .prepare::<C>([a.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let y = product(&a.primitive, &b.primitive, false, false);
            prep.finish((a.primitive, b.primitive), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(product(&a.primitive, &b.primitive, false, false)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_support::close;
    use burn::backend::NdArray;
    use burn::tensor::backend::AutodiffBackend;

    const A: [usize; 4] = [2, 3, 20, 8];
    /// Stored `[.., n, k]` and used transposed, as attention uses the keys.
    const B: [usize; 4] = [2, 3, 12, 8];

    fn values(n: usize, s: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * s % 13) as f32 - 6.0) * 0.1).collect()
    }

    /// `y`, `da` and `db` of `Σ v ⊙ (a · bᵀ)`, fused or burn's `matmul`.
    fn run<T: AutodiffBackend>(fused: bool) -> Vec<Vec<f32>> {
        let device = Default::default();
        let tensor = |shape: [usize; 4], s| {
            Tensor::<T, 4>::from_data(
                TensorData::new(values(shape.iter().product(), s), shape),
                &device,
            )
            .require_grad()
        };
        let (a, b) = (tensor(A, 7), tensor(B, 5));
        let bt = b.clone().swap_dims(2, 3);
        let y = if fused {
            matmul(a.clone(), bt)
        } else {
            a.clone().matmul(bt)
        };
        let v = Tensor::<T, 4>::from_data(
            TensorData::new(values(2 * 3 * 20 * 12, 3), [2, 3, 20, 12]),
            &device,
        );
        let grads = (y.clone() * v).sum().backward();
        let flat = |t: Tensor<T::InnerBackend, 4>| t.into_data().to_vec::<f32>().expect("f32");
        vec![
            flat(y.inner()),
            flat(a.grad(&grads).expect("a is tracked")),
            flat(b.grad(&grads).expect("b is tracked")),
        ]
    }

    #[test]
    fn fused_matmul_matches_burns_matmul_in_value_and_gradients() {
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

    #[test]
    fn inference_on_flex_computes_what_training_computes() {
        let device = Default::default();
        let plain = matmul(
            Tensor::<Flex, 4>::from_data(TensorData::new(values(2 * 3 * 20 * 8, 7), A), &device),
            Tensor::<Flex, 4>::from_data(TensorData::new(values(2 * 3 * 12 * 8, 5), B), &device)
                .swap_dims(2, 3),
        );
        let tracked = matmul(
            Tensor::<Autodiff<Flex>, 4>::from_data(
                TensorData::new(values(2 * 3 * 20 * 8, 7), A),
                &device,
            )
            .require_grad(),
            Tensor::<Autodiff<Flex>, 4>::from_data(
                TensorData::new(values(2 * 3 * 12 * 8, 5), B),
                &device,
            )
            .swap_dims(2, 3),
        );
        assert_eq!(plain.into_data(), tracked.inner().into_data());
    }
}

#[cfg(test)]
mod linear_tests {
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
