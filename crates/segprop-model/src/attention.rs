//! Grouped-query self-attention with a causal mask and rotary positions.

use burn::nn::{Initializer, Linear, LinearConfig};
use burn::prelude::*;

use crate::flops;
use crate::fused;
use crate::rope::RopeTables;

#[derive(Config, Debug)]
pub struct AttentionConfig {
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Width of one head (`hidden_size / num_heads` for most models; Mistral-Nemo's is not).
    pub head_dim: usize,
    #[config(default = 0.02)]
    pub init_std: f64,
}

/// `q_proj`, `k_proj`, `v_proj`, `o_proj` without biases (HF LLaMA names). Queries are
/// `num_heads · head_dim` wide, which need not be the hidden size.
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
        let head_dim = self.head_dim;
        let q = self.num_heads * head_dim;
        let kv = self.num_kv_heads * head_dim;
        Attention {
            q_proj: linear(self.hidden_size, q, self.init_std, device),
            k_proj: linear(self.hidden_size, kv, self.init_std, device),
            v_proj: linear(self.hidden_size, kv, self.init_std, device),
            o_proj: linear(q, self.hidden_size, self.init_std, device),
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
        let [batch, seq, _] = x.dims();
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);

        // [batch, seq, heads * d] -> [batch, heads, seq, d], queries and keys rotated on the way.
        let q = fused::split_heads(flops::linear(&self.q_proj, x.clone()), h, Some(rope));
        let k = fused::split_heads(flops::linear(&self.k_proj, x.clone()), kvh, Some(rope));
        let v = fused::split_heads(flops::linear(&self.v_proj, x), kvh, None);

        // Grouped-query attention without copying keys and values per query head: the
        // `n_rep = heads / kv_heads` query heads that share a key/value head are stacked along
        // the sequence axis, `[batch, kv_heads, n_rep * seq, d]`, so each key/value head meets
        // all of its query heads in one matmul (query head `j * n_rep + r` is row block `r` of
        // group `j`).
        let n_rep = h / kvh;
        let q = q.reshape([batch, kvh, n_rep * seq, d]);

        // [batch, kv_heads, n_rep * seq, seq]
        let scores = flops::matmul(q, k.swap_dims(2, 3));
        let probs = fused::causal_softmax(scores, (d as f64).sqrt());

        // [batch, kv_heads, n_rep * seq, d] -> [batch, heads, seq, d] -> [batch, seq, hidden]
        let out = fused::merge_heads(flops::matmul(probs, v).reshape([batch, h, seq, d]));
        flops::linear(&self.o_proj, out)
    }
}
