//! Mixed precision inside the model: every layer computes in the dtype of its input, casting its
//! weights to it, so one model can hold fp32 master weights for the units being trained next to
//! bf16/f16 frozen ones (docs/algorithm.md, "Mixed precision"). Statistics that lose too much in
//! 16 bits are taken in fp32, as Hugging Face's LLaMA does: the RMS of a norm, the attention
//! softmax, and the log-softmax of the loss (`cross_entropy` in `model.rs`).
//!
//! On an all-f32 model every cast here is skipped, so f32 runs compute exactly what they did.

use burn::nn::RmsNorm;
use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

/// `t` as `dtype` (no-op when it already is). Under autodiff the cast is part of the graph, so
/// the gradient of an fp32 master that was cast down for compute comes back in fp32.
pub fn to_dtype<B: Backend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(FloatDType::from(dtype))
    }
}

/// RMSNorm in the input's dtype, the mean of squares taken in fp32 (burn's `RmsNorm::forward`,
/// with the scale cast to the input's dtype).
///
/// # Shapes
/// - x: `[.., hidden]`
/// - output: same as x
pub fn rms_norm<B: Backend, const D: usize>(norm: &RmsNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let dtype = x.dtype();
    let rms = (x.clone().cast(DType::F32).square().mean_dim(D - 1) + norm.epsilon).sqrt();
    (x / to_dtype(rms, dtype)) * to_dtype(norm.gamma.val(), dtype).unsqueeze()
}

/// Softmax over `dim`, taken in fp32 when `x` is a 16-bit type, returned in `x`'s dtype.
pub fn softmax<B: Backend, const D: usize>(x: Tensor<B, D>, dim: usize) -> Tensor<B, D> {
    let dtype = x.dtype();
    if dtype == DType::F32 || dtype == DType::F64 {
        return burn::tensor::activation::softmax(x, dim);
    }
    to_dtype(
        burn::tensor::activation::softmax(x.cast(FloatDType::F32), dim),
        dtype,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::nn::RmsNormConfig;

    type B = Flex;

    #[test]
    fn layers_compute_in_the_input_dtype_with_fp32_statistics() {
        let device = Default::default();
        let norm = RmsNormConfig::new(4).init::<B>(&device);
        let x = Tensor::<B, 2>::from_floats([[1.0, -2.0, 3.0, 300.0]], &device);
        let f32_out = rms_norm(&norm, x.clone());
        let half = rms_norm(&norm, x.cast(FloatDType::BF16));
        assert_eq!(half.dtype(), DType::BF16);
        let a: Vec<f32> = f32_out.into_data().convert::<f32>().into_vec().unwrap();
        let b: Vec<f32> = half.into_data().convert::<f32>().into_vec().unwrap();
        for (a, b) in a.iter().zip(&b) {
            assert!((a - b).abs() <= 0.01 * a.abs().max(1e-3), "{a} vs {b}");
        }
        let scores = Tensor::<B, 2>::from_floats([[0.0, 1.0, f32::NEG_INFINITY]], &device)
            .cast(FloatDType::F16);
        let p = softmax(scores, 1);
        assert_eq!(p.dtype(), DType::F16);
        let p: Vec<f32> = p.into_data().convert::<f32>().into_vec().unwrap();
        assert!((p[0] + p[1] - 1.0).abs() < 1e-3 && p[2] == 0.0);
    }
}
