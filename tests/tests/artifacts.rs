//! End-to-end artifact store: stage states and checkpoints go through the store with a manifest
//! per artifact; a damaged checkpoint falls back to the previous one, a damaged input state fails
//! its task with a message naming the file, and `segprop-coord fetch` downloads a job's model.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use segprop_proto::v1 as pb;

/// Flips one byte in the middle of `file`.
fn flip_byte(file: &Path) {
    let mut bytes = std::fs::read(file).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    std::fs::write(file, bytes).unwrap();
}

/// The directory of the stored artifact named `name` somewhere under `root`.
fn find_dir(root: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(root).ok()?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if entry.file_name() == name {
                return Some(path);
            }
            if let Some(found) = find_dir(&path, name) {
                return Some(found);
            }
        }
    }
    None
}

/// The worker is killed after its second accepted checkpoint; the newest one is damaged on disk.
/// The next worker detects it, resumes from the checkpoint before it, says so in the task's
/// result, and the job ends with the same model as an undisturbed run.
#[test]
fn a_damaged_checkpoint_falls_back_to_the_one_before_it() {
    damaged_checkpoint_falls_back(false);
}

/// The same with a gang of 2 ranks whose checkpoints are one file per rank: the damaged rank
/// file is named, and the gang resumes from the checkpoint before it at its own size.
#[test]
fn a_damaged_shard_file_of_a_gang_checkpoint_falls_back_to_the_one_before_it() {
    damaged_checkpoint_falls_back(true);
}

fn damaged_checkpoint_falls_back(sharded: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let every = 5;
    // Segments long enough that a heartbeat (every 200 ms) sees the worker running past its
    // second accepted checkpoint: with 40 steps a fast machine finished a segment in between.
    let job_spec = spec(dir, "ckpt-damage", 100, every);
    let (args, damaged): (&[&str], _) = if sharded {
        let text = std::fs::read_to_string(&job_spec)
            .unwrap()
            .replace("grad_clip: 1.0 }", "grad_clip: 1.0, grad_accum: 2 }")
            + "resources: { devices_per_gang: 2 }\nsharding: { strategy: full_shard }\n";
        std::fs::write(&job_spec, text).unwrap();
        (&["--devices", "2"], "rank-00002-of-00002.bin")
    } else {
        (&[], "weights.bin")
    };
    let coord = coordinator(dir, "127.0.0.1:0");
    let mut a = worker_with(dir, &coord, "worker-a", args);
    let job_id = submit(&coord, &job_spec);
    let seen = wait_for(
        &coord,
        &job_id,
        Duration::from_secs(120),
        "two accepted checkpoints",
        |j| {
            let t = &j.tasks[2];
            task_running(j, 2)
                && t.checkpoint_step >= 2 * every
                && t.progress
                    .as_ref()
                    .is_some_and(|p| p.step > t.checkpoint_step + 1)
        },
    );
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    let newest = seen.tasks[2].checkpoint_step;
    let job_root = dir.join("artifacts/jobs").join(&job_id);
    let ckpt = find_dir(&job_root, &format!("ckpt-{newest:08}")).expect("newest checkpoint");
    assert!(
        ckpt.with_file_name(format!("ckpt-{newest:08}.manifest"))
            .is_file(),
        "every stored artifact has a manifest"
    );
    flip_byte(&ckpt.join(damaged));

    let _b = worker_with(dir, &coord, "worker-b", args);
    let job = wait_for(
        &coord,
        &job_id,
        Duration::from_secs(180),
        "the job to end",
        finished,
    );
    assert_eq!(state(&job), pb::JobState::Succeeded, "{job:#?}");
    let segment = &job.tasks[2];
    assert_eq!(segment.attempts, 2, "the segment ran twice");
    let result: serde_json::Value = serde_json::from_str(&segment.result_json).unwrap();
    let note = result["recovered"].as_str().unwrap_or_default();
    assert!(note.contains("damaged"), "{result}");
    assert!(note.contains(damaged), "the note names the file: {note}");
    assert!(
        note.contains(&format!("resumed from step {}", newest - every)),
        "{note}"
    );
    let log = std::fs::read_to_string(dir.join("worker-b.log")).unwrap();
    assert!(log.contains("is damaged"), "{log}");

    let run_dir = PathBuf::from(&job.run_dir);
    assert_steps_once(&run_dir.join("metrics.jsonl"));
    assert_matches_standalone(&run_dir, &job_spec, dir);
}

/// Stage 1's stored state is damaged before the next task reads it: that task fails without a
/// retry, the job fails, and the message names the artifact and the file.
#[test]
fn a_damaged_input_state_fails_the_task_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let job_spec = spec(dir, "state-damage", 5, 0);
    let coord = coordinator(dir, "127.0.0.1:0");
    let job_id = submit(&coord, &job_spec);
    let mut a = worker_with(dir, &coord, "wa", &["--max-tasks", "1"]);
    assert!(wait_exit(&mut a, Duration::from_secs(120)).success());
    let job = get_job(&coord, &job_id);
    assert_eq!(job.tasks[0].state, pb::TaskState::Succeeded as i32);
    let stage1 = dir.join("artifacts/jobs").join(&job_id).join("stages/000");
    let state_dir = find_dir(&stage1, "state").expect("stage 1's stored state");
    flip_byte(&state_dir.join("weights.bin"));

    let _b = worker(dir, &coord, "wb");
    let out = coord_cli(&coord, &["watch", &job_id], TOKEN);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let job = get_job(&coord, &job_id);
    assert_eq!(state(&job), pb::JobState::Failed, "{job:#?}");
    assert!(
        job.error.contains("input state is damaged"),
        "{}",
        job.error
    );
    assert!(
        job.error.contains("stages/000/attempt-") && job.error.contains("/state/weights.bin"),
        "names the file: {}",
        job.error
    );
    let failed = job
        .tasks
        .iter()
        .find(|t| t.state == pb::TaskState::Failed as i32)
        .unwrap();
    assert_eq!(failed.attempts, 1, "not retried: {failed:#?}");
}

/// `segprop-coord fetch` downloads a succeeded job's model through the coordinator and checks it;
/// it refuses a job that has not succeeded.
#[test]
fn fetch_downloads_the_model_of_a_succeeded_job() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let job_spec = spec(dir, "fetch-me", 4, 0);
    let coord = coordinator(dir, "127.0.0.1:0");
    let job_id = submit(&coord, &job_spec);
    let early = coord_cli(&coord, &["fetch", &job_id, "--out", "unused"], TOKEN);
    assert_eq!(early.status.code(), Some(2), "{}", text(&early.stderr));
    assert!(text(&early.stderr).contains("only a succeeded job"));

    let _w = worker(dir, &coord, "w1");
    let out = coord_cli(&coord, &["watch", &job_id], TOKEN);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let fetched = dir.join("fetched");
    let out = coord_cli(
        &coord,
        &["fetch", &job_id, "--out", fetched.to_str().unwrap()],
        TOKEN,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("verified"));
    let job = get_job(&coord, &job_id);
    assert_eq!(
        run_outputs(&fetched),
        run_outputs(Path::new(&job.run_dir)),
        "the fetched model is the stored one"
    );

    // A damaged stored model is refused, naming the file.
    flip_byte(&PathBuf::from(&job.run_dir).join("model/model.safetensors"));
    let out = coord_cli(
        &coord,
        &[
            "fetch",
            &job_id,
            "--out",
            dir.join("again").to_str().unwrap(),
        ],
        TOKEN,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("model/model.safetensors"),
        "{}",
        text(&out.stderr)
    );
}
