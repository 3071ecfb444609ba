//! [`rms_norm`]: `x / rms(x) ⊙ γ` as one op. Composed, autodiff kept an fp32 copy of `x`, its
//! square, the RMS, `x / rms` and the scaled output, and reduced `γ`'s broadcast gradient over a
//! strided view. As one op it keeps `x` and the per-row `r = 1 / rms`, and its backward pass is
//! `dx = r (g ⊙ γ) − x r³ Σ(g ⊙ γ ⊙ x) / d`, `dγ = Σ_rows g ⊙ x r`.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::nn::RmsNorm;
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::ops::FloatTensor;

use super::{Fused, cast, dispatch, flex_f32, flex_kernels, wrap};
use crate::precision::to_dtype;

/// RMSNorm over the last dimension, the mean of squares taken in fp32: burn's
/// `RmsNorm::forward`, with the scale cast to the input's dtype.
///
/// # Shapes
/// - x: `[.., hidden]`
/// - output: same as x
pub fn rms_norm<B: Backend, const D: usize>(norm: &RmsNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let gamma = norm.gamma.val();
    if x.dtype() != DType::F32 || gamma.dtype() != DType::F32 {
        return composed_any_dtype(x, gamma, norm.epsilon);
    }
    let dims = x.dims();
    let width = dims[D - 1];
    let x = x.reshape([dims.iter().product::<usize>() / width.max(1), width]);
    let op = Op::<B> {
        x: x.into_primitive().tensor(),
        gamma: gamma.into_primitive().tensor(),
        eps: norm.epsilon,
    };
    let y = match dispatch::<B, _>(op) {
        Ok(y) => y,
        Err(Op { x, gamma, eps }) => inner_forward::<B>(x, gamma, eps).0,
    };
    wrap::<B, 2>(y).reshape(dims)
}

/// The mixed-precision form: statistics in fp32, the scaling in the input's dtype.
fn composed_any_dtype<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    gamma: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    let rms = (x.clone().cast(DType::F32).square().mean_dim(D - 1) + eps).sqrt();
    (x / to_dtype(rms, dtype)) * to_dtype(gamma, dtype).unsqueeze()
}

struct Op<B: Backend> {
    x: FloatTensor<B>,
    gamma: FloatTensor<B>,
    eps: f64,
}

impl<B: Backend> Fused<B> for Op<B> {
    fn on<I: Backend>(self) -> FloatTensor<B> {
        cast(forward::<I, NoCheckpointing>(
            cast(self.x),
            cast(self.gamma),
            self.eps,
        ))
    }
}

/// `(y, r)` for `x: [rows, width]`: flex's row kernel in f32, burn's ops otherwise.
fn inner_forward<I: Backend>(
    x: FloatTensor<I>,
    gamma: FloatTensor<I>,
    eps: f64,
) -> (FloatTensor<I>, FloatTensor<I>) {
    match flex_f32::<I, 2>([x, gamma]) {
        Ok([x, gamma]) => {
            let (y, r) = flex_kernels::rms_norm_forward(&x, &gamma, eps as f32);
            (cast(y), cast(r))
        }
        Err([x, gamma]) => {
            let x = wrap::<I, 2>(x);
            let r = x
                .clone()
                .square()
                .mean_dim(1)
                .add_scalar(eps)
                .sqrt()
                .recip();
            let y = x * r.clone() * wrap::<I, 1>(gamma).unsqueeze();
            (y.into_primitive().tensor(), r.into_primitive().tensor())
        }
    }
}

/// `(dx, dγ)`.
fn inner_backward<I: Backend>(
    grad: FloatTensor<I>,
    x: FloatTensor<I>,
    r: FloatTensor<I>,
    gamma: FloatTensor<I>,
) -> (FloatTensor<I>, FloatTensor<I>) {
    match flex_f32::<I, 4>([grad, x, r, gamma]) {
        Ok([grad, x, r, gamma]) => {
            let (dx, dgamma) = flex_kernels::rms_norm_backward(&grad, &x, &r, &gamma);
            (cast(dx), cast(dgamma))
        }
        Err([grad, x, r, gamma]) => {
            let (g, x, r) = (wrap::<I, 2>(grad), wrap::<I, 2>(x), wrap::<I, 2>(r));
            let width = x.dims()[1];
            let gw = g.clone() * wrap::<I, 1>(gamma).unsqueeze();
            let c = (gw.clone() * x.clone()).sum_dim(1) * r.clone().powi_scalar(3) / width as f64;
            let dx = gw * r.clone() - x.clone() * c;
            let dgamma = (g * x * r).sum_dim(0).reshape([width]);
            (
                dx.into_primitive().tensor(),
                dgamma.into_primitive().tensor(),
            )
        }
    }
}

#[derive(Debug)]
struct RmsNormBackward;

impl<I: Backend> Backward<I, 2> for RmsNormBackward {
    /// `x`, `r` and `γ`.
    type State = (FloatTensor<I>, FloatTensor<I>, FloatTensor<I>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, r, gamma) = ops.state;
        let grad = grads.consume::<I>(&ops.node);
        let (dx, dgamma) = inner_backward::<I>(grad, x, r, gamma);
        let [x_node, gamma_node] = ops.parents;
        if let Some(node) = x_node {
            grads.register::<I>(node.id, dx);
        }
        if let Some(node) = gamma_node {
            grads.register::<I>(node.id, dgamma);
        }
    }
}

fn forward<I: Backend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<I, C>>,
    gamma: FloatTensor<Autodiff<I, C>>,
    eps: f64,
) -> FloatTensor<Autodiff<I, C>> {
    match RmsNormBackward
        .prepare::<C>([x.node.clone(), gamma.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let (y, r) = inner_forward::<I>(x.primitive.clone(), gamma.primitive.clone(), eps);
            prep.finish((x.primitive, r, gamma.primitive), y)
        }
        OpsKind::UnTracked(prep) => {
            prep.finish(inner_forward::<I>(x.primitive, gamma.primitive, eps).0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::test_support::{close, value_and_grads};
    use burn::backend::{Flex, NdArray};
    use burn::module::AutodiffModule;
    use burn::nn::RmsNormConfig;
    use burn::tensor::backend::AutodiffBackend;

    /// `y`, `dx` and `dγ` of `Σ w ⊙ rms_norm(x)`, fused or composed (burn's `RmsNorm`).
    fn run<A: AutodiffBackend>(fused: bool) -> Vec<Vec<f32>> {
        let device = Default::default();
        let mut norm = RmsNormConfig::new(40).with_epsilon(1e-5).init::<A>(&device);
        let gamma: Vec<f32> = (0..40).map(|i| 0.5 + (i % 7) as f32 * 0.1).collect();
        norm.gamma =
            burn::module::Param::from_tensor(Tensor::from_floats(gamma.as_slice(), &device));
        value_and_grads::<A, 3, 3>([4, 130, 40], |x| {
            let y = if fused {
                rms_norm(&norm, x)
            } else {
                composed_any_dtype(x, norm.gamma.val(), norm.epsilon)
            };
            (y, vec![norm.gamma.val()])
        })
    }

    #[test]
    fn fused_rms_norm_matches_burns_composition_in_value_and_gradients() {
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
        let norm = RmsNormConfig::new(24).init::<Autodiff<Flex>>(&device);
        let x = Tensor::<Flex, 2>::random([9, 24], burn::tensor::Distribution::Default, &device);
        let plain = rms_norm(&norm.valid(), x.clone()).into_data();
        let tracked = rms_norm(&norm, Tensor::from_inner(x).require_grad())
            .inner()
            .into_data();
        assert_eq!(plain, tracked);
    }

    #[test]
    fn a_norm_computes_in_the_input_dtype_with_fp32_statistics() {
        let device = Default::default();
        let norm = RmsNormConfig::new(4).init::<Flex>(&device);
        let x = Tensor::<Flex, 2>::from_floats([[1.0, -2.0, 3.0, 300.0]], &device);
        let f32_out = rms_norm(&norm, x.clone());
        let half = rms_norm(&norm, x.cast(burn::tensor::FloatDType::BF16));
        assert_eq!(half.dtype(), DType::BF16);
        let a: Vec<f32> = f32_out.into_data().convert::<f32>().into_vec().unwrap();
        let b: Vec<f32> = half.into_data().convert::<f32>().into_vec().unwrap();
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() <= 0.01 * a.abs().max(1e-3), "{a} vs {b}");
        }
    }
}
