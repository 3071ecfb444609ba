//! LLaMA-family shape configuration: presets, validation and the Hugging Face `config.json`
//! mapping. Pure numbers so the planner and the coordinator can use it without burn.

use serde::{Deserialize, Serialize};

use crate::error::SpecError;

/// LLaMA-3 style rotary frequency scaling (`rope_scaling.rope_type = "llama3"` in HF configs).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// The checkpoint family a model is read and written as (`model_type` in HF's `config.json`).
/// Both are the same decoder (RMSNorm, rotary GQA attention, SwiGLU); Mistral's only other
/// setting, a sliding attention window, is accepted when it covers the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelType {
    #[default]
    Llama,
    Mistral,
}

impl ModelType {
    pub fn is_llama(&self) -> bool {
        *self == ModelType::Llama
    }

    /// The `model_type` string of HF's `config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Llama => "llama",
            ModelType::Mistral => "mistral",
        }
    }

    /// The transformers class that loads it (`architectures` in `config.json`).
    pub fn architecture(self) -> &'static str {
        match self {
            ModelType::Llama => "LlamaForCausalLM",
            ModelType::Mistral => "MistralForCausalLM",
        }
    }
}

/// The shape of a LLaMA-family decoder (LLaMA and Mistral checkpoints).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    /// `llama` (default) or `mistral`: how an export's `config.json` names the model.
    #[serde(default, skip_serializing_if = "ModelType::is_llama")]
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    /// Width of one attention head when it is not `hidden_size / num_heads` (Mistral-Nemo:
    /// 128 with hidden 5120 and 32 heads). Absent: `hidden_size / num_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Mistral's attention window. Attention here is over the whole sequence, so a window is
    /// accepted only when it is at least `data.seq_len` (then it changes nothing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_embeddings: bool,
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
}

fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_rms_eps() -> f64 {
    1e-5
}
fn default_max_seq_len() -> usize {
    2048
}

/// Names accepted by `model.preset`.
pub const PRESETS: &[&str] = &[
    "tiny",
    "small",
    "llama3-8b",
    "llama2-70b",
    "llama3-70b",
    "mistral-7b",
    "mistral-nemo-12b",
];

const LLAMA31_SCALING: RopeScaling = RopeScaling {
    factor: 8.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_max_position_embeddings: 8192,
};

impl LlamaConfig {
    /// A named preset. `tiny` is for CPU tests; `small` is ~110M parameters (GPT-2 vocabulary,
    /// untied head); the others are the
    /// published shapes (LLaMA-3 presets carry the 3.1 rotary scaling).
    pub fn preset(name: &str) -> Option<Self> {
        let config = match name {
            "tiny" => Self {
                model_type: ModelType::Llama,
                head_dim: None,
                sliding_window: None,
                vocab_size: 256,
                hidden_size: 64,
                intermediate_size: 192,
                num_layers: 8,
                num_heads: 4,
                num_kv_heads: 2,
                rope_theta: 10_000.0,
                rope_scaling: None,
                rms_norm_eps: 1e-5,
                tie_embeddings: false,
                max_seq_len: 512,
            },
            "small" => Self {
                model_type: ModelType::Llama,
                head_dim: None,
                sliding_window: None,
                vocab_size: 50_304,
                hidden_size: 640,
                intermediate_size: 1728,
                num_layers: 10,
                num_heads: 10,
                num_kv_heads: 5,
                rope_theta: 10_000.0,
                rope_scaling: None,
                rms_norm_eps: 1e-5,
                tie_embeddings: false,
                max_seq_len: 1024,
            },
            "llama3-8b" => Self {
                model_type: ModelType::Llama,
                head_dim: None,
                sliding_window: None,
                vocab_size: 128_256,
                hidden_size: 4096,
                intermediate_size: 14_336,
                num_layers: 32,
                num_heads: 32,
                num_kv_heads: 8,
                rope_theta: 500_000.0,
                rope_scaling: Some(LLAMA31_SCALING),
                rms_norm_eps: 1e-5,
                tie_embeddings: false,
                max_seq_len: 131_072,
            },
            "llama2-70b" => Self {
                model_type: ModelType::Llama,
                head_dim: None,
                sliding_window: None,
                vocab_size: 32_000,
                hidden_size: 8192,
                intermediate_size: 28_672,
                num_layers: 80,
                num_heads: 64,
                num_kv_heads: 8,
                rope_theta: 10_000.0,
                rope_scaling: None,
                rms_norm_eps: 1e-5,
                tie_embeddings: false,
                max_seq_len: 4096,
            },
            "llama3-70b" => Self {
                model_type: ModelType::Llama,
                head_dim: None,
                sliding_window: None,
                vocab_size: 128_256,
                hidden_size: 8192,
                intermediate_size: 28_672,
                num_layers: 80,
                num_heads: 64,
                num_kv_heads: 8,
                rope_theta: 500_000.0,
                rope_scaling: Some(LLAMA31_SCALING),
                rms_norm_eps: 1e-5,
                tie_embeddings: false,
                max_seq_len: 131_072,
            },
            // Mistral-7B-v0.3 (vocabulary 32768, no sliding window).
            "mistral-7b" => Self {
                model_type: ModelType::Mistral,
                vocab_size: 32_768,
                hidden_size: 4096,
                intermediate_size: 14_336,
                num_layers: 32,
                num_heads: 32,
                num_kv_heads: 8,
                head_dim: None,
                sliding_window: None,
                rope_theta: 1_000_000.0,
                rope_scaling: None,
                rms_norm_eps: 1e-5,
                tie_embeddings: false,
                max_seq_len: 32_768,
            },
            // Mistral-Nemo-Instruct-2407: head_dim 128 with hidden 5120 and 32 heads.
            "mistral-nemo-12b" => Self {
                model_type: ModelType::Mistral,
                vocab_size: 131_072,
                hidden_size: 5120,
                intermediate_size: 14_336,
                num_layers: 40,
                num_heads: 32,
                num_kv_heads: 8,
                head_dim: Some(128),
                sliding_window: None,
                rope_theta: 1_000_000.0,
                rope_scaling: None,
                rms_norm_eps: 1e-5,
                tie_embeddings: false,
                max_seq_len: 1_024_000,
            },
            _ => return None,
        };
        Some(config)
    }

    /// Width of one attention head: `head_dim` when given, else `hidden_size / num_heads`.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_heads.max(1))
    }

    /// Width of the queries (and of `o_proj`'s input): `num_heads · head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim()
    }

    /// Width of the keys and values: `num_kv_heads · head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim()
    }

    /// Parameters of one decoder block.
    pub fn block_params(&self) -> u64 {
        let h = self.hidden_size as u64;
        let q = self.q_dim() as u64;
        let kv = self.kv_dim() as u64;
        let i = self.intermediate_size as u64;
        // q, o: h*q; k, v: h*kv; gate, up, down: h*i; two norms.
        2 * h * q + 2 * h * kv + 3 * h * i + 2 * h
    }

    /// Total parameters (embedding, blocks, final norm, LM head unless tied).
    pub fn num_params(&self) -> u64 {
        let embed = (self.vocab_size * self.hidden_size) as u64;
        let head = if self.tie_embeddings { 0 } else { embed };
        embed + self.num_layers as u64 * self.block_params() + self.hidden_size as u64 + head
    }

    /// Checks the shape is buildable. `field` prefixes the names in errors (`model.config`).
    pub fn validate(&self, field: &str) -> Result<(), SpecError> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("max_seq_len", self.max_seq_len),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(SpecError::invalid(
                    format!("{field}.{name}"),
                    "must be at least 1",
                ));
            }
        }
        if self.head_dim == Some(0) {
            return Err(SpecError::invalid(
                format!("{field}.head_dim"),
                "must be at least 1",
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_heads) {
            return Err(SpecError::invalid(
                format!("{field}.num_heads"),
                format!(
                    "hidden_size {} is not divisible by num_heads {}",
                    self.hidden_size, self.num_heads
                ),
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(SpecError::invalid(
                format!(
                    "{field}.{}",
                    if self.head_dim.is_some() {
                        "head_dim"
                    } else {
                        "num_heads"
                    }
                ),
                format!(
                    "head dimension {} must be even for rotary embeddings",
                    self.head_dim()
                ),
            ));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(SpecError::invalid(
                format!("{field}.num_kv_heads"),
                format!(
                    "num_heads {} is not a multiple of num_kv_heads {}",
                    self.num_heads, self.num_kv_heads
                ),
            ));
        }
        if !(self.rope_theta > 0.0) {
            return Err(SpecError::invalid(
                format!("{field}.rope_theta"),
                "must be positive",
            ));
        }
        if !(self.rms_norm_eps > 0.0) {
            return Err(SpecError::invalid(
                format!("{field}.rms_norm_eps"),
                "must be positive",
            ));
        }
        if self.sliding_window == Some(0) {
            return Err(SpecError::invalid(
                format!("{field}.sliding_window"),
                "must be at least 1 (or absent)",
            ));
        }
        if let Some(s) = &self.rope_scaling
            && (!(s.factor >= 1.0) || !(s.high_freq_factor > s.low_freq_factor))
        {
            return Err(SpecError::invalid(
                format!("{field}.rope_scaling"),
                "needs factor >= 1 and high_freq_factor > low_freq_factor",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_validate_and_have_published_sizes() {
        for name in PRESETS {
            let config = LlamaConfig::preset(name).expect("listed preset exists");
            config.validate("model").expect("preset is valid");
        }
        let b = |name: &str| LlamaConfig::preset(name).unwrap().num_params() as f64 / 1e9;
        assert!((b("llama3-8b") - 8.03).abs() < 0.01, "{}", b("llama3-8b"));
        assert!(
            (b("llama2-70b") - 68.98).abs() < 0.01,
            "{}",
            b("llama2-70b")
        );
        assert!(
            (b("llama3-70b") - 70.55).abs() < 0.01,
            "{}",
            b("llama3-70b")
        );
        // Mistral-7B-v0.3 has 7.25B parameters, Mistral-Nemo 12.25B (its head_dim 128 makes the
        // queries 4096 wide on a 5120 residual stream).
        assert!(
            (b("mistral-7b") - 7.248).abs() < 0.001,
            "{}",
            b("mistral-7b")
        );
        assert!(
            (b("mistral-nemo-12b") - 12.248).abs() < 0.001,
            "{}",
            b("mistral-nemo-12b")
        );
        let small = b("small") * 1000.0;
        assert!(
            (90.0..115.0).contains(&small),
            "small preset has {small}M params"
        );
    }

    #[test]
    fn bad_shapes_name_the_field() {
        let mut config = LlamaConfig::preset("tiny").unwrap();
        config.num_kv_heads = 3;
        let err = config.validate("model.config").unwrap_err();
        assert_eq!(err.field(), Some("model.config.num_kv_heads"));
    }
}
