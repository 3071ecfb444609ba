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

/// The shape of a LLaMA-family decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
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
pub const PRESETS: &[&str] = &["tiny", "small", "llama3-8b", "llama2-70b", "llama3-70b"];

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
            _ => return None,
        };
        Some(config)
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Parameters of one decoder block.
    pub fn block_params(&self) -> u64 {
        let h = self.hidden_size as u64;
        let kv = (self.num_kv_heads * self.head_dim()) as u64;
        let i = self.intermediate_size as u64;
        // q, o: h*h; k, v: h*kv; gate, up, down: h*i; two norms.
        2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
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
        if !self.hidden_size.is_multiple_of(self.num_heads) {
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
                format!("{field}.num_heads"),
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

    /// Reads a Hugging Face `config.json` (LlamaForCausalLM).
    pub fn from_hf_json(text: &str) -> Result<Self, String> {
        let hf: HfLlamaConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        if let Some(model_type) = &hf.model_type
            && model_type != "llama"
        {
            return Err(format!(
                "model_type is `{model_type}`, only `llama` is supported"
            ));
        }
        if let Some(head_dim) = hf.head_dim
            && head_dim * hf.num_attention_heads != hf.hidden_size
        {
            return Err(format!(
                "head_dim {head_dim} x num_attention_heads {} != hidden_size {} is not supported",
                hf.num_attention_heads, hf.hidden_size
            ));
        }
        let rope_scaling = match hf.rope_scaling {
            None => None,
            Some(s) => {
                let kind = s.rope_type.or(s.kind).unwrap_or_default();
                if kind != "llama3" {
                    return Err(format!(
                        "rope_scaling type `{kind}` is not supported (only llama3)"
                    ));
                }
                Some(RopeScaling {
                    factor: s.factor,
                    low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                    original_max_position_embeddings: s
                        .original_max_position_embeddings
                        .unwrap_or(8192),
                })
            }
        };
        Ok(Self {
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads: hf.num_attention_heads,
            num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
            rope_theta: hf.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            tie_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            max_seq_len: hf.max_position_embeddings.unwrap_or(2048),
        })
    }

    /// Writes a Hugging Face `config.json` for this shape, its weights stored as `torch_dtype`
    /// (`float32`, `bfloat16` or `float16`).
    pub fn to_hf_json(&self, torch_dtype: &str) -> String {
        let mut value = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim(),
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": false,
            "mlp_bias": false,
            "torch_dtype": torch_dtype,
        });
        if let Some(s) = &self.rope_scaling {
            value["rope_scaling"] = serde_json::json!({
                "rope_type": "llama3",
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings,
            });
        }
        serde_json::to_string_pretty(&value).unwrap_or_default()
    }
}

#[derive(Deserialize)]
struct HfLlamaConfig {
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rope_theta: Option<f64>,
    rope_scaling: Option<HfRopeScaling>,
    rms_norm_eps: Option<f64>,
    tie_word_embeddings: Option<bool>,
    max_position_embeddings: Option<usize>,
}

#[derive(Deserialize)]
struct HfRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: f64,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
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
        let small = b("small") * 1000.0;
        assert!(
            (90.0..115.0).contains(&small),
            "small preset has {small}M params"
        );
    }

    #[test]
    fn hf_json_round_trips() {
        let config = LlamaConfig::preset("llama3-70b").unwrap();
        let back = LlamaConfig::from_hf_json(&config.to_hf_json("float32")).unwrap();
        assert_eq!(config, back);
    }

    #[test]
    fn bad_shapes_name_the_field() {
        let mut config = LlamaConfig::preset("tiny").unwrap();
        config.num_kv_heads = 3;
        let err = config.validate("model.config").unwrap_err();
        assert_eq!(err.field(), Some("model.config.num_kv_heads"));
    }
}
