//! The planner against measurement on the CPU engine (issue 6, docs/planner.md "Validation"):
//! the predicted peak heap of one step of e2e, SegProp stage 1 and a stage-2 segment (with and
//! without SnapCheck) is within 10% of the peak a counting allocator measures, and the predicted
//! matmul FLOPs equal the FLOPs the model launched.
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
    for (preset, b, s) in [("tiny", 4, 64), ("tiny", 8, 128), ("small", 2, 128)] {
        let cases = probe::validate_planner(preset, (2, 2, 2), b, s, dir.path())
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
            "{} {} at {} x {}",
            row.preset, row.workload, row.micro_batch, row.seq_len
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
