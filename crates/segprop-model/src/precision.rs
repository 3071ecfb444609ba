//! Mixed precision inside the model: every layer computes in the dtype of its input, casting its
//! weights to it, so one model can hold fp32 master weights for the units being trained next to
//! bf16/f16 frozen ones (docs/algorithm.md, "Mixed precision"). Statistics that lose too much in
//! 16 bits are taken in fp32, as Hugging Face's LLaMA does: the RMS of a norm
//! (`fused::rms_norm`), the attention softmax (`fused::causal_softmax`), and the
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
