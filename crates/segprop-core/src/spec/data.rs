//! `data:` the corpus, tokenizer, sequence length and batch sizes.

use serde::{Deserialize, Serialize};

/// `data.tokenizer`: how text becomes token ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSpec {
    /// One token per byte (vocabulary 256).
    Byte,
    /// GPT-2 BPE (r50k, vocabulary 50257).
    Gpt2,
    /// The `tokenizer.json` of `model.from.hf_dir`.
    Checkpoint,
    /// A Hugging Face `tokenizer.json` (or a directory holding one), relative to the spec file.
    File(String),
}

impl TokenizerSpec {
    pub fn name(&self) -> &str {
        match self {
            TokenizerSpec::Byte => "byte",
            TokenizerSpec::Gpt2 => "gpt2",
            TokenizerSpec::Checkpoint => "checkpoint",
            TokenizerSpec::File(path) => path,
        }
    }
}

impl Serialize for TokenizerSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for TokenizerSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Ok(match name.as_str() {
            "byte" => TokenizerSpec::Byte,
            "gpt2" => TokenizerSpec::Gpt2,
            "checkpoint" => TokenizerSpec::Checkpoint,
            "" => {
                return Err(serde::de::Error::custom(
                    "give `byte`, `gpt2`, `checkpoint` or the path of a tokenizer.json",
                ));
            }
            _ => TokenizerSpec::File(name),
        })
    }
}

/// The tokenizer a job uses, resolved against its checkpoint ([`crate::JobSpec::tokenizer`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerKind {
    /// One token per byte (vocabulary 256).
    Byte,
    /// GPT-2 BPE (r50k, vocabulary 50257).
    Gpt2,
    /// A Hugging Face `tokenizer.json`; its special tokens and chat template are read from the
    /// `tokenizer_config.json` (and `generation_config.json`) beside it.
    Hf(std::path::PathBuf),
}

impl TokenizerKind {
    /// Ids the tokenizer can produce (the largest id + 1), reading a `tokenizer.json`.
    pub fn vocab_size(&self) -> Result<usize, String> {
        match self {
            TokenizerKind::Byte => Ok(256),
            TokenizerKind::Gpt2 => Ok(50_257),
            TokenizerKind::Hf(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                hf_vocab_size(&text).map_err(|e| format!("{}: {e}", path.display()))
            }
        }
    }
}

/// The largest id of a `tokenizer.json` + 1: its model's vocabulary (a map from piece to id,
/// or Unigram's list of pieces) and its added tokens.
pub fn hf_vocab_size(text: &str) -> Result<usize, String> {
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not a tokenizer.json: {e}"))?;
    let model_ids: Vec<u64> = match json.pointer("/model/vocab") {
        Some(serde_json::Value::Object(map)) => map.values().filter_map(|v| v.as_u64()).collect(),
        Some(serde_json::Value::Array(pieces)) => (0..pieces.len() as u64).collect(),
        _ => return Err("no `model.vocab`: not a tokenizer.json".into()),
    };
    let added = json
        .get("added_tokens")
        .and_then(|a| a.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|t| t.get("id").and_then(|id| id.as_u64()))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    model_ids
        .into_iter()
        .chain(added)
        .max()
        .map(|id| id as usize + 1)
        .ok_or_else(|| "the vocabulary is empty".into())
}

/// `data.format`: how the corpus file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// UTF-8 text, every token trained on.
    #[default]
    Text,
    /// JSONL of `{"messages": [{"role", "content"}, ...]}` or `{"prompt", "completion"}`,
    /// rendered with the tokenizer's chat template; the loss is taken on the assistant turns
    /// only.
    Chat,
}

/// The training data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// `builtin:synthetic`, or a path to a UTF-8 text file or (`format: chat`) a JSONL file,
    /// relative to the spec file.
    pub corpus: String,
    /// `byte`, `gpt2`, `checkpoint` or a path to a `tokenizer.json`. Absent: the checkpoint's
    /// `tokenizer.json` when `model.from` has one, else `byte`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<TokenizerSpec>,
    /// `text` (default) or `chat`.
    #[serde(default, skip_serializing_if = "is_text")]
    pub format: DataFormat,
    /// Chat examples packed back to back into `seq_len` windows (true, default), or one example
    /// per sequence, cut or padded to `seq_len` (false).
    #[serde(default = "default_packing")]
    pub packing: bool,
    pub seq_len: usize,
    /// Sequences per micro-batch, or `auto`: the coordinator picks the largest that fits every
    /// stage on the worker at submit (docs/planner.md).
    pub batch_size: BatchSize,
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// Number of tokens the built-in synthetic corpus generates.
    #[serde(default = "default_synthetic_tokens")]
    pub synthetic_tokens: usize,
    /// Use at most this many tokens of the corpus (0 = all).
    #[serde(default)]
    pub max_tokens: usize,
    /// Sequences per forward/backward pass when fewer than `batch_size` fit: each batch is
    /// split into passes of at most this many sequences and their gradients are accumulated, so
    /// the step (and the loss curve) is the same. A number for every stage, a map from stage
    /// name (`stage1`, `segment-2-4`, `e2e`, `lw-block-0`) to a number, or `auto` (the
    /// coordinator picks the largest that fits each stage on the worker at submit). Absent:
    /// whole batches; `batch_size: auto` fills it per stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batch: Option<MicroBatch>,
}

/// `data.micro_batch`: one number for every stage, one per stage name, or `auto`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MicroBatch {
    Every(usize),
    PerStage(std::collections::BTreeMap<String, usize>),
    /// Resolved per stage by the coordinator's pre-flight check before any worker sees the job.
    Auto,
}

impl MicroBatch {
    /// The value given for `stage`, if any.
    pub fn for_stage(&self, stage: &str) -> Option<usize> {
        match self {
            MicroBatch::Every(n) => Some(*n),
            MicroBatch::PerStage(map) => map.get(stage).copied(),
            MicroBatch::Auto => None,
        }
    }

    /// Every (field, value) given, for validation: `data.micro_batch` or
    /// `data.micro_batch.<stage>`.
    pub fn entries(&self) -> Vec<(String, usize)> {
        match self {
            MicroBatch::Every(n) => vec![("data.micro_batch".into(), *n)],
            MicroBatch::PerStage(map) => map
                .iter()
                .map(|(stage, n)| (format!("data.micro_batch.{stage}"), *n))
                .collect(),
            MicroBatch::Auto => Vec::new(),
        }
    }
}

impl Serialize for MicroBatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MicroBatch::Every(n) => s.serialize_u64(*n as u64),
            MicroBatch::PerStage(map) => map.serialize(s),
            MicroBatch::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for MicroBatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = MicroBatch;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number of sequences, a map from stage name to a number, or `auto`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MicroBatch, E> {
                match v {
                    "auto" => Ok(MicroBatch::Auto),
                    other => Err(E::custom(format!(
                        "`{other}` is not a micro-batch: give a number of sequences, a map from \
                         stage name to a number, or `auto`"
                    ))),
                }
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<MicroBatch, E> {
                usize::try_from(v)
                    .map(MicroBatch::Every)
                    .map_err(|_| E::custom("micro_batch is too large"))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<MicroBatch, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("micro_batch must be positive"))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut access: M,
            ) -> Result<MicroBatch, M::Error> {
                let mut map = std::collections::BTreeMap::new();
                while let Some((stage, n)) = access.next_entry::<String, usize>()? {
                    if map.insert(stage.clone(), n).is_some() {
                        return Err(serde::de::Error::custom(format!(
                            "stage `{stage}` is given twice"
                        )));
                    }
                }
                Ok(MicroBatch::PerStage(map))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `data.batch_size`: a number of sequences, or `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchSize {
    Fixed(usize),
    /// Resolved by the coordinator's pre-flight check before any worker sees the job.
    Auto,
}

impl BatchSize {
    /// The number of sequences; 0 for an unresolved `auto` (the engine refuses it before use).
    pub fn get(self) -> usize {
        match self {
            BatchSize::Fixed(n) => n,
            BatchSize::Auto => 0,
        }
    }
}

impl std::fmt::Display for BatchSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BatchSize::Fixed(n) => write!(f, "{n}"),
            BatchSize::Auto => f.write_str("auto"),
        }
    }
}

impl Serialize for BatchSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BatchSize::Fixed(n) => s.serialize_u64(*n as u64),
            BatchSize::Auto => s.serialize_str("auto"),
        }
    }
}

impl<'de> Deserialize<'de> for BatchSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = BatchSize;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a number of sequences or `auto`")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<BatchSize, E> {
                usize::try_from(v)
                    .map(BatchSize::Fixed)
                    .map_err(|_| E::custom("batch_size is too large"))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<BatchSize, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("batch_size must be positive"))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<BatchSize, E> {
                match v {
                    "auto" => Ok(BatchSize::Auto),
                    other => Err(E::custom(format!(
                        "`{other}` is not a batch size: give a number of sequences or `auto`"
                    ))),
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

fn is_text(format: &DataFormat) -> bool {
    *format == DataFormat::Text
}
fn default_packing() -> bool {
    true
}
fn default_eval_fraction() -> f64 {
    0.05
}
fn default_synthetic_tokens() -> usize {
    200_000
}
