//! The whole decoder: `head ∘ f_{n-1} ∘ … ∘ f_0 ∘ embed`, with every part callable on its own.

use std::ops::Range;

use burn::module::{ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::nn::{Embedding, EmbeddingConfig, Initializer, Linear, RmsNorm, RmsNormConfig};
use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use segprop_core::LlamaConfig;

use crate::attention::linear;
use crate::block::{Block, BlockConfig};
use crate::fused::{self, rms_norm};
use crate::precision::to_dtype;
use crate::rope::RopeTables;

/// The final norm and the LM head (`model.norm`, `lm_head` in HF names).
#[derive(Module, Debug)]
pub struct LmHead<B: Backend> {
    pub norm: RmsNorm<B>,
    pub output: Linear<B>,
}

impl<B: Backend> LmHead<B> {
    pub fn init(config: &LlamaConfig, device: &B::Device) -> Self {
        Self {
            norm: RmsNormConfig::new(config.hidden_size)
                .with_epsilon(config.rms_norm_eps)
                .init(device),
            output: linear(config.hidden_size, config.vocab_size, 0.02, device),
        }
    }

    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - output: logits `[batch, seq, vocab]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        crate::flops::linear(&self.output, rms_norm(&self.norm, x))
    }
}

/// A LLaMA-family decoder. Tied embeddings are materialized as an untied LM head in memory (the
/// engine trains embed and head as separate units); see docs/adr/0002-model-and-checkpoints.md.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    pub embed_tokens: Embedding<B>,
    pub blocks: Vec<Block<B>>,
    pub head: LmHead<B>,
}

/// Builds a randomly initialised model (normal(0, 0.02) weights, unit norms), seeded.
///
/// Values come from a host-side generator seeded with `seed`, not from the backend's global RNG:
/// the same seed gives the same weights on every backend and regardless of other threads.
pub struct LlamaInit;

impl LlamaInit {
    pub fn random<B: Backend>(config: &LlamaConfig, seed: u64, device: &B::Device) -> Llama<B> {
        let mut units = SeededUnits::new(config, seed);
        Llama {
            embed_tokens: units.embed(device),
            blocks: (0..config.num_layers)
                .map(|_| units.block(device))
                .collect(),
            head: units.head(device),
        }
    }

    /// A freshly initialised LM head (final norm + output), seeded like [`LlamaInit::random`].
    pub fn head<B: Backend>(config: &LlamaConfig, seed: u64, device: &B::Device) -> LmHead<B> {
        LmHead::init(config, device).map(&mut SeededInit::new(seed))
    }
}

/// [`LlamaInit::random`] one unit at a time, in the model's order (the embedding, each block,
/// the head), from one generator: the same values as the whole model, without ever holding it
/// whole (a sharded job shards each unit as it is made).
pub struct SeededUnits {
    config: LlamaConfig,
    init: SeededInit,
}

impl SeededUnits {
    pub fn new(config: &LlamaConfig, seed: u64) -> Self {
        Self {
            config: config.clone(),
            init: SeededInit::new(seed),
        }
    }

    /// The embedding (call first).
    pub fn embed<B: Backend>(&mut self, device: &B::Device) -> Embedding<B> {
        EmbeddingConfig::new(self.config.vocab_size, self.config.hidden_size)
            .with_initializer(Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            })
            .init(device)
            .map(&mut self.init)
    }

    /// The next decoder block.
    pub fn block<B: Backend>(&mut self, device: &B::Device) -> Block<B> {
        BlockConfig::from_llama(&self.config)
            .init(device)
            .map(&mut self.init)
    }

    /// The LM head (call last).
    pub fn head<B: Backend>(&mut self, device: &B::Device) -> LmHead<B> {
        LmHead::init(&self.config, device).map(&mut self.init)
    }
}

/// Replaces every parameter: 1-D (norm scales) with ones, others with normal(0, 0.02) drawn from
/// a seeded host generator, in the module's visiting order.
struct SeededInit {
    rng: StdRng,
}

impl SeededInit {
    fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Standard normal samples (Box-Muller).
    fn normal(&mut self, n: usize, std: f64) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            let u1: f64 = self.rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = self.rng.random();
            let r = (-2.0 * u1.ln()).sqrt();
            let theta = 2.0 * std::f64::consts::PI * u2;
            out.push((std * r * theta.cos()) as f32);
            out.push((std * r * theta.sin()) as f32);
        }
        out.truncate(n);
        out
    }
}

impl<B: Backend> ModuleMapper<B> for SeededInit {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let shape = tensor.shape();
        let device = tensor.device();
        let n = shape.num_elements();
        let values = if D == 1 {
            vec![1.0f32; n]
        } else {
            self.normal(n, 0.02)
        };
        let fresh = Tensor::<B, D>::from_data(TensorData::new(values, shape), &device);
        let fresh = if tensor.is_require_grad() {
            fresh.require_grad()
        } else {
            fresh
        };
        Param::from_mapped_value(id, fresh, mapper)
    }
}

impl<B: Backend> Llama<B> {
    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// # Shapes
    /// - tokens: `[batch, seq]`
    /// - output: `[batch, seq, hidden]`
    pub fn embed(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.embed_tokens.forward(tokens)
    }

    /// Runs blocks `range` in order (an empty range is the identity).
    ///
    /// # Shapes
    /// - x: `[batch, seq, hidden]`
    /// - output: `[batch, seq, hidden]`
    pub fn forward_blocks(
        &self,
        x: Tensor<B, 3>,
        range: Range<usize>,
        rope: &RopeTables<B>,
    ) -> Tensor<B, 3> {
        self.blocks[range]
            .iter()
            .fold(x, |x, block| block.forward(x, rope))
    }

    /// The ordinary full forward pass.
    ///
    /// # Shapes
    /// - tokens: `[batch, seq]`
    /// - output: logits `[batch, seq, vocab]`
    pub fn forward(&self, tokens: Tensor<B, 2, Int>, config: &LlamaConfig) -> Tensor<B, 3> {
        let [_, seq] = tokens.dims();
        let rope = RopeTables::new(config, seq, &tokens.device());
        let x = self.embed(tokens);
        let x = self.forward_blocks(x, 0..self.num_layers(), &rope);
        self.head.forward(x)
    }

    /// Keeps only the blocks at `keep` (in order): the pruned model of a SegProp early exit.
    pub fn retain_blocks(mut self, keep: &[usize]) -> Self {
        let blocks = std::mem::take(&mut self.blocks);
        self.blocks = blocks
            .into_iter()
            .enumerate()
            .filter(|(i, _)| keep.contains(i))
            .map(|(_, b)| b)
            .collect();
        self
    }
}

pub use crate::fused::IGNORE_TARGET;

/// Mean next-token cross-entropy, in fp32 (16-bit logits are widened first), over the targets
/// that are not [`IGNORE_TARGET`].
///
/// # Shapes
/// - logits: `[batch, seq, vocab]`
/// - targets: `[batch, seq]`
/// - output: `[1]`
pub fn cross_entropy<B: Backend>(logits: Tensor<B, 3>, targets: Tensor<B, 2, Int>) -> Tensor<B, 1> {
    let [batch, seq, vocab] = logits.dims();
    // The log-softmax and the mean are taken in fp32 whatever the compute dtype.
    let logits = to_dtype(logits, burn::tensor::DType::F32);
    fused::cross_entropy(
        logits.reshape([batch * seq, vocab]),
        targets.reshape([batch * seq]),
    )
}

/// Collects the ids of every parameter of a module.
#[derive(Debug, Default, Clone)]
pub struct ParamIds(pub Vec<ParamId>);

impl ParamIds {
    pub fn of<B: Backend, M: Module<B>>(module: &M) -> Self {
        let mut ids = Self::default();
        module.visit(&mut ids);
        ids
    }

    pub fn extend_from<B: Backend, M: Module<B>>(&mut self, module: &M) {
        module.visit(self);
    }
}

impl<B: Backend> ModuleVisitor<B> for ParamIds {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0.push(param.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::NdArray;

    type B = NdArray;

    #[test]
    fn forward_blocks_composes_like_the_full_forward() {
        let config = LlamaConfig::preset("tiny").unwrap();
        let device = Default::default();
        let model = LlamaInit::random::<B>(&config, 1, &device);
        let tokens = Tensor::<B, 2, Int>::from_data(
            TensorData::new(vec![1i64, 5, 9, 200, 7, 3], [2, 3]),
            &device,
        );
        let full = model.forward(tokens.clone(), &config);
        let rope = RopeTables::new(&config, 3, &device);
        let x = model.embed(tokens);
        let x = model.forward_blocks(x, 0..3, &rope);
        let x = model.forward_blocks(x, 3..8, &rope);
        let split = model.head.forward(x);
        full.into_data().assert_eq(&split.into_data(), true);
    }

    #[test]
    fn causal_mask_hides_the_future() {
        let config = LlamaConfig::preset("tiny").unwrap();
        let device = Default::default();
        let model = LlamaInit::random::<B>(&config, 2, &device);
        let a =
            Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 4], [1, 4]), &device);
        let b =
            Tensor::<B, 2, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 99], [1, 4]), &device);
        let la = model.forward(a, &config).slice([0..1, 0..3]);
        let lb = model.forward(b, &config).slice([0..1, 0..3]);
        la.into_data().assert_eq(&lb.into_data(), true);
    }

    #[test]
    fn retain_blocks_prunes() {
        let config = LlamaConfig::preset("tiny").unwrap();
        let model = LlamaInit::random::<B>(&config, 3, &Default::default());
        assert_eq!(model.retain_blocks(&[0, 1, 6, 7]).num_layers(), 4);
    }
}
