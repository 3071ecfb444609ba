//! What a stage trains ([`Trainable`]) and the optimizer the unsharded engine steps it with
//! ([`AdamWOptimizer`]): shared by the engine and the sharded stage, which use nothing else of
//! each other.

use burn::module::ParamId;
use burn::optim::AdamW;
use burn::optim::adaptor::OptimizerAdaptor;
use segprop_model::Llama;

pub type AdamWOptimizer<B> = OptimizerAdaptor<AdamW, Llama<B>, B>;

/// Parameters a stage trains: `local` get a fresh optimizer per stage; `head` (LL(r) in SegProp)
/// keep their optimizer state across stages.
#[derive(Debug, Clone, Default)]
pub struct Trainable {
    pub local: Vec<ParamId>,
    pub head: Vec<ParamId>,
}

impl Trainable {
    pub fn all(&self) -> Vec<ParamId> {
        self.local.iter().chain(&self.head).copied().collect()
    }
}
