//! Where a job's artifacts and snapshots live in a store, defined once for the coordinator and
//! the workers:
//!
//! ```text
//! jobs/<job>/                                          job_dir
//!   stages/<task:03>/attempt-<epoch>/                  attempt_dir: one attempt of a task
//!     ckpt-<step:08>/  ckpt-<step:08>.events.jsonl     checkpoint_key, events_key
//!     state/  metrics.jsonl                            stage_state, stage_metrics
//!   snapshots/depth-<d:03>/<split>-<first>-<last>.safetensors
//!                                                      snapshots_dir (each blob's key: snapshot_key)
//!   model/  metrics.jsonl  summary.json  summary.txt  loss.svg     the export
//! ```
//!
//! Every artifact (a file or a directory) has its manifest beside it (`<key>.manifest`).

/// The directory of job `job_id`.
pub fn job_dir(job_id: &str) -> String {
    format!("jobs/{job_id}")
}

/// The directory of attempt `epoch` of task `task_index` of the job in `job_dir`.
pub fn attempt_dir(job_dir: &str, task_index: u32, epoch: u64) -> String {
    format!(
        "{}/stages/{task_index:03}/attempt-{epoch}",
        job_dir.trim_end_matches('/')
    )
}

/// The name of the mid-stage checkpoint after `step` steps of a stage.
pub fn checkpoint_name(step: u64) -> String {
    format!("ckpt-{step:08}")
}

/// The key of the mid-stage checkpoint after `step` steps, in `attempt_dir`.
pub fn checkpoint_key(attempt_dir: &str, step: u64) -> String {
    format!(
        "{}/{}",
        attempt_dir.trim_end_matches('/'),
        checkpoint_name(step)
    )
}

/// The step of a checkpoint key `…/ckpt-<step>` (`None` for anything else, its events file
/// included).
pub fn checkpoint_step(key: &str) -> Option<u64> {
    let name = key.rsplit('/').next()?;
    let digits = name.strip_prefix("ckpt-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The key of the engine events stored with the checkpoint `checkpoint_key` (what the stage
/// reported up to it).
pub fn events_key(checkpoint_key: &str) -> String {
    format!("{checkpoint_key}{EVENTS_SUFFIX}")
}

/// What [`events_key`] appends to a checkpoint's key.
pub const EVENTS_SUFFIX: &str = ".events.jsonl";

/// The state a stage's attempt leaves for the next task.
pub fn stage_state(attempt_dir: &str) -> String {
    format!("{}/state", attempt_dir.trim_end_matches('/'))
}

/// The events of a stage's attempt, one per line.
pub fn stage_metrics(attempt_dir: &str) -> String {
    format!("{}/metrics.jsonl", attempt_dir.trim_end_matches('/'))
}

/// The directory of the job's SnapCheck snapshots, every depth.
pub fn snapshots_dir(job_dir: &str) -> String {
    format!("{}/snapshots", job_dir.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compose_and_checkpoint_steps_parse_back() {
        let job = job_dir("j1");
        let attempt = attempt_dir(&job, 2, 1);
        assert_eq!(attempt, "jobs/j1/stages/002/attempt-1");
        let ckpt = checkpoint_key(&attempt, 40);
        assert_eq!(ckpt, "jobs/j1/stages/002/attempt-1/ckpt-00000040");
        assert_eq!(checkpoint_step(&ckpt), Some(40));
        assert_eq!(checkpoint_step("ckpt-7"), Some(7));
        assert_eq!(checkpoint_step(&events_key(&ckpt)), None);
        assert_eq!(checkpoint_step(&stage_state(&attempt)), None);
        assert_eq!(checkpoint_step("jobs/j/ckpt-"), None);
        assert_eq!(
            stage_metrics(&attempt),
            "jobs/j1/stages/002/attempt-1/metrics.jsonl"
        );
        assert_eq!(snapshots_dir("jobs/j1/"), "jobs/j1/snapshots");
    }
}
