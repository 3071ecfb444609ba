//! `eval.keep_best` (Hugging Face's `load_best_model_at_end`): each stage ends with the model of
//! its best evaluation, which is what it commits, hands on and exports.

#![allow(clippy::unwrap_used)]

use segprop_core::JobSpec;
use segprop_train::metrics::{RecordingObserver, TrainEvent};
use segprop_train::{CpuBackend, RunOptions, RunSummary, run_job};

/// A learning rate high enough that the held-out loss rises again within a stage, evaluated
/// after every step.
fn spec(regime: &str, keep_best: bool) -> String {
    format!(
        "
version: 1
name: best
model: {{ preset: tiny, overrides: {{ num_layers: 5 }} }}
data: {{ corpus: builtin:synthetic, seq_len: 16, batch_size: 4, synthetic_tokens: 6000, eval_fraction: 0.1 }}
regime: {regime}
segprop:
  base_depth: 2
  head_layers: 1
  exit: {{ stage1: {{ max_steps: 10 }}, segment: {{ max_steps: 10 }} }}
e2e: {{ exit: {{ max_steps: 14 }} }}
optimizer: {{ lr: 6.0e-2 }}
eval: {{ every_steps: 1, max_batches: 2, keep_best: {keep_best} }}
seed: 3
"
    )
}

fn run(regime: &str, keep_best: bool) -> (RunSummary, RecordingObserver) {
    let spec = JobSpec::from_yaml_str(&spec(regime, keep_best), "best.yaml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut recorder = RecordingObserver::default();
    let summary = run_job::<CpuBackend>(
        spec,
        Default::default(),
        &RunOptions::new(dir.path()),
        &mut recorder,
    )
    .unwrap();
    (summary, recorder)
}

/// Each stage's evaluations, `(step, loss)`, in order.
fn evals(recorder: &RecordingObserver, stage: &str) -> Vec<(u64, f64)> {
    recorder
        .events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Eval(r) if r.stage == stage => Some((r.step, r.eval_loss)),
            _ => None,
        })
        .collect()
}

fn check(regime: &str) {
    let (summary, recorder) = run(regime, true);
    let mut kept_earlier = 0;
    for stage in &summary.stages {
        let evals = evals(&recorder, &stage.stage);
        assert_eq!(evals.len() as u64, stage.steps, "one evaluation per step");
        let (best_step, best_loss) = evals
            .iter()
            .copied()
            .fold((0, f64::INFINITY), |b, e| if e.1 < b.1 { e } else { b });
        assert_eq!(
            stage.eval_loss, best_loss,
            "{}: the best evaluation",
            stage.stage
        );
        if best_step < stage.steps {
            assert_eq!(stage.best_step, Some(best_step), "{}", stage.stage);
            kept_earlier += 1;
        } else {
            assert_eq!(stage.best_step, None, "{}", stage.stage);
        }
    }
    assert!(
        kept_earlier > 0,
        "the test's learning rate must make some stage end worse than its best"
    );
    // The exported model is the last stage's kept one (the last stage's route runs every
    // block): its held-out loss is that stage's best.
    let last = summary.stages.last().unwrap();
    assert!(
        (summary.final_eval_loss - last.eval_loss).abs() < 1e-6 * last.eval_loss,
        "exported {} against the last stage's best {}",
        summary.final_eval_loss,
        last.eval_loss
    );

    let (plain, recorder) = run(regime, false);
    for stage in &plain.stages {
        let last = *evals(&recorder, &stage.stage).last().unwrap();
        assert_eq!((stage.steps, stage.eval_loss), last);
        assert_eq!(stage.best_step, None);
    }
    if let ([kept], [ended]) = (summary.stages.as_slice(), plain.stages.as_slice()) {
        assert!(kept.eval_loss < ended.eval_loss);
    }
}

#[test]
fn an_e2e_stage_ends_with_its_best_model() {
    check("e2e");
}

#[test]
fn every_segprop_stage_ends_with_its_best_model() {
    check("segprop");
}
