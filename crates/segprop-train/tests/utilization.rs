//! Step records carry the TFLOP/s the step achieved and its MFU: the FLOPs are the matmuls the
//! model launched, which for an e2e step must come to 3 x (2 x matmul weights + 4 x layers x seq
//! x hidden) per token (forward, then a gradient for each operand), as the planner prices it.

#![allow(clippy::unwrap_used)]

use segprop_core::JobSpec;
use segprop_train::metrics::RecordingObserver;
use segprop_train::{CpuBackend, RunOptions, run_job};

const SPEC: &str = "
version: 1
name: utilization
model: { preset: tiny, overrides: { num_layers: 3 } }
data: { corpus: builtin:synthetic, seq_len: 64, batch_size: 8, synthetic_tokens: 20000 }
regime: e2e
e2e: { exit: { max_steps: 6 } }
optimizer: { lr: 1.0e-3 }
eval: { every_steps: 1000, max_batches: 1 }
seed: 3
";

#[test]
fn step_records_carry_the_flops_the_model_launched_and_their_mfu() {
    let spec = JobSpec::from_yaml_str(SPEC, "utilization.yaml").unwrap();
    let config = segprop_core::LlamaConfig::preset("tiny").unwrap();
    let (layers, seq, hidden) = (3u64, 64u64, config.hidden_size as u64);
    let matmul_weights =
        layers * (config.block_params() - 2 * hidden) + (config.vocab_size as u64) * hidden;
    let per_token = 3.0 * (2.0 * matmul_weights as f64 + 4.0 * (layers * seq * hidden) as f64);

    let dir = tempfile::tempdir().unwrap();
    let mut recorder = RecordingObserver::default();
    let summary = run_job::<CpuBackend>(
        spec,
        Default::default(),
        &RunOptions::new(dir.path()),
        &mut recorder,
    )
    .unwrap();
    let steps = recorder.steps();
    assert_eq!(steps.len(), 6);
    for s in &steps {
        assert!(s.tflops > 0.0 && s.mfu > 0.0 && s.mfu < 2.0, "{s:?}");
        // The meter's window and tokens/s's differ by a few instructions around the step.
        let launched_per_token = s.tflops * 1e12 / s.tokens_per_s;
        let error = launched_per_token / per_token - 1.0;
        assert!(
            error.abs() < 0.05,
            "step {}: {launched_per_token} FLOPs/token vs {per_token}",
            s.step
        );
        assert!(
            (s.tflops / s.mfu - steps[0].tflops / steps[0].mfu).abs() < 1e-6 * s.tflops / s.mfu
        );
    }
    let stage = &summary.stages[0];
    assert!(stage.tflops > 0.0 && stage.mfu > 0.0, "{stage:?}");
}
