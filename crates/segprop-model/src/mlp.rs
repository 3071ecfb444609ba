//! SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.

use burn::nn::Linear;
use burn::prelude::*;

use crate::attention::linear;
use crate::{flops, fused};

#[derive(Config, Debug)]
pub struct MlpConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    #[config(default = 0.02)]
    pub init_std: f64,
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Linear<B>,
    pub up_proj: Linear<B>,
    pub down_proj: Linear<B>,
}

impl MlpConfig {
    pub fn init<B: Backend>(&self, device: &B::Device) -> Mlp<B> {
        Mlp {
            gate_proj: linear(
                self.hidden_size,
                self.intermediate_size,
                self.init_std,
                device,
            ),
            up_proj: linear(
                self.hidden_size,
                self.intermediate_size,
                self.init_std,
                device,
            ),
            down_proj: linear(
                self.intermediate_size,
                self.hidden_size,
                self.init_std,
                device,
            ),
        }
    }
}

impl<B: Backend> Mlp<B> {
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gated = fused::swiglu(
            flops::linear(&self.gate_proj, x.clone()),
            flops::linear(&self.up_proj, x),
        );
        flops::linear(&self.down_proj, gated)
    }
}
