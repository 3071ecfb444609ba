//! `resources:` (backend, devices, precision) and `sharding:` (FSDP strategy, offload,
//! collective deadline, prefetch).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    #[default]
    Cpu,
    Cuda,
}

impl Backend {
    /// The backend a worker names (`cpu` or `cuda`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "cpu" => Some(Backend::Cpu),
            "cuda" => Some(Backend::Cuda),
            _ => None,
        }
    }
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
