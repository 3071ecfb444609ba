//! Mixed precision inside the model: every layer computes in the dtype of its input, casting its
//! weights to it, so one model can hold fp32 master weights for the units being trained next to
//! bf16/f16 frozen ones (docs/algorithm.md, "Mixed precision"). Statistics that lose too much in
//! 16 bits are taken in fp32, as Hugging Face's LLaMA does: the RMS of a norm
//! ([`crate::fused::rms_norm`]), the attention softmax ([`crate::fused::causal_softmax`]), and the
//! log-softmax of the loss (`cross_entropy` in `model.rs`).
//!
//! On an all-f32 model every cast here is skipped, so f32 runs compute exactly what they did.

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fused::rms_norm;
    use burn::backend::Flex;
    use burn::nn::RmsNormConfig;

    type B = Flex;

    #[test]
    fn a_norm_computes_in_the_input_dtype_with_fp32_statistics() {
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
    }
}
