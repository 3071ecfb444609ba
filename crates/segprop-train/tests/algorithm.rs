//! The algorithm's guarantees, checked on a tiny model (DESIGN.md §2, issue "training engine"):
//! what each stage trains and freezes, what stage 1 skips, the reset policy, and SnapCheck.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;

use burn::module::{AutodiffModule, Module, ParamId};
use burn::prelude::*;
use segprop_core::{JobSpec, StageKind, StagePlanEntry};
use segprop_model::ParamIds;
use segprop_train::metrics::RecordingObserver;
use segprop_train::route::Route;
use segprop_train::segprop::{self, parameter_values};
use segprop_train::snapcheck::Split;
use segprop_train::{CpuBackend as B, Trainer};

const SPEC: &str = "
version: 1
name: algo
model: { preset: tiny, overrides: { num_layers: 6 } }
data: { corpus: builtin:synthetic, seq_len: 16, batch_size: 4, synthetic_tokens: 6000, eval_fraction: 0.1 }
regime: segprop
segprop:
  base_depth: 2
  head_layers: 2
  segment_size: 1
  head_policy: HEAD_POLICY
  snapcheck: SNAPCHECK
  exit: { stage1: { max_steps: 4 }, segment: { max_steps: 3 } }
optimizer: { lr: 1.0e-2 }
eval: { every_steps: 100, max_batches: 2 }
seed: 5
";

fn trainer(head_policy: &str, snapcheck: bool) -> (Trainer<B>, tempfile::TempDir) {
    let text = SPEC
        .replace("HEAD_POLICY", head_policy)
        .replace("SNAPCHECK", &snapcheck.to_string());
    let spec = JobSpec::from_yaml_str(&text, "algo.yaml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let trainer = Trainer::<B>::new(spec, Default::default(), dir.path()).unwrap();
    (trainer, dir)
}

fn entry(trainer: &Trainer<B>, name: &str) -> StagePlanEntry {
    trainer
        .plan
        .stages
        .iter()
        .find(|s| s.name == name)
        .cloned()
        .unwrap()
}

/// Runs stage 1 and commits the base prefix `0..2`.
fn stage1_and_commit(t: &mut Trainer<B>, obs: &mut RecordingObserver) {
    let e = entry(t, "stage1");
    segprop::stage1(t, &e, obs).unwrap();
    segprop::commit_prefix(t, 2);
}

fn ids_of<M: Module<B>>(module: &M) -> HashSet<ParamId> {
    ParamIds::of(module).0.into_iter().collect()
}

/// Parameter values grouped as `(ids, values)` for comparisons.
fn values(trainer: &Trainer<B>) -> std::collections::HashMap<ParamId, Vec<u32>> {
    parameter_values(&trainer.model).into_iter().collect()
}

#[test]
fn a_stage2_segment_trains_only_the_segment_and_the_head() {
    let (mut t, _dir) = trainer("persistent", true);
    let mut obs = RecordingObserver::default();
    stage1_and_commit(&mut t, &mut obs);

    let m = &t.model;
    let mut frozen: HashSet<ParamId> = ids_of(&m.embed_tokens);
    for b in &m.blocks[0..2] {
        frozen.extend(ids_of(b));
    }
    let untouched: HashSet<ParamId> = ids_of(&m.blocks[3]); // a later intermediate block
    let segment = ids_of(&m.blocks[2]);
    let mut head = ids_of(&m.head);
    for b in &m.blocks[4..6] {
        head.extend(ids_of(b));
    }

    // The frozen prefix receives no gradient; the segment and LL(r) do.
    let seg = entry(&t, "segment-2-3");
    let route = t.route(&seg);
    let batch = t.data.train[0].clone();
    t.freeze_prefix(2);
    let with_grad: HashSet<ParamId> = t.gradient_param_ids(route, &batch).into_iter().collect();
    assert!(
        with_grad.is_disjoint(&frozen),
        "the frozen prefix received a gradient"
    );
    assert!(with_grad.is_disjoint(&untouched));
    assert!(segment.is_subset(&with_grad) && head.is_subset(&with_grad));

    let before = values(&t);
    segprop::stage2_segment(&mut t, &seg, &mut obs).unwrap();
    let after = values(&t);
    for id in frozen.iter().chain(&untouched) {
        assert_eq!(
            before[id], after[id],
            "a parameter outside {{segment, LL}} changed"
        );
    }
    assert!(
        segment.iter().all(|id| before[id] != after[id]),
        "the segment did not train"
    );
    let changed_head = head.iter().filter(|id| before[*id] != after[*id]).count();
    assert_eq!(changed_head, head.len(), "LL(r) did not train");
}

#[test]
fn stage1_skips_intermediate_blocks() {
    let (mut reference, _d1) = trainer("persistent", false);
    let (mut poisoned, _d2) = trainer("persistent", false);
    // Poison every intermediate block: if stage 1 ran one, its loss would be NaN.
    for block in &mut poisoned.model.blocks[2..4] {
        *block = block.clone().map(&mut NanMapper);
    }
    let mut a = RecordingObserver::default();
    let mut b = RecordingObserver::default();
    {
        let e = entry(&reference, "stage1");
        segprop::stage1(&mut reference, &e, &mut a)
    }
    .unwrap();
    {
        let e = entry(&poisoned, "stage1");
        segprop::stage1(&mut poisoned, &e, &mut b)
    }
    .unwrap();
    let la: Vec<f64> = a.steps().iter().map(|s| s.loss).collect();
    let lb: Vec<f64> = b.steps().iter().map(|s| s.loss).collect();
    assert!(la.iter().all(|l| l.is_finite()));
    assert_eq!(la, lb, "stage 1 losses depend on intermediate blocks");
    // The route itself names no intermediate block.
    let route = reference.route(&entry(&reference, "stage1"));
    let (prefix, head) = route.blocks();
    assert!(prefix.end <= 2 && head.start >= 4);
}

struct NanMapper;
impl burn::module::ModuleMapper<B> for NanMapper {
    fn map_float<const D: usize>(
        &mut self,
        param: burn::module::Param<Tensor<B, D>>,
    ) -> burn::module::Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let nan = tensor.mul_scalar(f32::NAN);
        burn::module::Param::from_mapped_value(id, nan, mapper)
    }
}

#[test]
fn reset_policy_returns_head_blocks_to_baseline_at_each_new_segment() {
    let (mut t, _dir) = trainer("reset", true);
    let mut obs = RecordingObserver::default();
    stage1_and_commit(&mut t, &mut obs);
    let baseline = segprop::head_baseline(&t);
    let baseline_values = parameter_values(&t.model.blocks[4]);
    let baseline_values_5 = parameter_values(&t.model.blocks[5]);
    let lm_head_before = parameter_values(&t.model.head);

    {
        let e = entry(&t, "segment-2-3");
        segprop::stage2_segment(&mut t, &e, &mut obs)
    }
    .unwrap();
    segprop::commit_segment(&mut t, 2, 3).unwrap();
    assert_ne!(
        parameter_values(&t.model.blocks[4]),
        baseline_values,
        "LL trained in the segment"
    );

    segprop::reset_head(&mut t, &baseline);
    assert_eq!(parameter_values(&t.model.blocks[4]), baseline_values);
    assert_eq!(parameter_values(&t.model.blocks[5]), baseline_values_5);
    assert_ne!(
        parameter_values(&t.model.head),
        lm_head_before,
        "the LM head's update is kept"
    );
}

#[test]
fn reset_and_persistent_policies_differ_through_the_whole_plan() {
    let run = |policy: &str| {
        let (mut t, _dir) = trainer(policy, true);
        segprop::run_plan(&mut t, &mut RecordingObserver::default()).unwrap();
        parameter_values(&t.model.blocks[4])
    };
    assert_ne!(run("reset"), run("persistent"));
}

#[test]
fn snapcheck_equals_recomputation_and_incremental_advance_equals_full_recompute() {
    let (mut cached, _d1) = trainer("persistent", true);
    let (mut plain, _d2) = trainer("persistent", false);
    let mut obs = RecordingObserver::default();
    for t in [&mut cached, &mut plain] {
        let e = entry(t, "stage1");
        segprop::stage1(t, &e, &mut obs).unwrap();
        segprop::commit_prefix(t, 2);
        t.freeze_prefix(2);
    }
    let batches: Vec<_> = cached.data.train.iter().take(3).cloned().collect();
    for batch in &batches {
        let first = cached.prefix_output(2, Split::Train, batch); // fills S[2, b]
        let again = cached.prefix_output(2, Split::Train, batch); // reads S[2, b]
        let recomputed = plain.prefix_output(2, Split::Train, batch);
        first.to_data().assert_eq(&recomputed.to_data(), true);
        again.to_data().assert_eq(&recomputed.to_data(), true);
    }
    assert!(cached.cache.as_ref().unwrap().stats().hits >= 3);

    // Train and commit segment 2..3 (it caches every train batch), then compare the advanced
    // snapshots S[3, b] = F_{2:3}(S[2, b]) with a full recompute of blocks 0..3.
    let seg = entry(&cached, "segment-2-3");
    segprop::stage2_segment(&mut cached, &seg, &mut obs).unwrap();
    segprop::commit_segment(&mut cached, 2, 3).unwrap();
    let stats = cached.cache.as_ref().unwrap().stats();
    assert!(stats.advanced > 0);
    assert_eq!(
        cached
            .cache
            .as_ref()
            .unwrap()
            .depths()
            .into_iter()
            .collect::<Vec<_>>(),
        vec![3]
    );
    let model = cached.model.valid();
    let rope = segprop_model::RopeTables::new(&cached.config, 16, &Default::default());
    for batch in &batches {
        let advanced = cached.prefix_output(3, Split::Train, batch);
        let tokens = Tensor::from_data(
            TensorData::new(batch.inputs.clone(), [batch.batch, batch.seq]),
            &Default::default(),
        );
        let full = model.forward_blocks(model.embed(tokens), 0..3, &rope);
        advanced.to_data().assert_eq(&full.to_data(), true);
    }
}

#[test]
fn segment_routes_cover_the_intermediate_blocks() {
    let (t, _dir) = trainer("persistent", true);
    let segments: Vec<_> = t
        .plan
        .stages
        .iter()
        .filter_map(|s| match s.kind {
            StageKind::Segment { start, end } => Some(start..end),
            _ => None,
        })
        .collect();
    assert_eq!(segments, vec![2..3, 3..4]);
    let route = t.route(&entry(&t, "segment-3-4"));
    assert!(matches!(
        route,
        Route::Segment {
            start: 3,
            end: 4,
            head_start: 4,
            ..
        }
    ));
}

#[test]
fn gradient_accumulation_averages_micro_batch_gradients() {
    // Two identical micro-batches must give exactly the update of one: the accumulated gradient
    // is their mean, not their sum.
    let (mut once, _d1) = trainer("persistent", false);
    let (mut twice, _d2) = trainer("persistent", false);
    let e = entry(&once, "stage1");
    let route = once.route(&e);
    let batch = once.data.train[0].clone();
    for (t, batches) in [
        (&mut once, vec![&batch]),
        (&mut twice, vec![&batch, &batch]),
    ] {
        let trainable = t.trainable(route);
        let mut opt = t.new_optimizer();
        let (loss, norm) = t.train_step(route, &batches, 0, &trainable, &mut opt, 1e-2);
        assert!(loss.is_finite() && norm > 0.0);
    }
    let a = parameter_values(&once.model);
    let b = parameter_values(&twice.model);
    let max_diff = a
        .iter()
        .zip(&b)
        .flat_map(|((_, x), (_, y))| {
            x.iter()
                .zip(y)
                .map(|(p, q)| (f32::from_bits(*p) - f32::from_bits(*q)).abs())
        })
        .fold(0.0f32, f32::max);
    assert!(
        max_diff < 1e-6,
        "accumulating a batch twice changed the update by {max_diff}"
    );
}
