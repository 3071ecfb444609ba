//! `data:` the corpus, tokenizer, sequence length and batch sizes.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    /// One token per byte (vocabulary 256).
    Byte,
    /// GPT-2 BPE (r50k, vocabulary 50257).
    Gpt2,
}

impl TokenizerKind {
    pub fn vocab_size(self) -> usize {
        match self {
            TokenizerKind::Byte => 256,
            TokenizerKind::Gpt2 => 50_257,
        }
    }
}

/// The training data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// `builtin:synthetic`, or a path to a UTF-8 text file (relative to the spec file).
    pub corpus: String,
    #[serde(default = "default_tokenizer")]
    pub tokenizer: TokenizerKind,
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

fn default_tokenizer() -> TokenizerKind {
    TokenizerKind::Byte
}
fn default_eval_fraction() -> f64 {
    0.05
}
fn default_synthetic_tokens() -> usize {
    200_000
}
