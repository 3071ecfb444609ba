//! The stage plan: the ordered list of training stages a job's regime implies.
//!
//! For SegProp (Algorithm 1 of the papers): stage 1 trains `embed`, the base prefix `0..p` and the
//! global head LL(r); then one stage-2 stage per segment `[q, q+k)` of the intermediate blocks
//! `p..n-r`. The layer-wise baseline has one stage per block (`local_heads`: every block with
//! its own local head; `base_prefix`: SegProp's stage 1, then blocks `p..n` each under the
//! model's LM head alone), optionally ending with a stage that trains the LM head alone;
//! end-to-end has one stage.

use serde::{Deserialize, Serialize};

use crate::spec::{JobSpec, LwVariant, Regime};

/// What one stage trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StageKind {
    /// All parameters, full backprop.
    E2e,
    /// SegProp stage 1: embed + blocks `0..p` + LL(r); intermediate blocks skipped.
    Stage1 { base_depth: usize },
    /// SegProp stage 2: blocks `start..end` on top of the committed prefix `0..start`.
    Segment { start: usize, end: usize },
    /// Layer-wise: block `block` (with embed when `block == 0`) and a local aux head.
    LwBlock { block: usize },
    /// Layer-wise with a base prefix: block `block` on the committed prefix `0..block`, with the
    /// model's own LM head directly on top (no decoder blocks of LL(r)).
    LwGlobal { block: usize },
    /// Layer-wise's last stage: the LM head alone on the frozen network's output.
    LwHead,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagePlanEntry {
    /// 0-based position in the plan.
    pub index: usize,
    /// Stable human name: `stage1`, `segment-4-5`, `lw-block-3`, `e2e`.
    pub name: String,
    pub kind: StageKind,
}

/// The ordered stages of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagePlan {
    pub num_layers: usize,
    /// Global head depth r of stage 1 (SegProp, and layer-wise with a base prefix; 0 otherwise).
    pub head_layers: usize,
    pub stages: Vec<StagePlanEntry>,
}

impl StagePlan {
    /// Builds the plan for a validated spec and a model with `num_layers` blocks.
    pub fn new(spec: &JobSpec, num_layers: usize) -> Self {
        let mut kinds = Vec::new();
        let mut head_layers = 0;
        match spec.regime {
            Regime::E2e => kinds.push(StageKind::E2e),
            Regime::Lw => {
                match spec.lw.variant {
                    LwVariant::LocalHeads => {
                        kinds.extend((0..num_layers).map(|block| StageKind::LwBlock { block }))
                    }
                    LwVariant::BasePrefix => {
                        let p = spec.lw.base_depth();
                        head_layers = spec.lw.head_layers();
                        kinds.push(StageKind::Stage1 { base_depth: p });
                        kinds.extend((p..num_layers).map(|block| StageKind::LwGlobal { block }));
                    }
                }
                if spec.lw.final_head.is_some() {
                    kinds.push(StageKind::LwHead);
                }
            }
            Regime::Segprop => {
                let s = &spec.segprop;
                head_layers = s.head_layers;
                kinds.push(StageKind::Stage1 {
                    base_depth: s.base_depth,
                });
                let intermediate_end = num_layers - s.head_layers;
                let mut start = s.base_depth;
                while start < intermediate_end {
                    let end = (start + s.segment_size).min(intermediate_end);
                    kinds.push(StageKind::Segment { start, end });
                    start = end;
                }
            }
        }
        let stages = kinds
            .into_iter()
            .enumerate()
            .map(|(index, kind)| StagePlanEntry {
                index,
                name: kind.name(),
                kind,
            })
            .collect();
        Self {
            num_layers,
            head_layers,
            stages,
        }
    }
}

impl StageKind {
    pub fn name(&self) -> String {
        match self {
            StageKind::E2e => "e2e".into(),
            StageKind::Stage1 { .. } => "stage1".into(),
            StageKind::Segment { start, end } => format!("segment-{start}-{end}"),
            StageKind::LwBlock { block } | StageKind::LwGlobal { block } => {
                format!("lw-block-{block}")
            }
            StageKind::LwHead => "lw-head".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(regime: &str, extra: &str) -> JobSpec {
        let text = format!(
            "version: 1\nname: t\nmodel: {{ preset: tiny }}\n\
             data: {{ corpus: builtin:synthetic, seq_len: 16, batch_size: 2 }}\n\
             regime: {regime}\n{extra}"
        );
        JobSpec::from_yaml_str(&text, "t").unwrap()
    }

    #[test]
    fn segprop_plan_covers_every_intermediate_block_once() {
        let spec = spec(
            "segprop",
            "segprop: { base_depth: 2, head_layers: 2, segment_size: 3 }\n",
        );
        let plan = StagePlan::new(&spec, 10);
        let names: Vec<_> = plan.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["stage1", "segment-2-5", "segment-5-8"]);
        let plan = StagePlan::new(&spec, 9);
        let names: Vec<_> = plan.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["stage1", "segment-2-5", "segment-5-7"]);
    }

    #[test]
    fn segprop_with_no_intermediate_blocks_is_stage1_only() {
        let spec = spec("segprop", "segprop: { base_depth: 6, head_layers: 2 }\n");
        assert_eq!(StagePlan::new(&spec, 8).stages.len(), 1);
    }

    #[test]
    fn layer_wise_variants() {
        let base = spec(
            "lw",
            "lw: { variant: base_prefix, base_depth: 2, head_layers: 1, final_head: { max_steps: 5 } }\n",
        );
        let plan = StagePlan::new(&base, 5);
        let kinds: Vec<_> = plan.stages.iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds,
            [
                StageKind::Stage1 { base_depth: 2 },
                StageKind::LwGlobal { block: 2 },
                StageKind::LwGlobal { block: 3 },
                StageKind::LwGlobal { block: 4 },
                StageKind::LwHead,
            ]
        );
        assert_eq!(plan.head_layers, 1);
        let names: Vec<_> = plan.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names[1], "lw-block-2");
        assert_eq!(names[4], "lw-head");
        let local = spec("lw", "lw: { final_head: { max_steps: 5 } }\n");
        let plan = StagePlan::new(&local, 3);
        assert_eq!(plan.stages.len(), 4);
        assert_eq!(plan.stages[3].kind, StageKind::LwHead);
        assert_eq!(plan.head_layers, 0);
    }

    #[test]
    fn baselines() {
        assert_eq!(StagePlan::new(&spec("lw", ""), 8).stages.len(), 8);
        assert_eq!(
            StagePlan::new(&spec("e2e", ""), 8).stages[0].kind,
            StageKind::E2e
        );
    }
}
