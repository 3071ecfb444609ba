//! Fused operations with their own backward pass, for the shapes where burn's op-by-op autodiff
//! spends most of a CPU step outside the matmuls (docs/benchmarks.md, "Training throughput").
//!
//! - [`causal_softmax`]: the attention's `softmax(mask(QKᵀ / √d))`.
//! - [`rms_norm`]: `x / rms(x) ⊙ γ`, the RMS taken in fp32.
//! - [`swiglu`]: the MLP's `silu(gate) ⊙ up`.
//! - [`cross_entropy`]: the mean next-token loss (flex f32 only; elsewhere burn's ops).
//! - [`linear`]: `x · W` without bias (flex f32 only; elsewhere burn's `linear`), products
//!   called into `gemm` directly ([`gemm`]).
//! - [`matmul`]: the attention's batched products (flex f32 only; elsewhere burn's `matmul`).
//! - [`split_heads`] / [`merge_heads`]: the attention's change of layout to and from heads-first,
//!   with the rotary embedding on the way in.
//!
//! Composed from burn's tensor ops, each of these records several element-wise autodiff nodes,
//! keeps most of their outputs for the backward pass, and (RMSNorm) reduces broadcast gradients
//! over strided views. As one op each keeps only what its backward needs. On burn's flex backend
//! in f32, RMSNorm, SwiGLU and the layout changes run as single-pass kernels spread over flex's thread pool
//! ([`flex_kernels`]): flex runs element-wise ops on one thread, so composed they left the
//! second core idle.
//!
//! The ops are used on the autodiff backends the project trains with (CPU flex and ndarray, and
//! CUDA with feature `cuda`); there the forward and backward passes are composed from the inner
//! backend's ops unless the flex kernels apply. Any other backend gets the composition of tensor
//! ops, which computes the same function. The plain (inference) flex backend runs the same
//! forward kernels as training, so a frozen prefix computes the values training would.

mod cross_entropy;
mod flex_kernels;
mod gemm;
mod heads;
mod matmul;
mod rms_norm;
mod simd;
mod softmax;
mod swiglu;

use std::any::{Any, TypeId};

use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::ops::FloatTensor;
use burn_flex::FlexTensor;

pub use cross_entropy::{IGNORE_TARGET, cross_entropy};
pub use heads::{merge_heads, split_heads};
pub use matmul::{linear, matmul};
pub use rms_norm::rms_norm;
pub use softmax::causal_softmax;
pub use swiglu::swiglu;

/// An op with its own backward pass on `Autodiff<I>`.
trait Fused<B: Backend>: Sized {
    /// Runs the op; called only when `B` is `Autodiff<I>`.
    fn on<I: Backend>(self) -> FloatTensor<B>;
}

/// Runs `op` when `B` is one of the autodiff backends the project trains with; gives it back
/// otherwise.
fn dispatch<B: Backend, F: Fused<B>>(op: F) -> Result<FloatTensor<B>, F> {
    if autodiff_of::<B, Flex>() {
        return Ok(op.on::<Flex>());
    }
    #[cfg(feature = "cuda")]
    if autodiff_of::<B, burn::backend::Cuda>() {
        return Ok(op.on::<burn::backend::Cuda>());
    }
    if autodiff_of::<B, burn::backend::NdArray>() {
        return Ok(op.on::<burn::backend::NdArray>());
    }
    Err(op)
}

fn autodiff_of<B: 'static, I: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<Autodiff<I>>()
}

/// `x` as `T` when `S` is `T` (checked by `TypeId`), `x` back otherwise.
fn same<S: 'static, T: 'static>(x: S) -> Result<T, S> {
    if TypeId::of::<S>() != TypeId::of::<T>() {
        return Err(x);
    }
    let mut slot = Some(x);
    let any: &mut dyn Any = &mut slot;
    match any.downcast_mut::<Option<T>>().and_then(Option::take) {
        Some(t) => Ok(t),
        None => unreachable!("S and T have the same TypeId"),
    }
}

/// `x` as `T`, for a caller that has checked that `S` is `T`.
fn cast<S: 'static, T: 'static>(x: S) -> T {
    same(x).unwrap_or_else(|_| unreachable!("the caller checked that the types are equal"))
}

/// Flex's tensors when `I` is flex and every tensor is f32 (the row kernels' case).
fn flex_f32<I: Backend, const N: usize>(
    tensors: [FloatTensor<I>; N],
) -> Result<[FlexTensor; N], [FloatTensor<I>; N]> {
    let f32s = tensors
        .iter()
        .all(|t| burn::tensor::TensorMetadata::dtype(t) == DType::F32);
    if !f32s || TypeId::of::<I>() != TypeId::of::<Flex>() {
        return Err(tensors);
    }
    Ok(tensors.map(cast))
}

/// A tensor of backend `I`, `Tensor`-wrapped, from its primitive.
fn wrap<I: Backend, const D: usize>(t: FloatTensor<I>) -> Tensor<I, D> {
    Tensor::from_primitive(burn::tensor::TensorPrimitive::Float(t))
}

#[cfg(test)]
mod test_support {
    use burn::prelude::*;
    use burn::tensor::backend::AutodiffBackend;

    /// `|a − b| ≤ tol (1 + |b|)` element by element.
    pub(super) fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (a, b) in a.iter().zip(b) {
            assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    /// Runs `f` on a fixed input `x` of `shape` and back-propagates `Σ w ⊙ y` for fixed weights
    /// `w`. Returns `y`, `dx`, and the gradients of the tracked tensors `f` returns.
    pub(super) fn value_and_grads<A: AutodiffBackend, const D: usize, const E: usize>(
        shape: [usize; D],
        f: impl FnOnce(Tensor<A, D>) -> (Tensor<A, E>, Vec<Tensor<A, 1>>),
    ) -> Vec<Vec<f32>> {
        let device = Default::default();
        let n: usize = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3).collect();
        let x = Tensor::<A, 1>::from_floats(values.as_slice(), &device)
            .reshape(shape)
            .require_grad();
        let (y, tracked) = f(x.clone());
        let m = y.dims().iter().product::<usize>();
        let weights: Vec<f32> = (0..m).map(|i| ((i * 5 % 7) as f32) * 0.1 - 0.2).collect();
        let w = Tensor::<A, 1>::from_floats(weights.as_slice(), &device).reshape(y.dims());
        let grads = (y.clone() * w).sum().backward();
        let flat = |t: Vec<f32>| t;
        let mut out = vec![
            flat(y.inner().into_data().to_vec::<f32>().expect("f32")),
            x.grad(&grads)
                .expect("x is tracked")
                .into_data()
                .to_vec::<f32>()
                .expect("f32"),
        ];
        for t in tracked {
            let g = t.grad(&grads).expect("tracked");
            out.push(g.into_data().to_vec::<f32>().expect("f32"));
        }
        out
    }
}
