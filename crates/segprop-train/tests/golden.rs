//! Guards against silent changes of the engine's numerics: the first 20 optimizer steps of the
//! tiny segprop job (stage 1, then two segments) must reproduce a recorded loss curve.
//!
//! If a change is intended (new init, new data order, a numerics fix), regenerate with
//! `SEGPROP_PRINT_GOLDEN=1 cargo test -p segprop-train --test golden -- --nocapture` and say why
//! in the commit message.

#![allow(clippy::unwrap_used)]

use segprop_core::JobSpec;
use segprop_train::metrics::RecordingObserver;
use segprop_train::{CpuBackend, RunOptions, run_job};

const SPEC: &str = "
version: 1
name: golden
model: { preset: tiny, overrides: { num_layers: 6 } }
data: { corpus: builtin:synthetic, seq_len: 32, batch_size: 8, synthetic_tokens: 40000 }
regime: segprop
segprop:
  base_depth: 2
  head_layers: 2
  exit: { stage1: { max_steps: 10 }, segment: { max_steps: 5 } }
optimizer: { lr: 3.0e-3, grad_clip: 1.0, schedule: { warmup_ratio: 0.1, decay: linear } }
eval: { every_steps: 5, max_batches: 2 }
seed: 17
";

const GOLDEN: [f64; 20] = [
    5.54265, 5.26797, 5.01911, 4.76748, 4.58926, 4.44488, 4.32122, 4.22418, 4.15157, 4.10253,
    4.10667, 3.91878, 3.7313, 3.61782, 3.57602, 3.55113, 3.44661, 3.40297, 3.30862, 3.29144,
];

#[test]
fn tiny_segprop_job_reproduces_its_golden_loss_curve() {
    let spec = JobSpec::from_yaml_str(SPEC, "golden.yaml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut recorder = RecordingObserver::default();
    run_job::<CpuBackend>(
        spec,
        Default::default(),
        &RunOptions::new(dir.path()),
        &mut recorder,
    )
    .unwrap();
    let losses: Vec<f64> = recorder.steps().iter().map(|s| s.loss).collect();
    assert_eq!(losses.len(), 20);
    if std::env::var_os("SEGPROP_PRINT_GOLDEN").is_some() {
        println!("{losses:?}");
    }
    for (step, (got, want)) in losses.iter().zip(GOLDEN).enumerate() {
        assert!(
            (got - want).abs() <= 1e-4 * want.abs().max(1.0),
            "step {}: loss {got} differs from golden {want}",
            step + 1
        );
    }
}
