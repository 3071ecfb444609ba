//! The papers' layer-wise baselines (issue 20) and multiple-choice task scoring:
//!
//! - `lw.variant: base_prefix` (ICLR "w/o LL"): SegProp's stage 1, then each later block under
//!   the model's own LM head alone, the head carried (weights and AdamW state) across blocks.
//! - `lw.final_head` (TMLR B.2.3 `fc`): a last stage that trains the LM head alone.
//! - `eval.tasks`: scores per stage and on the exported model, which prefer the text the model
//!   learned over bytes it never saw.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;

use burn::module::ParamId;
use segprop_core::{JobSpec, StageKind};
use segprop_model::ParamIds;
use segprop_train::metrics::RecordingObserver;
use segprop_train::segprop::{self, parameter_values};
use segprop_train::{CpuBackend as B, RunOptions, Trainer, run_job};

fn spec(lw: &str, extra: &str) -> JobSpec {
    let text = format!(
        "
version: 1
name: lw
model: {{ preset: tiny, overrides: {{ num_layers: 5 }} }}
data: {{ corpus: builtin:synthetic, seq_len: 16, batch_size: 4, synthetic_tokens: 8000, eval_fraction: 0.1 }}
regime: lw
lw: {lw}
optimizer: {{ lr: 1.0e-2 }}
eval: {{ every_steps: 100, max_batches: 1 }}
seed: 4
{extra}"
    );
    JobSpec::from_yaml_str(&text, "lw.yaml").unwrap()
}

fn ids(ids: ParamIds) -> HashSet<ParamId> {
    ids.0.into_iter().collect()
}

/// The ids that receive a gradient from one batch of the next stage's route.
fn grads_of_next(trainer: &mut Trainer<B>) -> HashSet<ParamId> {
    let entry = trainer.plan.stages[trainer.progress.next_stage].clone();
    let route = trainer.route(&entry);
    let batch = trainer.data.train[0].clone();
    trainer
        .gradient_param_ids(route, &batch)
        .into_iter()
        .collect()
}

#[test]
fn base_prefix_trains_each_later_block_under_the_model_head_alone() {
    let spec = spec(
        "{ variant: base_prefix, base_depth: 2, head_layers: 1, stage1: { max_steps: 3 }, exit: { max_steps: 3 } }",
        "",
    );
    let dir = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::<B>::new(spec, Default::default(), dir.path()).unwrap();
    let kinds: Vec<StageKind> = trainer.plan.stages.iter().map(|s| s.kind).collect();
    assert_eq!(
        kinds,
        [
            StageKind::Stage1 { base_depth: 2 },
            StageKind::LwGlobal { block: 2 },
            StageKind::LwGlobal { block: 3 },
            StageKind::LwGlobal { block: 4 },
        ]
    );
    // Stage 1 is SegProp's: embed, blocks 0..2, LL(1) = block 4 and the head.
    let m = &trainer.model;
    let mut stage1 = ids(ParamIds::of(&m.embed_tokens));
    for b in [0, 1, 4] {
        stage1.extend(ids(ParamIds::of(&m.blocks[b])));
    }
    stage1.extend(ids(ParamIds::of(&m.head)));
    assert_eq!(grads_of_next(&mut trainer), stage1);
    let mut recorder = RecordingObserver::default();
    segprop::run_next_stage(&mut trainer, &mut recorder).unwrap();
    let head_after_stage1 = parameter_values(&trainer.model.head);

    for block in 2..5 {
        // Block i and the model's head, nothing else: no decoder blocks above it.
        let mut expected = ids(ParamIds::of(&trainer.model.blocks[block]));
        let head = ids(ParamIds::of(&trainer.model.head));
        expected.extend(head.iter().copied());
        assert_eq!(grads_of_next(&mut trainer), expected, "lw-block-{block}");
        segprop::run_next_stage(&mut trainer, &mut recorder).unwrap();
        assert_eq!(trainer.committed_depth, block + 1);
        // The same head parameters, trained on (never replaced by a fresh head).
        assert_eq!(ids(ParamIds::of(&trainer.model.head)), head);
    }
    assert_ne!(parameter_values(&trainer.model.head), head_after_stage1);
    // The head's AdamW state was carried across the blocks (one persistent optimizer).
    assert!(trainer.head_optimizer.is_some());
    // The last block's network is the whole model: its held-out loss is the model's.
    let last = trainer.progress.records.last().unwrap().eval_loss;
    let whole = trainer.evaluate_full_model();
    assert!((last - whole).abs() < 1e-5, "{last} vs {whole}");
}

#[test]
fn the_final_head_stage_trains_a_fresh_head_alone_on_the_frozen_network() {
    let spec = spec(
        "{ exit: { max_steps: 2 }, final_head: { max_steps: 4 } }",
        "",
    );
    let dir = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::<B>::new(spec, Default::default(), dir.path()).unwrap();
    assert_eq!(trainer.plan.stages.len(), 6);
    assert_eq!(trainer.plan.stages[5].name, "lw-head");
    let mut recorder = RecordingObserver::default();
    for _ in 0..5 {
        segprop::run_next_stage(&mut trainer, &mut recorder).unwrap();
    }
    let blocks_before = parameter_values(&trainer.model.blocks[..].to_vec());
    let fresh = parameter_values(&trainer.fresh_local_head());
    assert_ne!(parameter_values(&trainer.model.head), fresh);
    // The stage's route: S[5] → head. Only the head gets gradients.
    let entry = trainer.plan.stages[5].clone();
    let route = trainer.route(&entry);
    let batch = trainer.data.train[0].clone();
    let grads: HashSet<ParamId> = trainer
        .gradient_param_ids(route, &batch)
        .into_iter()
        .collect();
    assert_eq!(grads, ids(ParamIds::of(&trainer.model.head)));
    let record = segprop::run_next_stage(&mut trainer, &mut recorder)
        .unwrap()
        .unwrap();
    assert_eq!(record.stage, "lw-head");
    assert_eq!(record.steps, 4);
    // Blocks untouched; the head moved away from the fresh initialisation it started from.
    assert_eq!(
        parameter_values(&trainer.model.blocks[..].to_vec()),
        blocks_before
    );
    assert_ne!(parameter_values(&trainer.model.head), fresh);
    let whole = trainer.evaluate_full_model();
    assert!((record.eval_loss - whole).abs() < 1e-5);
}

#[test]
fn local_heads_refuses_base_prefix_fields() {
    let text = "version: 1\nname: t\nmodel: { preset: tiny }\n\
                data: { corpus: builtin:synthetic, seq_len: 16, batch_size: 2 }\n\
                regime: lw\nlw: { base_depth: 2 }\n";
    let err = JobSpec::from_yaml_str(text, "t.yaml")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lw.base_depth") && err.contains("base_prefix"),
        "{err}"
    );
}

/// A task whose right choice is a piece of the training text and whose wrong one is bytes the
/// corpus never has: any trained model must prefer the text.
fn task_file(dir: &std::path::Path, corpus: &str) -> std::path::PathBuf {
    let words: Vec<&str> = corpus.split_whitespace().collect();
    let mut lines = String::new();
    for i in 0..20 {
        let context = words[i * 7..i * 7 + 4].join(" ");
        let right = format!(" {}", words[i * 7 + 4]);
        let wrong: String = std::iter::once(' ')
            .chain(std::iter::repeat_n('~', right.len() - 1))
            .collect();
        let (choices, gold) = if i % 2 == 0 {
            (vec![right, wrong], 0)
        } else {
            (vec![wrong, right], 1)
        };
        let example = serde_json::json!({ "context": context, "choices": choices, "gold": gold });
        lines.push_str(&format!("{example}\n"));
    }
    let path = dir.join("learned.jsonl");
    std::fs::write(&path, lines).unwrap();
    path
}

#[test]
fn tasks_are_scored_after_every_stage_and_on_the_exported_model() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = segprop_train::data::synthetic_corpus(8000, 4);
    let path = task_file(dir.path(), &corpus);
    let spec = spec(
        "{}",
        "e2e: { exit: { max_steps: 40 } }\n\
         segprop: { base_depth: 2, head_layers: 1, exit: { stage1: { max_steps: 20 }, segment: { max_steps: 10 } } }\n",
    );
    for regime in ["e2e", "segprop"] {
        let mut spec = spec.clone();
        spec.regime = match regime {
            "e2e" => segprop_core::Regime::E2e,
            _ => segprop_core::Regime::Segprop,
        };
        spec.eval.tasks = vec![segprop_core::TaskSpec {
            name: None,
            path: path.display().to_string(),
            shots: 1,
            max_examples: 16,
        }];
        let out = dir.path().join(regime);
        let summary = run_job::<B>(
            spec,
            Default::default(),
            &RunOptions::new(&out),
            &mut RecordingObserver::default(),
        )
        .unwrap();
        for stage in &summary.stages {
            let t = &stage.tasks[0];
            assert_eq!((t.task.as_str(), t.examples, t.shots), ("learned", 16, 1));
            assert_eq!(t.chance, 0.5);
        }
        let last = &summary.stages.last().unwrap().tasks[0];
        let exported = &summary.tasks[0];
        assert_eq!(exported.acc, 1.0, "{regime}: {exported:?}");
        assert_eq!(exported.acc_norm, 1.0);
        if regime == "e2e" {
            // The only stage's network is the exported model.
            assert_eq!(last, exported);
        }
        let table = std::fs::read_to_string(out.join("summary.txt")).unwrap();
        assert!(
            table.contains("task acc") && table.contains("final model"),
            "{table}"
        );
    }
}
