//! A rank of a sharded gang: its place and collective ([`ShardRank`]), how it runs a step
//! ([`ShardOptions`]), and what it holds during a sharded stage ([`RankMemory`], reported in the
//! stage records). The engine, the sharded stage and the metrics all use these; this module
//! uses none of them.

use segprop_shard::{Collective as _, CommStream};
use serde::{Deserialize, Serialize};

/// This rank's place in a sharded gang.
pub struct ShardRank {
    /// The rank's collective, on a communication thread of its own.
    pub collective: CommStream,
    pub options: ShardOptions,
}

/// How a gang's ranks run a step (from the job spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardOptions {
    /// Recompute each unit's forward in backward (re-gathering its weights) instead of keeping
    /// the gathered weights and the graph from forward to backward.
    pub activation_checkpointing: bool,
    /// Start each unit's all-gather while the rank still computes with the previous unit, and
    /// let each unit's reduce-scatter run while it computes the next (`sharding.prefetch`).
    pub prefetch: bool,
    /// Keep each rank's chunk of every unit and its AdamW state in device memory and step it
    /// there (`sharding.offload: none`); host memory otherwise (`offload: cpu`, CPU ranks).
    pub device_shards: bool,
}

impl ShardOptions {
    pub fn of(spec: &segprop_core::JobSpec) -> Self {
        Self {
            activation_checkpointing: spec.activation_checkpointing,
            prefetch: spec.sharding.prefetch,
            device_shards: spec.sharding.offload == segprop_core::spec::Offload::None,
        }
    }
}

impl ShardRank {
    pub fn rank(&self) -> usize {
        self.collective.rank()
    }

    pub fn world(&self) -> usize {
        self.collective.world_size()
    }
}

/// What one rank holds during a sharded stage, in bytes (reported in the stage's metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankMemory {
    pub rank: usize,
    pub world: usize,
    /// Trained units sharded in this stage.
    pub units: usize,
    /// Units of the frozen prefix (the embedding and blocks `0..depth` of a route that reads
    /// `S[depth]`), sharded too: gathered block by block, forward only, when `S[depth]` is not
    /// in SnapCheck, and freed after use.
    #[serde(default)]
    pub prefix_units: usize,
    /// This rank's shards of the frozen prefix (what each rank holds of it).
    #[serde(default)]
    pub prefix_bytes: u64,
    /// Blocks the stage neither trains nor reads (those of later segments), sharded and left
    /// alone until the stage's checkpoints and its end gather them back.
    #[serde(default)]
    pub parked_units: usize,
    /// This rank's shards of the parked blocks.
    #[serde(default)]
    pub parked_bytes: u64,
    /// The trained units whole (fp32): what one unsharded rank would hold.
    pub unit_bytes: u64,
    /// This rank's shards of the fp32 master weights (host memory, or device memory when
    /// `shards_on_device`).
    pub params_bytes: u64,
    /// This rank's shards of both AdamW moments (where the masters are).
    pub optimizer_bytes: u64,
    /// Whether the shards (weights and AdamW state) live in device memory and are stepped there
    /// (`sharding.offload: none`), not in host memory.
    #[serde(default)]
    pub shards_on_device: bool,
    /// This rank's gradient shards plus the most full-gradient buffers held at once (with
    /// prefetch, one unit's still being reduce-scattered while the next is computed).
    pub grad_bytes: u64,
    /// The most gathered (full) weights held at once: the unit in use and, with prefetch, the
    /// next one arriving.
    pub gathered_peak_bytes: u64,
    /// What a unit holds besides its gathered weights while it is back-propagated, for the
    /// largest trained unit: its full gradient as burn's tensors, before it is flattened for
    /// the reduce-scatter.
    #[serde(default)]
    pub transient_bytes: u64,
    /// Unit-boundary activations saved for backward in the last step (activation
    /// checkpointing); the graph's own activations show in the stage's `peak_bytes`.
    pub activation_bytes: u64,
    /// Wire bytes this rank moved in the last training step (ring model), the gathers of the
    /// frozen prefix included when the step computed it.
    pub comm_bytes_per_step: u64,
    /// What the schedule should move per step, `(N − 1)/N` of: with activation checkpointing
    /// `3 ×` every unit but the head (gathered for forward, re-gathered for backward,
    /// reduce-scattered) and `2 ×` the head (its backward follows its forward at once); without,
    /// `2 ×` every unit. Padding included; the few scalars of the loss and norm all-reduces not.
    pub expected_comm_bytes_per_step: u64,
}
