//! A Hugging Face `config.json` read into a [`LlamaConfig`], and written from one.
//!
//! Reading is strict: every key is either used, checked to hold the value that leaves the math
//! of a LLaMA/Mistral decoder unchanged (`attention_bias: false`, `hidden_act: silu`, a rotary
//! type segprop implements, ...), or known not to change the math (token ids, generation
//! defaults, bookkeeping). Anything else is refused naming the key: a setting segprop does not
//! understand is never ignored. Both rotary layouts are read: transformers 4's `rope_theta` +
//! `rope_scaling` and transformers 5's `rope_parameters`.

use serde_json::{Map, Value};

use crate::llama_config::{LlamaConfig, ModelType, RopeScaling};

/// Keys that do not change the model's math: bookkeeping, token ids and generation defaults
/// (which the training loop does not use).
const HARMLESS_KEYS: &[&str] = &[
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "initializer_range",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "id2label",
    "label2id",
    "problem_type",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "cross_attention_hidden_size",
    "tie_encoder_decoder",
    "tokenizer_class",
    "pretraining_tp",
    "finetuning_task",
    "prefix",
    "task_specific_params",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "pruned_heads",
    "bad_words_ids",
    "begin_suppress_tokens",
    "suppress_tokens",
    "diversity_penalty",
    "do_sample",
    "early_stopping",
    "encoder_no_repeat_ngram_size",
    "exponential_decay_length_penalty",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "length_penalty",
    "max_length",
    "min_length",
    "no_repeat_ngram_size",
    "num_beam_groups",
    "num_beams",
    "num_return_sequences",
    "output_scores",
    "remove_invalid_values",
    "repetition_penalty",
    "return_dict_in_generate",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
];

/// The keys of `config.json` as they are consumed: what is left at the end is unknown.
struct Keys {
    map: Map<String, Value>,
}

impl Keys {
    /// Takes `key` (absent and `null` are both `None`).
    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    fn usize(&mut self, key: &str) -> Result<Option<usize>, String> {
        self.take(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| format!("key `{key}` must be a non-negative integer, not {v}"))
            })
            .transpose()
    }

    fn required(&mut self, key: &str) -> Result<usize, String> {
        self.usize(key)?
            .ok_or_else(|| format!("key `{key}` is missing"))
    }

    fn f64(&mut self, key: &str) -> Result<Option<f64>, String> {
        self.take(key)
            .map(|v| {
                v.as_f64()
                    .ok_or_else(|| format!("key `{key}` must be a number, not {v}"))
            })
            .transpose()
    }

    fn bool(&mut self, key: &str) -> Result<Option<bool>, String> {
        self.take(key)
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| format!("key `{key}` must be true or false, not {v}"))
            })
            .transpose()
    }

    fn string(&mut self, key: &str) -> Result<Option<String>, String> {
        self.take(key)
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(format!("key `{key}` must be a string, not {other}")),
            })
            .transpose()
    }

    /// Refuses `key` unless it is absent or `allowed`.
    fn expect(&mut self, key: &str, allowed: &Value, why: &str) -> Result<(), String> {
        match self.take(key) {
            Some(v) if v != *allowed => Err(format!("key `{key}` is {v}: {why}")),
            _ => Ok(()),
        }
    }
}

/// A rotary block (`rope_scaling` or `rope_parameters`) read into a scaling, or refused.
fn rope_block(key: &str, value: Value) -> Result<(Option<RopeScaling>, Option<f64>), String> {
    let Value::Object(map) = value else {
        return Err(format!("key `{key}` must be an object, not {value}"));
    };
    let mut keys = Keys { map };
    let kind = match keys.string("rope_type")? {
        Some(kind) => Some(kind),
        None => keys.string("type")?,
    }
    .unwrap_or_else(|| "default".into());
    let theta = keys.f64("rope_theta")?;
    let scaling = match kind.as_str() {
        "default" => None,
        "llama3" => Some(RopeScaling {
            factor: keys
                .f64("factor")?
                .ok_or_else(|| format!("key `{key}.factor` is missing"))?,
            low_freq_factor: keys.f64("low_freq_factor")?.unwrap_or(1.0),
            high_freq_factor: keys.f64("high_freq_factor")?.unwrap_or(4.0),
            original_max_position_embeddings: keys
                .usize("original_max_position_embeddings")?
                .unwrap_or(8192),
        }),
        other => {
            return Err(format!(
                "key `{key}.rope_type` is `{other}`: only `default` and `llama3` rotary \
                 embeddings are implemented"
            ));
        }
    };
    if let Some(extra) = keys.map.keys().next() {
        return Err(format!(
            "key `{key}.{extra}` is not understood for rope_type `{kind}`"
        ));
    }
    Ok((scaling, theta))
}

impl LlamaConfig {
    /// Reads a Hugging Face `config.json` (`LlamaForCausalLM` or `MistralForCausalLM`). Errors
    /// name the key.
    pub fn from_hf_json(text: &str) -> Result<Self, String> {
        let value: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let Value::Object(map) = value else {
            return Err("must be a JSON object".into());
        };
        let mut keys = Keys { map };
        let model_type = match keys.string("model_type")?.as_deref() {
            None | Some("llama") => ModelType::Llama,
            Some("mistral") => ModelType::Mistral,
            Some(other) => {
                return Err(format!(
                    "key `model_type` is `{other}`: supported model types are `llama` and \
                     `mistral`"
                ));
            }
        };
        if let Some(archs) = keys.take("architectures") {
            let known = ["LlamaForCausalLM", "MistralForCausalLM"];
            let names = archs.as_array().cloned().unwrap_or_default();
            if let Some(bad) = names
                .iter()
                .find(|a| !a.as_str().is_some_and(|a| known.contains(&a)))
            {
                return Err(format!(
                    "key `architectures` names {bad}: supported are {}",
                    known.join(", ")
                ));
            }
        }
        keys.expect(
            "hidden_act",
            &Value::from("silu"),
            "only SiLU (SwiGLU) MLPs are implemented",
        )?;
        keys.expect(
            "attention_bias",
            &Value::Bool(false),
            "attention projections with biases are not implemented",
        )?;
        keys.expect(
            "mlp_bias",
            &Value::Bool(false),
            "MLP projections with biases are not implemented",
        )?;
        if let Some(p) = keys.f64("attention_dropout")?
            && p != 0.0
        {
            return Err(format!(
                "key `attention_dropout` is {p}: attention dropout is not implemented"
            ));
        }
        let mut rope_theta = keys.f64("rope_theta")?;
        let mut rope_scaling = None;
        for key in ["rope_scaling", "rope_parameters"] {
            if let Some(block) = keys.take(key) {
                let (scaling, theta) = rope_block(key, block)?;
                rope_scaling = rope_scaling.or(scaling);
                rope_theta = rope_theta.or(theta);
            }
        }
        if model_type == ModelType::Mistral && rope_scaling.is_some() {
            return Err(
                "key `rope_scaling`: llama3 rotary scaling on a `mistral` model is not \
                 supported"
                    .into(),
            );
        }
        let sliding_window = keys.usize("sliding_window")?;
        let num_heads = keys.required("num_attention_heads")?;
        let config = Self {
            model_type,
            vocab_size: keys.required("vocab_size")?,
            hidden_size: keys.required("hidden_size")?,
            intermediate_size: keys.required("intermediate_size")?,
            num_layers: keys.required("num_hidden_layers")?,
            num_heads,
            num_kv_heads: keys.usize("num_key_value_heads")?.unwrap_or(num_heads),
            head_dim: keys.usize("head_dim")?,
            sliding_window,
            rope_theta: rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            rms_norm_eps: keys.f64("rms_norm_eps")?.unwrap_or(1e-6),
            tie_embeddings: keys.bool("tie_word_embeddings")?.unwrap_or(false),
            max_seq_len: keys.usize("max_position_embeddings")?.unwrap_or(2048),
        };
        let mut unknown: Vec<&String> = keys
            .map
            .keys()
            .filter(|k| !HARMLESS_KEYS.contains(&k.as_str()))
            .collect();
        unknown.sort();
        if let Some(key) = unknown.first() {
            return Err(format!(
                "key `{key}` is not understood: segprop cannot tell whether it changes the \
                 model's math, so it does not load this checkpoint"
            ));
        }
        // An explicit head_dim equal to hidden / heads is the default; keep the shape canonical.
        Ok(Self {
            head_dim: config
                .head_dim
                .filter(|&d| d * config.num_heads != config.hidden_size),
            ..config
        })
    }

    /// Writes a Hugging Face `config.json` for this shape, its weights stored as `torch_dtype`
    /// (`float32`, `bfloat16` or `float16`). Rotary settings use transformers 4's keys, which
    /// transformers 5 reads too.
    pub fn to_hf_json(&self, torch_dtype: &str) -> String {
        let mut value = serde_json::json!({
            "architectures": [self.model_type.architecture()],
            "model_type": self.model_type.as_str(),
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
            "attention_dropout": 0.0,
            "torch_dtype": torch_dtype,
        });
        match self.model_type {
            ModelType::Llama => {
                value["attention_bias"] = Value::Bool(false);
                value["mlp_bias"] = Value::Bool(false);
            }
            ModelType::Mistral => {
                value["sliding_window"] = self.sliding_window.map_or(Value::Null, Value::from);
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip_through_config_json() {
        for name in crate::llama_config::PRESETS {
            let config = LlamaConfig::preset(name).unwrap();
            let back = LlamaConfig::from_hf_json(&config.to_hf_json("float32")).unwrap();
            assert_eq!(config, back, "{name}");
        }
    }

    fn transformers5_mistral() -> Value {
        serde_json::json!({
            "architectures": ["MistralForCausalLM"],
            "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "head_dim": 16,
            "hidden_act": "silu", "hidden_size": 32, "initializer_range": 0.02,
            "intermediate_size": 80, "max_position_embeddings": 131072, "model_type": "mistral",
            "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
            "pad_token_id": null, "rms_norm_eps": 1e-06,
            "rope_parameters": { "rope_theta": 1000000.0, "rope_type": "default" },
            "sliding_window": null, "tie_word_embeddings": true,
            "transformers_version": "5.25.0", "use_cache": true, "vocab_size": 96
        })
    }

    #[test]
    fn transformers5_mistral_with_its_own_head_dim_reads() {
        let config = LlamaConfig::from_hf_json(&transformers5_mistral().to_string()).unwrap();
        assert_eq!(config.model_type, ModelType::Mistral);
        assert_eq!(
            (config.head_dim(), config.q_dim(), config.kv_dim()),
            (16, 64, 32)
        );
        assert_eq!(config.rope_theta, 1e6);
        assert!(config.tie_embeddings);
        config.validate("model.from").unwrap();
    }

    #[test]
    fn settings_that_change_the_math_are_refused_by_key() {
        let cases = [
            ("model_type", Value::from("qwen2"), "`model_type`"),
            ("attention_bias", Value::Bool(true), "`attention_bias`"),
            ("hidden_act", Value::from("gelu"), "`hidden_act`"),
            ("attention_dropout", Value::from(0.1), "`attention_dropout`"),
            (
                "rope_parameters",
                serde_json::json!({ "rope_type": "yarn", "factor": 4.0 }),
                "`rope_parameters.rope_type`",
            ),
            (
                "partial_rotary_factor",
                Value::from(0.5),
                "`partial_rotary_factor`",
            ),
            (
                "num_hidden_layers",
                Value::from("two"),
                "`num_hidden_layers`",
            ),
        ];
        for (key, value, named) in cases {
            let mut json = transformers5_mistral();
            json[key] = value;
            let err = LlamaConfig::from_hf_json(&json.to_string()).unwrap_err();
            assert!(err.contains(named), "{key}: {err}");
        }
        let mut json = transformers5_mistral();
        json.as_object_mut().unwrap().remove("hidden_size");
        let err = LlamaConfig::from_hf_json(&json.to_string()).unwrap_err();
        assert!(err.contains("`hidden_size` is missing"), "{err}");
    }

    #[test]
    fn llama3_scaling_reads_from_either_layout() {
        let config = LlamaConfig::preset("llama3-8b").unwrap();
        let mut v5: Value = serde_json::from_str(&config.to_hf_json("bfloat16")).unwrap();
        let scaling = v5.as_object_mut().unwrap().remove("rope_scaling").unwrap();
        let theta = v5.as_object_mut().unwrap().remove("rope_theta").unwrap();
        let mut params = scaling;
        params["rope_theta"] = theta;
        v5["rope_parameters"] = params;
        assert_eq!(LlamaConfig::from_hf_json(&v5.to_string()).unwrap(), config);
    }
}
