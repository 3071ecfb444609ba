//! `segprop-bench planner`: the planner's CPU predictions against measurement (docs/planner.md,
//! "Validation"): peak heap of one step (counting allocator) and matmul FLOPs launched.

use anyhow::Result;
use segprop_core::StageKind;
use segprop_train::alloc;
use segprop_train::probe;

use crate::spec;

/// Raw probes over the calibration grid of `CpuProfile::FLEX_F32` (one dimension varied at a
/// time, then the vocabulary at several widths): peaks of the backward and update phases, and
/// the matmul FLOPs launched.
pub fn explore() -> Result<()> {
    println!(
        "| layers | h | i | heads | b | s | V | stage | P_all | resident | backward peak | update peak | fwd FLOP | bwd FLOP |"
    );
    for (layers, h, i, heads, b, s, v) in [
        (4, 64, 192, 4, 2, 32, 256),
        (8, 64, 192, 4, 2, 32, 256),
        (4, 64, 192, 4, 4, 32, 256),
        (4, 64, 192, 4, 2, 64, 256),
        (4, 128, 192, 4, 2, 32, 256),
        (4, 64, 384, 4, 2, 32, 256),
        (4, 64, 192, 8, 2, 32, 256),
        (4, 64, 192, 4, 2, 32, 2048),
        (4, 64, 192, 4, 2, 32, 16384),
        (4, 64, 192, 4, 4, 32, 16384),
        (4, 256, 768, 4, 2, 32, 16384),
        (4, 640, 1728, 10, 2, 32, 4096),
        (4, 640, 1728, 10, 4, 32, 4096),
    ] {
        let model = format!(
            "{{ preset: tiny, overrides: {{ hidden_size: {h}, intermediate_size: {i}, num_layers: {layers}, num_heads: {heads}, num_kv_heads: {}, vocab_size: {v} }} }}",
            heads / 2
        );
        let data = format!(
            "{{ corpus: builtin:synthetic, seq_len: {s}, batch_size: {b}, synthetic_tokens: 20000 }}"
        );
        for (kind, regime) in [
            (StageKind::E2e, "regime: e2e".to_string()),
            (StageKind::Segment { start: 2, end: 3 }, "regime: segprop\nsegprop: { base_depth: 2, head_layers: 1, snapcheck: false }".to_string()),
            (StageKind::Segment { start: 2, end: 3 }, "regime: segprop\nsegprop: { base_depth: 2, head_layers: 1, snapcheck: true, snapcheck_memory_bytes: 0 }".to_string()),
        ] {
            let dir = tempfile::tempdir()?;
            let sp = spec(&model, &data, &regime)?;
            let config = sp.resolve_model_config()?;
            let p = probe::step(sp, kind, 2, dir.path())?;
            println!(
                "| {layers} | {h} | {i} | {heads} | {b} | {s} | {v} | {} | {} | {} | {} | {} | {} | {} |",
                kind.name(), config.num_params(), p.resident_bytes, p.backward_peak_bytes, p.update_peak_bytes, p.forward_flops, p.backward_flops
            );
        }
    }
    Ok(())
}

/// Predicted vs measured peak heap and matmul FLOPs of one step, `tiny` and `small` presets.
pub fn validate() -> Result<()> {
    println!("## Planner vs measurement, CPU engine (one step after warmup, p = r = k = 2)");
    println!(
        "| preset | workload | b (passes of) x s | predicted MiB (backward / update) | measured MiB (backward / update) | error | predicted GFLOP | launched GFLOP | error |"
    );
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|");
    anyhow::ensure!(
        alloc::current_bytes().is_some(),
        "the counting allocator is not installed"
    );
    let mut worst: f64 = 0.0;
    for (preset, b, m, s) in [
        ("tiny", 4, 4, 64),
        ("tiny", 8, 8, 128),
        ("small", 2, 2, 128),
        ("tiny", 8, 2, 128),
        ("small", 4, 2, 128),
    ] {
        let dir = tempfile::tempdir()?;
        for row in probe::validate_planner(preset, (2, 2, 2), (b, m), s, dir.path())? {
            let mib = |x: u64| x as f64 / (1 << 20) as f64;
            let gflop = |x: f64| x / 1e9;
            worst = worst.max(row.memory_error().abs());
            println!(
                "| {preset} | {} | {b} ({m}) x {s} | {:.1} ({:.1} / {:.1}) | {:.1} ({:.1} / {:.1}) | {:+.1}% | {:.3} | {:.3} | {:+.2}% |",
                row.workload,
                mib(row.predicted.peak()),
                mib(row.predicted.backward_peak()),
                mib(row.predicted.update_peak()),
                mib(row.measured.peak_bytes),
                mib(row.measured.backward_peak_bytes),
                mib(row.measured.update_peak_bytes),
                100.0 * row.memory_error(),
                gflop(row.predicted_forward_flops + row.predicted_backward_flops),
                gflop((row.measured.forward_flops + row.measured.backward_flops) as f64),
                100.0 * row.flops_error(),
            );
        }
    }
    println!(
        "worst peak-memory error: {:.1}% (target: within 10%)",
        100.0 * worst
    );
    Ok(())
}
