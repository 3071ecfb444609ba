//! The planner against measurement on the CPU engine (issue 6, docs/planner.md "Validation"):
//! the predicted peak heap of one step of e2e, SegProp stage 1 and a stage-2 segment (with and
//! without SnapCheck) is within 10% of the peak a counting allocator measures, whole batches and
//! batches in passes of `data.micro_batch`, and the predicted matmul FLOPs equal the FLOPs the
//! model launched.
//!
//! One test per binary: the allocator's counters are process-wide.

use segprop_train::alloc::CountingAllocator;
use segprop_train::probe;

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

#[test]
fn planner_predicts_peak_memory_and_flops_of_tiny_and_small() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rows = Vec::new();
    for (preset, b, m, s) in [
        ("tiny", 4, 4, 64),
        ("tiny", 8, 8, 128),
        ("small", 2, 2, 128),
        ("tiny", 8, 2, 128),
    ] {
        let cases = probe::validate_planner(preset, (2, 2, 2), (b, m), s, dir.path())
            .unwrap_or_else(|e| panic!("{preset}: {e}"));
        assert_eq!(
            cases.len(),
            4,
            "e2e, stage 1, segment with and without SnapCheck"
        );
        rows.extend(cases);
    }
    for row in &rows {
        let what = format!(
            "{} {} at {} (passes of {}) x {}",
            row.preset, row.workload, row.batch, row.micro_batch, row.seq_len
        );
        assert!(row.measured.peak_bytes > 0, "{what}: nothing measured");
        assert!(
            row.memory_error().abs() <= 0.10,
            "{what}: predicted {} bytes, measured {} ({:+.1}%)",
            row.predicted.peak(),
            row.measured.peak_bytes,
            100.0 * row.memory_error()
        );
        // The formulas count exactly the matmuls the model launches.
        assert_eq!(
            row.measured.forward_flops as f64, row.predicted_forward_flops,
            "{what}: forward FLOPs"
        );
        assert_eq!(
            row.measured.backward_flops as f64, row.predicted_backward_flops,
            "{what}: backward FLOPs"
        );
    }
    // A batch in passes holds a pass's activations (plus the accumulated gradients): the same
    // 8 x 128 batch of tiny peaks far lower in passes of 2, as predicted.
    let tiny = |m: usize| -> Vec<_> {
        rows.iter()
            .filter(|r| r.preset == "tiny" && r.batch == 8 && r.micro_batch == m)
            .collect()
    };
    for (whole, passes) in tiny(8).iter().zip(tiny(2)) {
        assert_eq!(whole.workload, passes.workload);
        assert!(
            2 * passes.measured.peak_bytes < whole.measured.peak_bytes,
            "{}: {} bytes in passes of 2 vs {} whole",
            whole.workload,
            passes.measured.peak_bytes,
            whole.measured.peak_bytes
        );
        assert!(passes.predicted.peak() < whole.predicted.peak());
    }
    // The cases differ in what the planner says they should: a segment holds less than e2e,
    // and without SnapCheck it launches the prefix's forward on top.
    let small: Vec<_> = rows.iter().filter(|r| r.preset == "small").collect();
    assert!(small[2].measured.peak_bytes < small[0].measured.peak_bytes);
    assert!(small[3].measured.forward_flops > small[2].measured.forward_flops);
    assert_eq!(
        small[3].measured.backward_flops,
        small[2].measured.backward_flops
    );
}
