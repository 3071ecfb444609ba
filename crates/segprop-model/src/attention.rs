//! Grouped-query self-attention with a causal mask and rotary positions.

use burn::nn::{Initializer, Linear, LinearConfig};
use burn::prelude::*;

use crate::flops;
use crate::precision::softmax;
use crate::rope::RopeTables;

#[derive(Config, Debug)]
pub struct AttentionConfig {
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    #[config(default = 0.02)]
    pub init_std: f64,
}

/// `q_proj`, `k_proj`, `v_proj`, `o_proj` without biases (HF LLaMA names).
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Linear<B>,
    pub k_proj: Linear<B>,
    pub v_proj: Linear<B>,
    pub o_proj: Linear<B>,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

pub(crate) fn linear<B: Backend>(
    d_in: usize,
    d_out: usize,
    std: f64,
    device: &B::Device,
) -> Linear<B> {
    LinearConfig::new(d_in, d_out)
        .with_bias(false)
        .with_initializer(Initializer::Normal { mean: 0.0, std })
        .init(device)
}

impl AttentionConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Attention<B> {
        let head_dim = self.hidden_size / self.num_heads;
        let kv = self.num_kv_heads * head_dim;
        Attention {
            q_proj: linear(self.hidden_size, self.hidden_size, self.init_std, device),
            k_proj: linear(self.hidden_size, kv, self.init_std, device),
            v_proj: linear(self.hidden_size, kv, self.init_std, device),
            o_proj: linear(self.hidden_size, self.hidden_size, self.init_std, device),
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim,
        }
    }
}

impl<B: Backend> Attention<B> {
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>, rope: &RopeTables<B>) -> Tensor<B, 3> {
        let [batch, seq, hidden] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);

        // [batch, seq, heads * d] -> [batch, heads, seq, d]
        let q = flops::linear(&self.q_proj, x.clone())
            .reshape([batch, seq, h, d])
            .swap_dims(1, 2);
        let k = flops::linear(&self.k_proj, x.clone())
            .reshape([batch, seq, kvh, d])
            .swap_dims(1, 2);
        let v = flops::linear(&self.v_proj, x)
            .reshape([batch, seq, kvh, d])
            .swap_dims(1, 2);

        let q = rope.apply(q);
        let k = repeat_kv(rope.apply(k), h / kvh);
        let v = repeat_kv(v, h / kvh);

        // [batch, heads, seq, seq]
        let scores = flops::matmul(q, k.swap_dims(2, 3)).div_scalar((d as f64).sqrt());
        // `tril_mask` is true strictly above the diagonal: the future positions to hide.
        let mask = Tensor::<B, 2, Bool>::tril_mask([seq, seq], 0, &scores.device());
        let scores = scores.mask_fill(mask.unsqueeze::<4>(), f32::NEG_INFINITY);
        let probs = softmax(scores, 3);

        // [batch, heads, seq, d] -> [batch, seq, hidden]
        let out = flops::matmul(probs, v)
            .swap_dims(1, 2)
            .reshape([batch, seq, hidden]);
        flops::linear(&self.o_proj, out)
    }
}

/// Repeats each key/value head `n_rep` times so head `j` serves query heads `j*n_rep..(j+1)*n_rep`.
///
/// # Shapes
/// - x: `[batch, kv_heads, seq, d]`
/// - output: `[batch, kv_heads * n_rep, seq, d]`
fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n_rep: usize) -> Tensor<B, 4> {
    if n_rep == 1 {
        return x;
    }
    let [batch, kvh, seq, d] = x.dims();
    x.unsqueeze_dim::<5>(2) // [batch, kv_heads, 1, seq, d]
        .repeat_dim(2, n_rep)
        .reshape([batch, kvh * n_rep, seq, d])
}
