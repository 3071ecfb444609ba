//! The job spec: what a user writes in `job.yaml` (DESIGN.md §5, docs/job-spec.md).
//!
//! Every struct rejects unknown fields. [`JobSpec::from_yaml_str`] parses and validates; every
//! error names the field and, when it can be found in the text, the line.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{SpecError, SpecErrorKind};
use crate::llama_config::LlamaConfig;
use crate::validate::{locate_field, strip_location};

/// A complete training job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Spec format version; only `1` exists.
    pub version: u32,
    pub name: String,
    pub model: ModelSpec,
    pub data: DataSpec,
    pub regime: Regime,
    #[serde(default)]
    pub segprop: SegPropSpec,
    #[serde(default)]
    pub lw: LwSpec,
    #[serde(default)]
    pub e2e: E2eSpec,
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    #[serde(default)]
    pub eval: EvalSpec,
    #[serde(default)]
    pub resources: ResourcesSpec,
    #[serde(default)]
    pub sharding: ShardingSpec,
    /// Recompute each trained unit's forward during backward instead of keeping its activations
    /// (per decoder block; the embedding and the head are units too). Applies sharded or not.
    #[serde(default)]
    pub activation_checkpointing: bool,
    #[serde(default)]
    pub checkpoint: CheckpointSpec,
    #[serde(default = "default_seed")]
    pub seed: u64,
}

/// Mid-stage checkpoints written by worker daemons (a retried stage resumes from the newest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    /// Optimizer steps between checkpoints; 0 writes none (a retried stage starts over).
    #[serde(default = "default_checkpoint_every")]
    pub every_steps: u64,
}

impl Default for CheckpointSpec {
    fn default() -> Self {
        Self {
            every_steps: default_checkpoint_every(),
        }
    }
}

fn default_checkpoint_every() -> u64 {
    50
}

fn default_seed() -> u64 {
    17
}

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

/// The training regime (DESIGN.md §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Regime {
    /// Segmented propagation: stage 1 then one stage per segment.
    Segprop,
    /// Layer-wise baseline: each block in turn with its own discarded local head.
    Lw,
    /// End-to-end baseline: every parameter, full backprop.
    E2e,
}

impl std::fmt::Display for Regime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Regime::Segprop => "segprop",
            Regime::Lw => "lw",
            Regime::E2e => "e2e",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum HeadPolicy {
    /// LL(r) keeps training across segments (TMLR version).
    #[default]
    Persistent,
    /// LL(r)'s decoder blocks return to their pre-stage-2 weights at every new segment; only the
    /// LM head's update is kept (ICLR version).
    Reset,
}

/// When a stage stops. At least one of `max_steps` / `max_epochs` bounds every stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ExitSpec {
    pub max_steps: Option<u64>,
    pub max_epochs: Option<u64>,
    /// Stop after this many evaluations without an improvement of at least `min_delta`.
    pub patience: Option<u32>,
    #[serde(default)]
    pub min_delta: f64,
    /// Stop as soon as the held-out loss is at or below this value.
    pub target_eval_loss: Option<f64>,
}

impl ExitSpec {
    fn steps(max_steps: u64) -> Self {
        Self {
            max_steps: Some(max_steps),
            ..Self::default()
        }
    }
}

/// Stops stage 2 early: the model becomes the committed prefix + LL(r) (a pruned model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct GlobalExitSpec {
    /// Stop once a committed segment brings the held-out loss to or below this value.
    pub target_eval_loss: Option<f64>,
    /// Stop after this many committed segments without an improvement of `min_delta`.
    pub patience: Option<u32>,
    #[serde(default)]
    pub min_delta: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegPropExitSpec {
    #[serde(default = "default_stage_exit")]
    pub stage1: ExitSpec,
    #[serde(default = "default_stage_exit")]
    pub segment: ExitSpec,
    #[serde(default)]
    pub global: Option<GlobalExitSpec>,
}

fn default_stage_exit() -> ExitSpec {
    ExitSpec::steps(100)
}

impl Default for SegPropExitSpec {
    fn default() -> Self {
        Self {
            stage1: default_stage_exit(),
            segment: default_stage_exit(),
            global: None,
        }
    }
}

/// SegProp parameters: p, r, k, head policy, SnapCheck and exit criteria.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegPropSpec {
    /// p: blocks `0..p` form the base prefix trained in stage 1.
    #[serde(default = "default_base_depth")]
    pub base_depth: usize,
    /// r: the last r blocks plus the final norm and LM head form the global head LL(r).
    #[serde(default = "default_head_layers")]
    pub head_layers: usize,
    /// k: intermediate blocks trained together in one stage-2 step.
    #[serde(default = "default_segment_size")]
    pub segment_size: usize,
    #[serde(default)]
    pub head_policy: HeadPolicy,
    /// Cache the frozen prefix's outputs (SnapCheck).
    #[serde(default = "default_true")]
    pub snapcheck: bool,
    /// In-memory byte budget of the SnapCheck cache; the rest spills to the run directory.
    #[serde(default = "default_snapcheck_budget")]
    pub snapcheck_memory_bytes: u64,
    /// Element type of snapshots in the shared store: `f32` (exact), `bf16` or `f16` (half the
    /// bytes; the next segment trains on rounded inputs).
    #[serde(default)]
    pub snapshot_dtype: SnapshotDtype,
    /// `advance_snapshots` tasks per snapshot depth on a cluster, each computing `1/shards` of
    /// the batches on its own worker; 0 = one per live worker of the job's backend at submit.
    #[serde(default)]
    pub snapshot_shards: u32,
    /// Streaming overlap: a segment starts once the first shard of its input is stored and waits
    /// for the other shards' batches as it reaches them.
    #[serde(default = "default_true")]
    pub snapshot_overlap: bool,
    #[serde(default)]
    pub exit: SegPropExitSpec,
}

/// Element type of stored SnapCheck snapshots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl std::fmt::Display for SnapshotDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SnapshotDtype::F32 => "f32",
            SnapshotDtype::Bf16 => "bf16",
            SnapshotDtype::F16 => "f16",
        })
    }
}

fn default_base_depth() -> usize {
    2
}
fn default_head_layers() -> usize {
    2
}
fn default_segment_size() -> usize {
    1
}
fn default_true() -> bool {
    true
}
fn default_snapcheck_budget() -> u64 {
    1 << 30
}

impl Default for SegPropSpec {
    fn default() -> Self {
        Self {
            base_depth: default_base_depth(),
            head_layers: default_head_layers(),
            segment_size: default_segment_size(),
            head_policy: HeadPolicy::default(),
            snapcheck: true,
            snapcheck_memory_bytes: default_snapcheck_budget(),
            snapshot_dtype: SnapshotDtype::default(),
            snapshot_shards: 0,
            snapshot_overlap: true,
            exit: SegPropExitSpec::default(),
        }
    }
}

/// Layer-wise baseline: every block is one stage with this exit criterion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LwSpec {
    #[serde(default = "default_stage_exit")]
    pub exit: ExitSpec,
    /// Cache the frozen prefix's outputs, as SegProp does (keeps the comparison fair).
    #[serde(default = "default_true")]
    pub snapcheck: bool,
    #[serde(default = "default_snapcheck_budget")]
    pub snapcheck_memory_bytes: u64,
}

impl Default for LwSpec {
    fn default() -> Self {
        Self {
            exit: default_stage_exit(),
            snapcheck: true,
            snapcheck_memory_bytes: default_snapcheck_budget(),
        }
    }
}

/// End-to-end baseline: one stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct E2eSpec {
    #[serde(default = "default_e2e_exit")]
    pub exit: ExitSpec,
}

fn default_e2e_exit() -> ExitSpec {
    ExitSpec::steps(1000)
}

impl Default for E2eSpec {
    fn default() -> Self {
        Self {
            exit: default_e2e_exit(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DecaySchedule {
    Constant,
    #[default]
    Linear,
    Cosine,
}

/// Learning-rate schedule, restarted at every stage over that stage's step budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    #[serde(default = "default_warmup_ratio")]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub decay: DecaySchedule,
    /// Final learning rate as a fraction of `lr`.
    #[serde(default)]
    pub min_lr_ratio: f64,
}

fn default_warmup_ratio() -> f64 {
    0.03
}

impl Default for ScheduleSpec {
    fn default() -> Self {
        Self {
            warmup_ratio: default_warmup_ratio(),
            decay: DecaySchedule::default(),
            min_lr_ratio: 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    #[serde(default = "default_optimizer_name")]
    pub name: String,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Clip the global gradient norm of the trained parameters to this value.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: Option<f64>,
    /// Micro-batches accumulated into one optimizer step.
    #[serde(default = "default_grad_accum")]
    pub grad_accum: usize,
    #[serde(default)]
    pub schedule: ScheduleSpec,
}

fn default_optimizer_name() -> String {
    "adamw".into()
}
fn default_lr() -> f64 {
    3e-4
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_grad_clip() -> Option<f64> {
    Some(1.0)
}
fn default_grad_accum() -> usize {
    1
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        Self {
            name: default_optimizer_name(),
            lr: default_lr(),
            weight_decay: default_weight_decay(),
            betas: default_betas(),
            eps: default_eps(),
            grad_clip: default_grad_clip(),
            grad_accum: default_grad_accum(),
            schedule: ScheduleSpec::default(),
        }
    }
}

/// Held-out evaluation cadence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// Evaluate every this many optimizer steps (and at the end of every stage).
    #[serde(default = "default_eval_every")]
    pub every_steps: u64,
    /// Evaluate on at most this many held-out batches (0 = all).
    #[serde(default)]
    pub max_batches: usize,
}

fn default_eval_every() -> u64 {
    50
}

impl Default for EvalSpec {
    fn default() -> Self {
        Self {
            every_steps: default_eval_every(),
            max_batches: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    #[default]
    Cpu,
    Cuda,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    F32,
    /// bfloat16 compute and frozen weights, fp32 masters and moments for the trained units.
    Bf16,
    /// IEEE half compute and frozen weights, fp32 masters and moments for the trained units.
    F16,
}

impl Precision {
    /// Whether compute and frozen weights use a 16-bit type (mixed precision).
    pub fn is_half(self) -> bool {
        !matches!(self, Precision::F32)
    }

    /// Bytes per element of compute and frozen weights.
    pub fn bytes(self) -> u64 {
        if self.is_half() { 2 } else { 4 }
    }

    /// The `torch_dtype` of an exported model (Hugging Face `config.json`).
    pub fn torch_dtype(self) -> &'static str {
        match self {
            Precision::F32 => "float32",
            Precision::Bf16 => "bfloat16",
            Precision::F16 => "float16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::F16 => "f16",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesSpec {
    #[serde(default)]
    pub backend: Backend,
    #[serde(default = "default_devices")]
    pub devices_per_gang: usize,
    #[serde(default)]
    pub precision: Precision,
}

fn default_devices() -> usize {
    1
}

impl Default for ResourcesSpec {
    fn default() -> Self {
        Self {
            backend: Backend::Cpu,
            devices_per_gang: 1,
            precision: Precision::F32,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ShardingStrategy {
    #[default]
    None,
    FullShard,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Offload {
    /// Where the backend keeps shards: host memory on CPU ranks; on CUDA it must be said
    /// (`none` or `cpu`).
    #[default]
    Auto,
    /// Device memory.
    None,
    /// Host memory, stepped there (FSDP + CPU offload).
    Cpu,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardingSpec {
    /// `full_shard`: every trained unit is sharded over the gang's `resources.devices_per_gang`
    /// ranks (FSDP); `none`: one rank holds the whole model.
    #[serde(default)]
    pub strategy: ShardingStrategy,
    /// Where each rank's shards of the master weights and optimizer state live: `cpu` (host
    /// memory, FSDP + CPU offload), `none` (device memory), or left out (`auto`: host memory on
    /// CPU ranks).
    #[serde(default)]
    pub offload: Offload,
    /// Deadline of every collective: a rank that does not join within it fails the attempt,
    /// naming the rank and the collective, instead of hanging the gang.
    #[serde(default = "default_collective_timeout_s")]
    pub collective_timeout_s: f64,
    /// Start each unit's all-gather while the rank still computes with the previous unit, and
    /// reduce-scatter each unit's gradient while it computes the next (FSDP's prefetch of one
    /// unit): two units gathered at once instead of one, the collectives hidden behind compute.
    #[serde(default = "default_prefetch")]
    pub prefetch: bool,
}

fn default_prefetch() -> bool {
    true
}

fn default_collective_timeout_s() -> f64 {
    300.0
}

impl Default for ShardingSpec {
    fn default() -> Self {
        Self {
            strategy: ShardingStrategy::None,
            offload: Offload::Auto,
            collective_timeout_s: default_collective_timeout_s(),
            prefetch: default_prefetch(),
        }
    }
}

pub use self::Backend as BackendKind;

impl JobSpec {
    /// Parses and validates a spec read from `path`. Relative data and checkpoint paths are
    /// resolved against the spec's directory.
    pub fn from_file(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|e| SpecError::io(path, &e))?;
        let source = path.display().to_string();
        let mut spec = Self::from_yaml_str(&text, &source)?;
        let base = path.parent().unwrap_or(Path::new("."));
        spec.resolve_paths(base);
        spec.check_files().map_err(|e| {
            let line = locate_field(&text, e.field().unwrap_or_default());
            e.with_source(&source, line)
        })?;
        Ok(spec)
    }

    /// Parses and validates YAML text. `source_name` appears in error messages.
    pub fn from_yaml_str(text: &str, source_name: &str) -> Result<Self, SpecError> {
        let spec: JobSpec = serde_yaml::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line());
            SpecError {
                source_name: source_name.to_string(),
                line,
                kind: SpecErrorKind::Parse {
                    message: strip_location(&e.to_string()),
                },
            }
        })?;
        spec.validate().map_err(|e| {
            let line = locate_field(text, e.field().unwrap_or_default());
            e.with_source(source_name, line)
        })?;
        Ok(spec)
    }

    fn resolve_paths(&mut self, base: &Path) {
        if !self.data.corpus.starts_with("builtin:") {
            let corpus = Path::new(&self.data.corpus);
            if corpus.is_relative() {
                self.data.corpus = base.join(corpus).display().to_string();
            }
        }
        if let Some(from) = &mut self.model.from
            && from.hf_dir.is_relative()
        {
            from.hf_dir = base.join(&from.hf_dir);
        }
    }

    /// Sequences per forward/backward pass of `stage`: `data.micro_batch` for it, at most
    /// `data.batch_size` (0 while `batch_size` is an unresolved `auto`).
    pub fn micro_batch(&self, stage: &str) -> usize {
        let batch = self.data.batch_size.get();
        self.data
            .micro_batch
            .as_ref()
            .and_then(|m| m.for_stage(stage))
            .map_or(batch, |m| m.min(batch))
    }

    /// Checks that every file the spec names exists.
    pub fn check_files(&self) -> Result<(), SpecError> {
        if !self.data.corpus.starts_with("builtin:") && !Path::new(&self.data.corpus).is_file() {
            return Err(SpecError::invalid(
                "data.corpus",
                format!("file `{}` does not exist", self.data.corpus),
            ));
        }
        if let Some(from) = &self.model.from {
            let config = from.hf_dir.join("config.json");
            if !config.is_file() {
                return Err(SpecError::invalid(
                    "model.from.hf_dir",
                    format!("`{}` does not exist", config.display()),
                ));
            }
        }
        Ok(())
    }

    /// The model shape this spec trains. For `model.from` the shape is read from the checkpoint's
    /// `config.json` by [`JobSpec::resolve_model_config`]; this returns `None` then.
    pub fn model_config(&self) -> Option<LlamaConfig> {
        if let Some(config) = &self.model.config {
            return Some(config.clone());
        }
        let mut config = LlamaConfig::preset(self.model.preset.as_deref()?)?;
        if let Some(o) = &self.model.overrides {
            macro_rules! apply {
                ($($field:ident),*) => { $( if let Some(v) = o.$field { config.$field = v; } )* };
            }
            apply!(
                vocab_size,
                hidden_size,
                intermediate_size,
                num_layers,
                num_heads,
                num_kv_heads,
                tie_embeddings,
                max_seq_len
            );
        }
        Some(config)
    }

    /// The model shape, reading `config.json` of an HF checkpoint when the spec names one.
    pub fn resolve_model_config(&self) -> Result<LlamaConfig, SpecError> {
        if let Some(config) = self.model_config() {
            return Ok(config);
        }
        let Some(from) = &self.model.from else {
            return Err(SpecError::invalid(
                "model",
                "names no preset, config or checkpoint",
            ));
        };
        let path = from.hf_dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| SpecError::io(&path, &e))?;
        let config = LlamaConfig::from_hf_json(&text).map_err(|message| SpecError {
            source_name: path.display().to_string(),
            line: None,
            kind: SpecErrorKind::Parse { message },
        })?;
        config.validate("model.from")?;
        self.validate_against_model(&config)?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = "\
version: 1
name: tiny
model: { family: llama, preset: tiny }
data: { corpus: builtin:synthetic, tokenizer: byte, seq_len: 32, batch_size: 4 }
regime: segprop
segprop:
  base_depth: 2
  head_layers: 2
  exit: { stage1: { max_steps: 10 }, segment: { max_steps: 5 } }
seed: 3
";

    #[test]
    fn parses_a_valid_spec_with_defaults() {
        let spec = JobSpec::from_yaml_str(TINY, "job.yaml").unwrap();
        assert_eq!(spec.regime, Regime::Segprop);
        assert_eq!(spec.segprop.segment_size, 1);
        assert_eq!(spec.optimizer.name, "adamw");
        assert_eq!(spec.model_config().unwrap().num_layers, 8);
    }

    #[test]
    fn where_shards_live_is_checked_per_backend() {
        let with = |backend: &str, offload: &str| {
            let text = format!(
                "{TINY}sharding: {{ strategy: full_shard{offload} }}\n\
                 resources: {{ backend: {backend} }}\n"
            );
            JobSpec::from_yaml_str(&text, "job.yaml").map_err(|e| e.to_string())
        };
        // CUDA: device memory or host memory, but it must be said.
        assert!(with("cuda", ", offload: none").is_ok());
        assert!(with("cuda", ", offload: cpu").is_ok());
        let err = with("cuda", "").unwrap_err();
        assert!(
            err.contains("sharding.offload") && err.contains("offload: none"),
            "{err}"
        );
        // CPU ranks have no device memory.
        assert!(with("cpu", "").is_ok());
        let err = with("cpu", ", offload: none").unwrap_err();
        assert!(
            err.contains("sharding.offload") && err.contains("device memory"),
            "{err}"
        );
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let text = TINY.replace("  head_layers: 2\n", "  head_layers: 2\n  head_layrs: 3\n");
        let err = JobSpec::from_yaml_str(&text, "job.yaml").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("head_layrs"), "{message}");
        assert!(message.starts_with("job.yaml:9:"), "{message}");
    }

    #[test]
    fn wrong_type_is_named() {
        let text = TINY.replace("seed: 3", "seed: three");
        let message = JobSpec::from_yaml_str(&text, "job.yaml")
            .unwrap_err()
            .to_string();
        assert!(message.contains("seed"), "{message}");
        assert!(message.starts_with("job.yaml:10:"), "{message}");
    }

    #[test]
    fn depth_beyond_the_model_is_rejected_with_field_and_line() {
        let text = TINY.replace("base_depth: 2", "base_depth: 7");
        let err = JobSpec::from_yaml_str(&text, "job.yaml").unwrap_err();
        assert_eq!(err.field(), Some("segprop.base_depth"));
        assert_eq!(err.line, Some(7));
        assert!(err.to_string().contains("exceeds the model's 8 layers"));
    }

    #[test]
    fn missing_corpus_file_is_rejected() {
        let dir = std::env::temp_dir().join(format!("segprop-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("job.yaml");
        std::fs::write(&path, TINY.replace("builtin:synthetic", "no-such-file.txt")).unwrap();
        let err = JobSpec::from_file(&path).unwrap_err();
        assert_eq!(err.field(), Some("data.corpus"));
        assert_eq!(err.line, Some(4));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_spec_file_is_an_io_error() {
        let err = JobSpec::from_file(Path::new("/nonexistent/job.yaml")).unwrap_err();
        assert!(matches!(err.kind, SpecErrorKind::Io { .. }));
    }

    #[test]
    fn unbounded_stage_is_rejected() {
        let text = TINY.replace("stage1: { max_steps: 10 }", "stage1: { patience: 3 }");
        let err = JobSpec::from_yaml_str(&text, "job.yaml").unwrap_err();
        assert_eq!(err.field(), Some("segprop.exit.stage1"));
    }

    #[test]
    fn micro_batch_is_a_number_or_a_map_by_stage_and_is_checked() {
        let spec = JobSpec::from_yaml_str(TINY, "job.yaml").unwrap();
        assert_eq!(spec.data.micro_batch, None);
        assert_eq!(spec.micro_batch("stage1"), 4);

        let every = TINY.replace("batch_size: 4 }", "batch_size: 4, micro_batch: 3 }");
        let spec = JobSpec::from_yaml_str(&every, "job.yaml").unwrap();
        assert_eq!(spec.micro_batch("stage1"), 3);
        assert_eq!(spec.micro_batch("segment-2-3"), 3);

        let per_stage = format!("{TINY}  \n").replace(
            "batch_size: 4 }",
            "batch_size: 4, micro_batch: { stage1: 2 } }",
        );
        let spec = JobSpec::from_yaml_str(&per_stage, "job.yaml").unwrap();
        assert_eq!(spec.micro_batch("stage1"), 2);
        assert_eq!(spec.micro_batch("segment-2-3"), 4);
        // It survives the coordinator's re-encoding of a resolved spec.
        let again =
            JobSpec::from_yaml_str(&serde_yaml::to_string(&spec).unwrap(), "again").unwrap();
        assert_eq!(again.data.micro_batch, spec.data.micro_batch);

        let too_big = TINY.replace("batch_size: 4 }", "batch_size: 4, micro_batch: 5 }");
        let err = JobSpec::from_yaml_str(&too_big, "job.yaml").unwrap_err();
        assert_eq!(err.field(), Some("data.micro_batch"));
        assert!(
            err.to_string().contains("exceeds data.batch_size 4"),
            "{err}"
        );

        let zero = TINY.replace(
            "batch_size: 4 }",
            "batch_size: 4, micro_batch: { stage1: 0 } }",
        );
        let err = JobSpec::from_yaml_str(&zero, "job.yaml").unwrap_err();
        assert_eq!(err.field(), Some("data.micro_batch.stage1"));

        let unknown = TINY.replace(
            "batch_size: 4 }",
            "batch_size: 4, micro_batch: { segment-9-10: 2 } }",
        );
        let message = JobSpec::from_yaml_str(&unknown, "job.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("data.micro_batch.segment-9-10"),
            "{message}"
        );
        assert!(
            message.contains("its stages: stage1, segment-2-3"),
            "{message}"
        );

        let wrong = TINY.replace("batch_size: 4 }", "batch_size: 4, micro_batch: lots }");
        let message = JobSpec::from_yaml_str(&wrong, "job.yaml")
            .unwrap_err()
            .to_string();
        assert!(message.contains("`lots` is not a micro-batch"), "{message}");
        let auto = TINY.replace("batch_size: 4 }", "batch_size: 4, micro_batch: auto }");
        let spec = JobSpec::from_yaml_str(&auto, "job.yaml").unwrap();
        assert_eq!(spec.data.micro_batch, Some(MicroBatch::Auto));
        assert_eq!(
            spec.micro_batch("stage1"),
            4,
            "whole batches until resolved"
        );
    }

    #[test]
    fn locate_field_follows_the_path() {
        assert_eq!(locate_field(TINY, "segprop.head_layers"), Some(8));
        assert_eq!(locate_field(TINY, "data.seq_len"), Some(4));
        assert_eq!(locate_field(TINY, "segprop.exit.segment"), Some(9));
    }
}
