//! `model:` which model to train (a preset with overrides, a full config, or an HF checkpoint).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::llama_config::LlamaConfig;

/// Which model to train: a preset (optionally with overrides), a full config, or an HF checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    #[serde(default = "default_family")]
    pub family: String,
    #[serde(default)]
    pub preset: Option<String>,
    /// Fields that replace the preset's values (`num_layers: 16`, `vocab_size: 50304`, ...).
    #[serde(default)]
    pub overrides: Option<ModelOverrides>,
    #[serde(default)]
    pub config: Option<LlamaConfig>,
    #[serde(default)]
    pub from: Option<FromSpec>,
}

fn default_family() -> String {
    "llama".into()
}

/// Per-field overrides of a preset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelOverrides {
    pub vocab_size: Option<usize>,
    pub hidden_size: Option<usize>,
    pub intermediate_size: Option<usize>,
    pub num_layers: Option<usize>,
    pub num_heads: Option<usize>,
    pub num_kv_heads: Option<usize>,
    pub tie_embeddings: Option<bool>,
    pub max_seq_len: Option<usize>,
}

/// Start from a Hugging Face layout checkpoint directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FromSpec {
    pub hf_dir: PathBuf,
}
