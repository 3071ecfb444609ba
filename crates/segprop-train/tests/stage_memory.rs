//! What a stage record says about memory: the training peak leaves out the SnapCheck cache.
//!
//! The same SegProp job twice, its snapshots kept in memory and spilled to disk (budget 0). The
//! stage-2 segments' training peaks must agree (the cache is not training memory), while the
//! whole-heap peak of the in-memory run carries the cache on top. Before, the summary showed one
//! "peak MiB" with the cache in it, which read as SegProp needing several times e2e's memory.
//!
//! One test per binary: the allocator's counters are process-wide.

#![allow(clippy::unwrap_used)]

use segprop_core::JobSpec;
use segprop_train::alloc::CountingAllocator;
use segprop_train::metrics::{NullObserver, RunSummary, summary_table};
use segprop_train::{CpuBackend, RunOptions, run_job};

#[global_allocator]
static ALLOC: CountingAllocator = CountingAllocator;

fn run(budget: &str) -> RunSummary {
    let spec = format!(
        "version: 1
name: stage-memory
model: {{ preset: tiny, overrides: {{ num_layers: 4 }} }}
data: {{ corpus: builtin:synthetic, seq_len: 128, batch_size: 16, synthetic_tokens: 200000 }}
regime: segprop
segprop:
  base_depth: 1
  head_layers: 1
  snapcheck: true
  snapcheck_memory_bytes: {budget}
  exit: {{ stage1: {{ max_steps: 2 }}, segment: {{ max_steps: 24 }} }}
optimizer: {{ lr: 1.0e-3 }}
eval: {{ every_steps: 1000, max_batches: 2 }}
seed: 5
"
    );
    let spec = JobSpec::from_yaml_str(&spec, "stage-memory.yaml").unwrap();
    let dir = tempfile::tempdir().unwrap();
    run_job::<CpuBackend>(
        spec,
        Default::default(),
        &RunOptions::new(dir.path()),
        &mut NullObserver,
    )
    .unwrap()
}

#[test]
fn the_training_peak_leaves_out_the_snapcheck_cache() {
    let in_memory = run("1000000000");
    let spilled = run("0");
    println!("{}", summary_table(&in_memory));
    println!("{}", summary_table(&spilled));
    let segments = in_memory.stages.iter().zip(&spilled.stages).skip(1);
    let mut checked = 0;
    for (mem, disk) in segments {
        let cache = mem.snapshots.as_ref().unwrap();
        let spill = disk.snapshots.as_ref().unwrap();
        assert!(
            cache.memory_bytes > 0 && cache.disk_bytes == 0,
            "{}: {cache:?}",
            mem.stage
        );
        assert!(
            spill.memory_bytes == 0 && spill.disk_bytes > 0,
            "{}: {spill:?}",
            disk.stage
        );
        let (peak, training) = (mem.peak_bytes.unwrap(), mem.training_peak_bytes.unwrap());
        let disk_training = disk.training_peak_bytes.unwrap();
        assert!(training <= peak, "{}", mem.stage);
        assert!(
            peak >= disk_training + cache.memory_bytes / 2,
            "{}: whole peak {peak} should carry the cache {} over training {disk_training}",
            mem.stage,
            cache.memory_bytes
        );
        println!(
            "{}: whole peak {peak}, training {training} (spilled: {disk_training}), cache {}",
            mem.stage, cache.memory_bytes
        );
        let diff = training.abs_diff(disk_training) as f64 / disk_training as f64;
        assert!(
            diff < 0.1,
            "{}: training peak {training} in memory vs {disk_training} spilled ({:.0}% apart)",
            mem.stage,
            100.0 * diff
        );
        checked += 1;
    }
    assert_eq!(
        checked, 2,
        "stage-2 segments of a 4-block job with p = 1, r = 1"
    );
}
