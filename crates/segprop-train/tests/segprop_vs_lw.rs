//! On the synthetic corpus, at equal optimizer steps, SegProp reaches a clearly lower held-out
//! loss than the layer-wise baseline (the papers' central claim, at toy scale). e2e is run too,
//! as the reference point.

#![allow(clippy::unwrap_used)]

use segprop_core::JobSpec;
use segprop_train::metrics::RecordingObserver;
use segprop_train::{CpuBackend, RunOptions, run_job};

const COMMON: &str = "
version: 1
model: { preset: tiny }
data: { corpus: builtin:synthetic, seq_len: 32, batch_size: 8, synthetic_tokens: 60000 }
optimizer: { lr: 3.0e-3, betas: [0.9, 0.95], schedule: { warmup_ratio: 0.05, decay: cosine, min_lr_ratio: 0.1 } }
eval: { every_steps: 1000, max_batches: 6 }
seed: 23
";

fn final_eval_loss(regime_yaml: &str, name: &str) -> (f64, u64) {
    let text = format!("{COMMON}name: {name}\n{regime_yaml}");
    let spec = JobSpec::from_yaml_str(&text, name).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let summary = run_job::<CpuBackend>(
        spec,
        Default::default(),
        &RunOptions::new(dir.path()),
        &mut RecordingObserver::default(),
    )
    .unwrap();
    (summary.final_eval_loss, summary.total_steps)
}

#[test]
fn segprop_beats_layer_wise_at_equal_steps() {
    // 8 blocks: stage 1 (40 steps) + 4 segments x 20 = 120 steps; lw: 8 blocks x 15 = 120 steps.
    let (segprop, s_steps) = final_eval_loss(
        "regime: segprop\nsegprop: { base_depth: 2, head_layers: 2, exit: { stage1: { max_steps: 40 }, segment: { max_steps: 20 } } }\n",
        "segprop",
    );
    let (lw, l_steps) = final_eval_loss("regime: lw\nlw: { exit: { max_steps: 15 } }\n", "lw");
    let (e2e, e_steps) = final_eval_loss("regime: e2e\ne2e: { exit: { max_steps: 120 } }\n", "e2e");
    assert_eq!((s_steps, l_steps, e_steps), (120, 120, 120));
    println!("held-out loss at 120 steps: segprop {segprop:.4}, lw {lw:.4}, e2e {e2e:.4}");
    assert!(
        segprop < lw - MARGIN,
        "segprop {segprop:.4} is not clearly below lw {lw:.4}"
    );
}

/// Observed on this job (seed 23): segprop 2.685, lw 3.416, e2e 2.724, a margin of 0.73 nats.
/// The assertion uses a conservative 0.3.
const MARGIN: f64 = 0.3;
