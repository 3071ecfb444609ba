//! Rotary position embeddings in the Hugging Face LLaMA convention (`rotate_half`: the first and
//! second halves of each head dimension form the rotated pairs), with LLaMA-3 frequency scaling.

use burn::prelude::*;
use segprop_core::{LlamaConfig, RopeScaling};

use crate::precision::to_dtype;

/// Precomputed `cos` and `sin` tables for positions `0..seq_len`.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    /// `[seq_len, head_dim]`
    pub cos: Tensor<B, 2>,
    /// `[seq_len, head_dim]`
    pub sin: Tensor<B, 2>,
}

/// Inverse frequencies `theta^(-2i/d)` for `i in 0..d/2`, scaled LLaMA-3 style when configured.
pub fn inverse_frequencies(config: &LlamaConfig) -> Vec<f64> {
    let d = config.head_dim();
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / config.rope_theta.powf((2 * i) as f64 / d as f64))
        .collect();
    match &config.rope_scaling {
        None => base,
        Some(scaling) => base.into_iter().map(|f| llama3_scale(f, scaling)).collect(),
    }
}

/// LLaMA-3.1 rule: keep high frequencies, divide low frequencies by `factor`, interpolate between.
fn llama3_scale(freq: f64, s: &RopeScaling) -> f64 {
    let old_context = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = old_context / s.low_freq_factor;
    let high_freq_wavelen = old_context / s.high_freq_factor;
    let wavelen = 2.0 * std::f64::consts::PI / freq;
    if wavelen < high_freq_wavelen {
        freq
    } else if wavelen > low_freq_wavelen {
        freq / s.factor
    } else {
        let smooth =
            (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
        (1.0 - smooth) * freq / s.factor + smooth * freq
    }
}

impl<B: Backend> RopeTables<B> {
    pub fn new(config: &LlamaConfig, seq_len: usize, device: &B::Device) -> Self {
        let inv = inverse_frequencies(config);
        let d = config.head_dim();
        let mut cos = Vec::with_capacity(seq_len * d);
        let mut sin = Vec::with_capacity(seq_len * d);
        for pos in 0..seq_len {
            // emb = cat(freqs, freqs): both halves use the same angle.
            for _half in 0..2 {
                for f in &inv {
                    let angle = pos as f64 * f;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let shape = [seq_len, d];
        Self {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }

    /// The tables in `dtype` (a mixed-precision job's compute dtype).
    pub fn cast(self, dtype: burn::tensor::DType) -> Self {
        Self {
            cos: to_dtype(self.cos, dtype),
            sin: to_dtype(self.sin, dtype),
        }
    }

    /// The dtype of the tables: the compute dtype of the layers that use them.
    pub fn dtype(&self) -> burn::tensor::DType {
        self.cos.dtype()
    }

    /// Rotates `x` by position. It takes the projections' own sequence-major layout, so the
    /// element-wise work runs on contiguous memory (a `[batch, heads, seq, d]` view made by
    /// `swap_dims` sends every multiply through the backend's strided path).
    ///
    /// # Shapes
    /// - x: `[batch, seq, heads, head_dim]`
    /// - output: same as `x`
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [_, seq, _, d] = x.dims();
        let dtype = x.dtype();
        let table =
            |t: &Tensor<B, 2>| to_dtype(t.clone().narrow(0, 0, seq), dtype).reshape([1, seq, 1, d]);
        let (cos, sin) = (table(&self.cos), table(&self.sin));
        let x1 = x.clone().narrow(3, 0, d / 2);
        let x2 = x.clone().narrow(3, d / 2, d / 2);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3); // rotate_half(x)
        x * cos + rotated * sin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let config = LlamaConfig::preset("llama3-8b").unwrap();
        let mut plain = config.clone();
        plain.rope_scaling = None;
        let scaled = inverse_frequencies(&config);
        let base = inverse_frequencies(&plain);
        assert_eq!(scaled[0], base[0]);
        let last = base.len() - 1;
        assert!((scaled[last] - base[last] / 8.0).abs() < 1e-15);
        assert!(scaled.iter().zip(&base).all(|(s, b)| s <= b));
    }
}
