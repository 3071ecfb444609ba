//! One decoder block: pre-norm attention and pre-norm SwiGLU, each with a residual.

use burn::nn::{RmsNorm, RmsNormConfig};
use burn::prelude::*;
use segprop_core::LlamaConfig;

use crate::attention::{Attention, AttentionConfig};
use crate::fused::rms_norm;
use crate::mlp::{Mlp, MlpConfig};
use crate::rope::RopeTables;

#[derive(Config, Debug)]
pub struct BlockConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    #[config(default = 0.02)]
    pub init_std: f64,
}

impl BlockConfig {
    pub fn from_llama(config: &LlamaConfig) -> Self {
        Self::new(
            config.hidden_size,
            config.intermediate_size,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim(),
            config.rms_norm_eps,
        )
    }

    pub fn init<B: Backend>(&self, device: &B::Device) -> Block<B> {
        Block {
            input_layernorm: RmsNormConfig::new(self.hidden_size)
                .with_epsilon(self.rms_norm_eps)
                .init(device),
            self_attn: AttentionConfig::new(
                self.hidden_size,
                self.num_heads,
                self.num_kv_heads,
                self.head_dim,
            )
            .with_init_std(self.init_std)
            .init(device),
            post_attention_layernorm: RmsNormConfig::new(self.hidden_size)
                .with_epsilon(self.rms_norm_eps)
                .init(device),
            mlp: MlpConfig::new(self.hidden_size, self.intermediate_size)
                .with_init_std(self.init_std)
                .init(device),
        }
    }
}

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

impl<B: Backend> Block<B> {
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>, rope: &RopeTables<B>) -> Tensor<B, 3> {
        let h = x.clone()
            + self
                .self_attn
                .forward(rms_norm(&self.input_layernorm, x), rope);
        h.clone()
            + self
                .mlp
                .forward(rms_norm(&self.post_attention_layernorm, h))
    }
}
