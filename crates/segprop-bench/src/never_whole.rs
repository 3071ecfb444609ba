//! `never-whole`: the peak heap of a whole sharded SegProp job (HF import, every stage with its
//! commit and SnapCheck advance, mid-stage checkpoints, the export) on 2 and 4 CPU ranks, with
//! the model kept sharded between stages against the engine's previous layout (each rank holds
//! the model whole between stages), beside what the ranks account for and the planner's
//! prediction ([`segprop_train::peak`]), and the same job as a worker daemon runs it (a gang per
//! task, sharded stage states between them). Each layout runs `reps` times; the highest peak is
//! reported (rank threads on few cores do not always peak together).

use anyhow::Result;
use segprop_train::peak::{JobPeak, Layout, job_peak, write_model};

pub fn never_whole(reps: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_model(&dir.path().join("hf"))?;
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "never-whole: peak heap of a whole SegProp job (4 blocks, hidden 256, vocab 4096: {:.1} MB \
         of f32 weights), highest of {reps} runs",
        mb(segprop_train::peak::job_model().num_params() * 4)
    );
    println!(
        "{:>5}  {:>13}  {:>13}  {:>12}  {:>7}  {:>13}  {:>10}  {:>13}  {:>9}",
        "ranks",
        "whole (MB)",
        "sharded (MB)",
        "tasks (MB)",
        "ratio",
        "accounted",
        "peak/acct",
        "planner",
        "error"
    );
    for world in [2, 4] {
        let highest = |layout| -> Result<JobPeak> {
            let mut best: Option<JobPeak> = None;
            for _ in 0..reps.max(1) {
                let p = job_peak(world, layout, dir.path())?;
                if best.as_ref().is_none_or(|b| p.peak_bytes > b.peak_bytes) {
                    best = Some(p);
                }
            }
            Ok(best.expect("at least one run"))
        };
        let whole = highest(Layout::Whole)?;
        let sharded = highest(Layout::NeverWhole)?;
        let tasks = highest(Layout::StageTasks)?;
        println!(
            "{world:>5}  {:>13.1}  {:>13.1}  {:>12.1}  {:>6.2}x  {:>13.1}  {:>10.3}  {:>13.1}  {:>+8.1}%",
            mb(whole.peak_bytes),
            mb(sharded.peak_bytes),
            mb(tasks.peak_bytes),
            whole.peak_bytes as f64 / sharded.peak_bytes as f64,
            mb(sharded.accounted_bytes),
            sharded.peak_bytes as f64 / sharded.accounted_bytes as f64,
            mb(sharded.predicted_bytes),
            100.0 * (sharded.predicted_bytes as f64 / sharded.peak_bytes as f64 - 1.0),
        );
    }
    Ok(())
}
