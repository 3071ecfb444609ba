//! Sharded stages on a worker (issue "sharding layer"): a worker offering two CPU ranks
//! (`--devices 2`) runs a `full_shard` job as a gang of two trainers joined by a collective with
//! a deadline. One rank stops participating mid-stage (fault injection): the other fails the
//! attempt within the deadline, naming the rank and the collective, nothing hangs, the
//! coordinator retries the stage from its last checkpoint, and the job ends with the model of an
//! undisturbed sharded run.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use segprop_proto::v1 as pb;

fn gang_spec(dir: &Path, name: &str) -> PathBuf {
    let text = format!(
        "version: 1
name: {name}
model: {{ preset: tiny, overrides: {{ num_layers: 3 }} }}
data: {{ corpus: builtin:synthetic, seq_len: 32, batch_size: 4, eval_fraction: 0.05, synthetic_tokens: 20000 }}
regime: segprop
segprop:
  base_depth: 1
  head_layers: 1
  segment_size: 1
  exit: {{ stage1: {{ max_steps: 8 }}, segment: {{ max_steps: 6 }} }}
optimizer: {{ lr: 3.0e-3, grad_accum: 2, grad_clip: 1.0 }}
eval: {{ every_steps: 4, max_batches: 2 }}
checkpoint: {{ every_steps: 3 }}
resources: {{ devices_per_gang: 2 }}
sharding: {{ strategy: full_shard, offload: cpu, collective_timeout_s: 3 }}
activation_checkpointing: true
seed: 7
"
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_stalled_rank_fails_the_attempt_within_the_deadline_and_the_retry_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let job_spec = gang_spec(dir, "gang");
    let coord = coordinator(dir, "127.0.0.1:0");
    let marker = dir.join("stalled");
    // Rank 1 stops after its 5th step of stage 1; the checkpoint at step 3 was stored.
    let fault = format!("1:5:{}", marker.display());
    let _w = worker_with_env(
        dir,
        &coord,
        "gang-worker",
        &["--devices", "2"],
        &[("SEGPROP_FAULT_STALL_RANK", fault.as_str())],
    );
    let job_id = submit(&coord, &job_spec);
    let started = Instant::now();
    let job = wait_for(
        &coord,
        &job_id,
        Duration::from_secs(240),
        "the job to end",
        finished,
    );
    assert_eq!(state(&job), pb::JobState::Succeeded, "{job:#?}");
    assert!(marker.is_file(), "the fault fired");
    let stage1 = &job.tasks[0];
    assert_eq!(stage1.attempts, 2, "stage 1 was retried once: {stage1:#?}");
    // The watchdog named the silent rank and the collective; the retry resumed from step 3.
    let log = strip_ansi(&std::fs::read_to_string(dir.join("gang-worker.log")).unwrap());
    let failure = log
        .lines()
        .find(|l| l.contains("task failed"))
        .unwrap_or_else(|| panic!("no failed attempt in the log:\n{log}"));
    assert!(failure.contains("timed out after 3000 ms"), "{failure}");
    assert!(failure.contains("rank 1 of 2 did not join"), "{failure}");
    assert!(failure.contains("retryable=true"), "{failure}");
    assert!(log.contains("resuming from checkpoint"), "{log}");
    // Nothing hung: the whole job, stall and retry included, ended well within its limits.
    eprintln!("job with one stalled rank took {:?}", started.elapsed());

    // Each stage reports what its rank held.
    let segment = job
        .tasks
        .iter()
        .find(|t| t.name.starts_with("segment"))
        .unwrap();
    let result: serde_json::Value = serde_json::from_str(&segment.result_json).unwrap();
    assert_eq!(result["sharding"]["world"], 2, "{result}");
    assert!(result["sharding"]["params_bytes"].as_u64().unwrap() > 0);

    // Every task of the job ran as a gang whose units stayed sharded: its stage states and
    // checkpoints are per-rank shard files with a manifest, never a whole model.
    for kind in [
        "task=\"train_stage\"",
        "task=\"advance_snapshots\"",
        "task=\"export\"",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains("units never whole") && l.contains(kind)),
            "no {kind} gang in the log:\n{log}"
        );
    }
    let mut stored = Vec::new();
    collect_named(&dir.join("artifacts"), &["state", "ckpt-"], &mut stored);
    assert!(
        stored.len() >= 3,
        "stage states and checkpoints: {stored:?}"
    );
    for d in &stored {
        assert!(
            d.join("shards.json").is_file(),
            "{} is not sharded",
            d.display()
        );
        assert!(
            d.join("rank-00002-of-00002.bin").is_file(),
            "{}",
            d.display()
        );
        assert!(
            !d.join("weights.bin").exists(),
            "{} holds the model whole",
            d.display()
        );
    }

    let run_dir = PathBuf::from(&job.run_dir);
    assert_steps_once(&run_dir.join("metrics.jsonl"));
    assert_matches_standalone(&run_dir, &job_spec, dir);
}

/// Directories under `root` whose names start with one of `names`.
fn collect_named(root: &Path, names: &[&str], out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if names.iter().any(|n| name.starts_with(n)) && !name.ends_with(".partial") {
            out.push(path);
        } else {
            collect_named(&path, names, out);
        }
    }
}

/// The log without terminal colour codes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn a_worker_without_enough_devices_gets_no_gang_task() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let job_spec = gang_spec(dir, "too-big");
    let coord = coordinator(dir, "127.0.0.1:0");
    let _w = worker(dir, &coord, "one-device");
    let job_id = submit(&coord, &job_spec);
    std::thread::sleep(Duration::from_secs(3));
    let job = get_job(&coord, &job_id);
    assert_eq!(job.tasks[0].state, pb::TaskState::Ready as i32, "{job:#?}");
}
