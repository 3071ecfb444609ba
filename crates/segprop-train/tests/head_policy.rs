//! The head policies through the real stage plan (`segprop::run_next_stage`, as a worker runs
//! it), for r = 0, 1, 2 head layers and segments of k = 1 and 2 blocks.
//!
//! `reset` (ICLR): the first segment leaves LL(r) as stage 1 left it; at each later segment LL's
//! decoder blocks return to those baseline weights and lose their AdamW state, while the LM head
//! (final norm + output) keeps its weights and moments. `persistent` (TMLR) never resets. Each
//! test runs the plan under `reset` and, beside it, a `persistent` trainer on which the test
//! resets LL's blocks by hand at the same points; the two must agree bit for bit.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;

use burn::module::ParamId;
use burn::optim::Optimizer;
use segprop_core::{JobSpec, StageKind};
use segprop_model::{Block, ParamIds};
use segprop_train::metrics::RecordingObserver;
use segprop_train::segprop::{self, parameter_values};
use segprop_train::{CpuBackend as B, Trainer};

fn spec(policy: &str, layers: usize, r: usize, k: usize) -> String {
    format!(
        "
version: 1
name: heads
model: {{ preset: tiny, overrides: {{ num_layers: {layers} }} }}
data: {{ corpus: builtin:synthetic, seq_len: 16, batch_size: 4, synthetic_tokens: 6000, eval_fraction: 0.1 }}
regime: segprop
segprop:
  base_depth: 2
  head_layers: {r}
  segment_size: {k}
  head_policy: {policy}
  exit: {{ stage1: {{ max_steps: 3 }}, segment: {{ max_steps: 3 }} }}
optimizer: {{ lr: 1.0e-2 }}
eval: {{ every_steps: 100, max_batches: 1 }}
seed: 11
"
    )
}

fn trainer(policy: &str, layers: usize, r: usize, k: usize) -> (Trainer<B>, tempfile::TempDir) {
    let spec = JobSpec::from_yaml_str(&spec(policy, layers, r, k), "heads.yaml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let trainer = Trainer::<B>::new(spec, Default::default(), dir.path()).unwrap();
    (trainer, dir)
}

/// Every parameter's bits in module order (ids differ between trainers; the order does not).
fn bits(trainer: &Trainer<B>) -> Vec<Vec<u32>> {
    parameter_values(&trainer.model)
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

fn head_blocks(trainer: &Trainer<B>) -> Vec<Block<B>> {
    let n = trainer.config.num_layers;
    trainer.model.blocks[n - trainer.plan.head_layers..n].to_vec()
}

/// The ids of parameters with AdamW state in the head optimizer.
fn optimizer_state(trainer: &Trainer<B>) -> HashSet<ParamId> {
    let opt = trainer.head_optimizer.as_ref().expect("a head optimizer");
    opt.to_record().keys().copied().collect()
}

fn run_stage(trainer: &mut Trainer<B>) -> StageKind {
    let mut obs = RecordingObserver::default();
    segprop::run_next_stage(trainer, &mut obs)
        .unwrap()
        .expect("a stage left in the plan");
    trainer.plan.stages[trainer.progress.next_stage - 1].kind
}

/// The "by hand" reset: LL's blocks to `baseline`, their AdamW state dropped.
fn reset_by_hand(trainer: &mut Trainer<B>, baseline: &[Block<B>], drop_state: bool) {
    let n = trainer.config.num_layers;
    let r = baseline.len();
    let mut ids = HashSet::new();
    for (slot, block) in trainer.model.blocks[n - r..n].iter_mut().zip(baseline) {
        ids.extend(ParamIds::of(block).0);
        *slot = block.clone();
    }
    if drop_state && let Some(opt) = trainer.head_optimizer.take() {
        let mut record = opt.to_record();
        record.retain(|id, _| !ids.contains(id));
        trainer.head_optimizer = Some(opt.load_record(record));
    }
}

/// Runs the whole plan under `reset` and under `persistent` with the reset done by hand, stage
/// by stage, and checks what the policy promises at every segment.
fn reset_matches_the_policy(layers: usize, r: usize, k: usize) {
    let (mut plan, _d1) = trainer("reset", layers, r, k);
    let (mut hand, _d2) = trainer("persistent", layers, r, k);
    assert_eq!(bits(&plan), bits(&hand), "same seed, same init");

    assert!(matches!(run_stage(&mut plan), StageKind::Stage1 { .. }));
    run_stage(&mut hand);
    let baseline = head_blocks(&hand);
    let baseline_bits: Vec<Vec<u32>> = baseline
        .iter()
        .flat_map(|b| parameter_values(b).into_iter().map(|(_, v)| v))
        .collect();

    let mut segments = 0;
    while !segprop::plan_done(&plan) {
        if segments > 0 {
            reset_by_hand(&mut hand, &baseline, true);
        }
        let kind = run_stage(&mut plan);
        let hand_kind = run_stage(&mut hand);
        assert_eq!(kind, hand_kind);
        let StageKind::Segment { start, end } = kind else {
            panic!("stage 2 runs segments, got {kind:?}");
        };
        assert!(
            end - start == k || (end - start < k && end == layers - r),
            "segments of k blocks, the last one possibly shorter: {start}..{end}"
        );
        segments += 1;
        assert_eq!(
            bits(&plan),
            bits(&hand),
            "after segment {start}..{end} (segment {segments}): the plan's reset differs from \
             the policy (first segment untouched, later ones from the stage-1 baseline without \
             AdamW state)"
        );
        if r > 0 {
            let trained: Vec<Vec<u32>> = head_blocks(&plan)
                .iter()
                .flat_map(|b| parameter_values(b).into_iter().map(|(_, v)| v))
                .collect();
            assert_ne!(trained, baseline_bits, "LL(r) trains within the segment");
            // The LL blocks' state exists again: the segment's steps recreated it.
            let ids: HashSet<ParamId> = head_blocks(&plan)
                .iter()
                .flat_map(|b| ParamIds::of(b).0)
                .collect();
            assert!(ids.is_subset(&optimizer_state(&plan)));
        }
    }
    assert_eq!(segments, (layers - 2 - r).div_ceil(k));
}

#[test]
fn reset_follows_the_policy_with_two_head_layers_and_single_block_segments() {
    reset_matches_the_policy(6, 2, 1);
}

#[test]
fn reset_follows_the_policy_with_two_block_segments() {
    // Blocks 2..7 in segments 2..4, 4..6 and the shorter 6..7.
    reset_matches_the_policy(8, 1, 2);
}

#[test]
fn with_no_head_layers_reset_and_persistent_are_the_same_run() {
    reset_matches_the_policy(5, 0, 1);
    let run = |policy: &str| {
        let (mut t, _dir) = trainer(policy, 5, 0, 1);
        let after_stage1 = {
            run_stage(&mut t);
            parameter_values(&t.model.head)
        };
        segprop::run_plan(&mut t, &mut RecordingObserver::default()).unwrap();
        assert_ne!(
            parameter_values(&t.model.head),
            after_stage1,
            "the LM head trains in every segment"
        );
        bits(&t)
    };
    assert_eq!(run("reset"), run("persistent"));
}

#[test]
fn keeping_the_head_blocks_adamw_state_is_not_the_reset() {
    // The same plan with the blocks reset by hand but their AdamW state kept differs from the
    // real reset after the second segment: the equality above depends on the state dropped
    // (and, as the LM head's state is kept there, on the LM head's moments surviving).
    let (mut plan, _d1) = trainer("reset", 6, 2, 1);
    let (mut kept, _d2) = trainer("persistent", 6, 2, 1);
    run_stage(&mut plan);
    run_stage(&mut kept);
    let baseline = head_blocks(&kept);
    run_stage(&mut plan);
    run_stage(&mut kept);
    assert_eq!(bits(&plan), bits(&kept));
    reset_by_hand(&mut kept, &baseline, false);
    run_stage(&mut plan);
    run_stage(&mut kept);
    assert_ne!(bits(&plan), bits(&kept));
}
