//! The training regime and its sections: `segprop:`, `lw:`, `e2e:` and their exit rules.

use serde::{Deserialize, Serialize};

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

/// Which layer-wise baseline `regime: lw` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LwVariant {
    /// Every block in turn from the embedding, each with its own freshly initialised local LM
    /// head (the last block's head becomes the model's).
    #[default]
    LocalHeads,
    /// The ICLR paper's "w/o LL": SegProp's stage 1 (embed, blocks `0..p` and LL(r)), then every
    /// later block `p..n` in turn with the model's own LM head on top and no decoder blocks
    /// between them; the LM head keeps training (and its optimizer state) across blocks.
    BasePrefix,
}

impl std::fmt::Display for LwVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LwVariant::LocalHeads => "local_heads",
            LwVariant::BasePrefix => "base_prefix",
        })
    }
}

/// Layer-wise baseline: every block is one stage with this exit criterion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LwSpec {
    #[serde(default)]
    pub variant: LwVariant,
    /// `base_prefix`: p, the blocks stage 1 trains (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_depth: Option<usize>,
    /// `base_prefix`: r, the decoder blocks of stage 1's head LL(r) (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_layers: Option<usize>,
    /// `base_prefix`: when stage 1 stops (default 100 steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage1: Option<ExitSpec>,
    /// When each block's stage stops.
    #[serde(default = "default_stage_exit")]
    pub exit: ExitSpec,
    /// A last stage that trains the LM head alone on the frozen network (the TMLR paper's `fc`
    /// stage, appendix B.2.3); with `local_heads` the head starts from a fresh initialisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_head: Option<ExitSpec>,
    /// Cache the frozen prefix's outputs, as SegProp does (keeps the comparison fair).
    #[serde(default = "default_true")]
    pub snapcheck: bool,
    #[serde(default = "default_snapcheck_budget")]
    pub snapcheck_memory_bytes: u64,
}

impl LwSpec {
    /// `base_prefix`'s p.
    pub fn base_depth(&self) -> usize {
        self.base_depth.unwrap_or(default_base_depth())
    }
    /// `base_prefix`'s r (stage 1 only).
    pub fn head_layers(&self) -> usize {
        self.head_layers.unwrap_or(default_head_layers())
    }
    /// `base_prefix`'s stage-1 exit.
    pub fn stage1_exit(&self) -> ExitSpec {
        self.stage1.clone().unwrap_or_else(default_stage_exit)
    }
}

impl Default for LwSpec {
    fn default() -> Self {
        Self {
            variant: LwVariant::default(),
            base_depth: None,
            head_layers: None,
            stage1: None,
            exit: default_stage_exit(),
            final_head: None,
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
