//! segprop-model: a LLaMA-family decoder in burn.
//!
//! The model is `head ∘ f_{n-1} ∘ … ∘ f_0 ∘ embed` with every part reachable on its own:
//! [`Llama::embed`], [`Llama::forward_blocks`] over any range of blocks, [`LmHead::forward`], so
//! the training engine can compose a base prefix, a segment and the global head LL(r). It also
//! reads and writes Hugging Face layout checkpoints ([`hf`]).
//!
//! It must not depend on training, data, sharding or any I/O beyond weight files, and it never
//! logs: those belong to `segprop-train` and `segprop-shard`.

pub mod attention;
pub mod block;
pub mod error;
pub mod flops;
pub mod fused;
pub mod hf;
pub mod hf_format;
pub mod hf_stream;
pub mod mlp;
pub mod model;
pub mod precision;
pub mod rope;

pub use block::{Block, BlockConfig};
pub use error::ModelError;
pub use model::{Llama, LlamaInit, LmHead, ParamIds, SeededUnits};
pub use rope::RopeTables;
pub use segprop_core::LlamaConfig;
