//! End-to-end SnapCheck across workers: snapshots `S[depth, batch]` written to the shared store by
//! `advance_snapshots` shards on one worker and read by the next segment on another, over the
//! local store and over the coordinator's gRPC SnapshotService; corrupt blobs; garbage
//! collection; bf16 storage.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use segprop_proto::v1 as pb;

/// A SegProp spec with SnapCheck settings under `segprop:` (`extra`, YAML flow entries).
fn snap_spec(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let text = format!(
        "version: 1
name: {name}
model: {{ preset: tiny, overrides: {{ num_layers: 5 }} }}
data: {{ corpus: builtin:synthetic, seq_len: 32, batch_size: 8, eval_fraction: 0.05, synthetic_tokens: 30000 }}
regime: segprop
segprop: {{ base_depth: 1, head_layers: 2, segment_size: 1, head_policy: persistent, {extra}
  exit: {{ stage1: {{ max_steps: 12 }}, segment: {{ max_steps: 8 }} }} }}
optimizer: {{ lr: 3.0e-3, grad_clip: 1.0 }}
eval: {{ every_steps: 10, max_batches: 2 }}
checkpoint: {{ every_steps: 5 }}
seed: 11
"
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn result(task: &pb::Task) -> serde_json::Value {
    serde_json::from_str(&task.result_json).unwrap_or_else(|e| panic!("{}: {e}", task.name))
}

fn task<'a>(job: &'a pb::Job, name: &str) -> &'a pb::Task {
    job.tasks
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no task {name} in {job:#?}"))
}

/// Stored snapshot blobs of `job_id` (files under the default local snapshot store).
fn blobs(dir: &Path, job_id: &str) -> Vec<PathBuf> {
    let root = dir
        .join("artifacts/snapshot-store/jobs")
        .join(job_id)
        .join("snapshots");
    let mut out = Vec::new();
    let Ok(depths) = std::fs::read_dir(&root) else {
        return out;
    };
    for depth in depths.flatten() {
        for f in std::fs::read_dir(depth.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if f.path().extension().is_some_and(|e| e == "safetensors") {
                out.push(f.path());
            }
        }
    }
    out.sort();
    out
}

/// Number of depth directories holding at least one blob.
fn live_depths(dir: &Path, job_id: &str) -> usize {
    let mut depths: Vec<PathBuf> = blobs(dir, job_id)
        .iter()
        .filter_map(|b| b.parent().map(Path::to_path_buf))
        .collect();
    depths.dedup();
    depths.len()
}

/// Worker A runs stage 1 and the first snapshot shard, then leaves (`--max-tasks 2`); one byte
/// of one stored blob is flipped; worker B trains the segment on A's snapshots. B detects the
/// corrupt blob and recomputes its batches, reads the others from the store, and the job ends
/// with the same model as a standalone run.
#[test]
fn a_segment_trains_on_snapshots_another_worker_stored_and_recomputes_a_corrupt_blob() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let coord = coordinator(dir, "127.0.0.1:0");
    let job_spec = snap_spec(
        dir,
        "handoff",
        "snapshot_shards: 1, snapshot_overlap: false,",
    );
    let job_id = submit(&coord, &job_spec);
    let mut a = worker_with(dir, &coord, "wa", &["--max-tasks", "2"]);
    assert!(wait_exit(&mut a, Duration::from_secs(120)).success());
    let job = get_job(&coord, &job_id);
    assert_eq!(job.tasks[1].name, "snapshots-1");
    assert_eq!(job.tasks[1].state, pb::TaskState::Succeeded as i32);
    assert_eq!(result(&job.tasks[1])["worker"], "wa");
    let stored = blobs(dir, &job_id);
    assert!(stored.len() >= 2, "{stored:?}");
    // Flip one byte in the middle of the first blob's tensor data.
    let victim = &stored[0];
    let mut bytes = std::fs::read(victim).unwrap();
    let at = bytes.len() * 3 / 4;
    bytes[at] ^= 0x40;
    std::fs::write(victim, bytes).unwrap();

    let _b = worker(dir, &coord, "wb");
    let job = wait_for(
        &coord,
        &job_id,
        Duration::from_secs(180),
        "the job",
        finished,
    );
    assert_eq!(state(&job), pb::JobState::Succeeded, "{job:#?}");
    let segment = result(task(&job, "segment-1-2"));
    assert_eq!(segment["worker"], "wb");
    let io = &segment["snapshot_io"];
    assert_eq!(io["corrupt_blobs"], 1, "{segment}");
    assert_eq!(io["blobs_read"], stored.len() as u64 - 1, "{segment}");
    assert_eq!(io["missing_blobs"], 0, "{segment}");
    // Only the corrupt blob's batches were recomputed (cache misses), all others fetched.
    assert!(segment["snapshots"]["fetched"].as_u64().unwrap() > 0);
    assert!(segment["snapshots"]["misses"].as_u64().unwrap() > 0);
    let log = std::fs::read_to_string(dir.join("wb.log")).unwrap();
    assert!(log.contains("corrupt snapshot blob"), "{log}");
    // Stage 1's estimate of a depth's bytes (the snapshot budget's starting point) covers the
    // bytes the shard then wrote, with little to spare.
    let estimate = result(&job.tasks[0])["snapshot_depth_bytes"]
        .as_u64()
        .unwrap();
    let written = result(&job.tasks[1])["snapshot_io"]["bytes_written"]
        .as_u64()
        .unwrap();
    assert!(
        written <= estimate && estimate <= written + written / 10,
        "estimate {estimate}, written {written}"
    );
    // The coordinator reserves by the typed result, which carries the same estimate.
    let typed = job.tasks[0]
        .result
        .as_ref()
        .expect("stage 1's typed result");
    assert_eq!(typed.snapshot_depth_bytes, Some(estimate));
    let shard = job.tasks[1]
        .result
        .as_ref()
        .expect("the shard's typed result");
    assert_eq!(shard.snapshot_depth, Some(1));

    assert_matches_standalone(Path::new(&job.run_dir), &job_spec, dir);
}

/// Two workers, two shards per depth with streaming overlap; worker 2 shares no directory with
/// the others: it reaches both the snapshot and the artifact store only through the
/// coordinator's SnapshotService. The shards run on both workers, every segment reads its whole
/// input from the store, at most two depths are ever stored, none after the job, and the model
/// equals a standalone run's.
#[test]
fn two_workers_fan_out_snapshots_collect_them_and_match_a_standalone_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let coord = coordinator(dir, "127.0.0.1:0");
    let _w1 = worker(dir, &coord, "w1");
    let private = dir.join("w2-private-root");
    let _w2 = worker_with(
        dir,
        &coord,
        "w2",
        &[
            "--snapshot-store",
            "grpc",
            "--artifact-store",
            "grpc",
            "--artifact-root",
            private.to_str().unwrap(),
        ],
    );
    // Both registered before the submit, so `snapshot_shards: 0` (auto) plans two shards.
    let started = Instant::now();
    while !["w1", "w2"].iter().all(|w| {
        std::fs::read_to_string(dir.join(format!("{w}.log")))
            .unwrap_or_default()
            .contains("registered")
    }) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "workers never registered"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let job_spec = snap_spec(dir, "fanout", "");
    let job_id = submit(&coord, &job_spec);

    let stop = Arc::new(AtomicBool::new(false));
    let max_live = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (stop, max_live, dir, job_id) = (
            stop.clone(),
            max_live.clone(),
            dir.to_path_buf(),
            job_id.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                max_live.fetch_max(live_depths(&dir, &job_id), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let job = wait_for(
        &coord,
        &job_id,
        Duration::from_secs(240),
        "the job",
        finished,
    );
    stop.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    assert_eq!(state(&job), pb::JobState::Succeeded, "{job:#?}");

    let names: Vec<&str> = job.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "stage1",
            "snapshots-1-1of2",
            "snapshots-1-2of2",
            "segment-1-2",
            "snapshots-2-1of2",
            "snapshots-2-2of2",
            "segment-2-3",
            "export"
        ]
    );
    for depth in [1, 2] {
        let writers: std::collections::BTreeSet<String> = (1..=2)
            .map(|i| {
                let shard = result(task(&job, &format!("snapshots-{depth}-{i}of2")));
                assert!(shard["batches"].as_u64().unwrap() > 0, "{shard}");
                assert!(shard["snapshot_io"]["blobs_written"].as_u64().unwrap() > 0);
                shard["worker"].as_str().unwrap().to_string()
            })
            .collect();
        assert_eq!(writers.len(), 2, "depth {depth}: both shards on one worker");
    }
    for name in ["segment-1-2", "segment-2-3"] {
        let segment = result(task(&job, name));
        let io = &segment["snapshot_io"];
        assert!(io["blobs_read"].as_u64().unwrap() >= 2, "{segment}");
        assert_eq!(io["corrupt_blobs"], 0, "{segment}");
        assert_eq!(io["missing_blobs"], 0, "{segment}");
        // Every prefix output came from the store: nothing recomputed.
        assert_eq!(segment["snapshots"]["misses"], 0, "{segment}");
    }
    let max_live = max_live.load(Ordering::SeqCst);
    assert!((1..=2).contains(&max_live), "live depths seen: {max_live}");
    // After the job, nothing remains (deletion runs in the background).
    let started = Instant::now();
    while !blobs(dir, &job_id).is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "snapshots left after the job: {:?}",
            blobs(dir, &job_id)
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // w2 (which ran tasks: see the shards above) wrote nothing outside the stores it was given.
    assert!(!private.exists(), "w2 used a local artifact root");
    let w2_log = std::fs::read_to_string(dir.join("w2.log")).unwrap();
    assert!(w2_log.contains("grpc (artifacts)"), "{w2_log}");
    assert_matches_standalone(Path::new(&job.run_dir), &job_spec, dir);
}

/// Per-step training losses of every stage in a run's metrics.jsonl.
fn step_losses(run_dir: &Path) -> Vec<(String, u64, f64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "step")
        .map(|v| {
            (
                v["stage"].as_str().unwrap().to_string(),
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// bf16 snapshots take half the bytes and the loss curve stays within 0.1% (relative) of f32
/// storage at every step (measured: under 1e-5).
#[test]
fn bf16_snapshots_halve_the_bytes_and_track_the_f32_loss_curve() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let coord = coordinator(dir, "127.0.0.1:0");
    let _w = worker(dir, &coord, "w1");
    let mut runs = Vec::new();
    for dtype in ["f32", "bf16"] {
        let spec = snap_spec(
            dir,
            &format!("dtype-{dtype}"),
            &format!("snapshot_dtype: {dtype}, snapshot_shards: 1,"),
        );
        let job_id = submit(&coord, &spec);
        let job = wait_for(
            &coord,
            &job_id,
            Duration::from_secs(180),
            "the job",
            finished,
        );
        assert_eq!(state(&job), pb::JobState::Succeeded, "{job:#?}");
        let bytes = result(task(&job, "snapshots-2"))["snapshot_io"]["bytes_written"]
            .as_u64()
            .unwrap();
        runs.push((bytes, step_losses(Path::new(&job.run_dir))));
    }
    let (f32_bytes, f32_losses) = &runs[0];
    let (bf16_bytes, bf16_losses) = &runs[1];
    let ratio = *bf16_bytes as f64 / *f32_bytes as f64;
    assert!((0.45..0.55).contains(&ratio), "bf16/f32 bytes {ratio}");
    assert_eq!(f32_losses.len(), bf16_losses.len());
    let mut worst = 0.0f64;
    for (a, b) in f32_losses.iter().zip(bf16_losses) {
        assert_eq!((&a.0, a.1), (&b.0, b.1));
        worst = worst.max((a.2 - b.2).abs() / a.2.abs());
    }
    // Stage 1 never reads snapshots: identical there.
    assert!(
        f32_losses
            .iter()
            .zip(bf16_losses)
            .filter(|(a, _)| a.0 == "stage1")
            .all(|(a, b)| a.2 == b.2)
    );
    assert!(worst < 1e-3, "worst relative loss difference {worst}");
    eprintln!(
        "bf16 vs f32 snapshots: bytes ratio {ratio:.3}, worst step-loss rel diff {worst:.2e}"
    );
}

/// The snapshot store on a real S3-compatible server (moto): coordinator and worker both point
/// at `s3://bucket/prefix`; the shards' blobs go there (none under the local default), the
/// segments read them back, the coordinator deletes them after the job, and the model equals a
/// standalone run's.
#[test]
fn snapshots_on_s3_complete_the_job_and_are_collected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let moto = Moto::start("segprop-snaps");
    let aws = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
    ];
    let url = "s3://segprop-snaps/cluster";
    let artifacts_url = "s3://segprop-snaps/artifacts";
    let mut coord_env: Vec<(&str, PathBuf)> = vec![
        ("SEGPROP_SNAPSHOT_STORE__URL", url.into()),
        (
            "SEGPROP_SNAPSHOT_STORE__S3_ENDPOINT",
            moto.endpoint.clone().into(),
        ),
        ("SEGPROP_SNAPSHOT_STORE__ALLOW_HTTP", "true".into()),
        ("SEGPROP_ARTIFACT_STORE__URL", artifacts_url.into()),
        (
            "SEGPROP_ARTIFACT_STORE__S3_ENDPOINT",
            moto.endpoint.clone().into(),
        ),
        ("SEGPROP_ARTIFACT_STORE__ALLOW_HTTP", "true".into()),
    ];
    coord_env.extend(aws.iter().map(|(k, v)| (*k, PathBuf::from(v))));
    let coord = coordinator_with(dir, "127.0.0.1:0", &coord_env);
    let _w = worker_with_env(
        dir,
        &coord,
        "w1",
        &[
            "--snapshot-store",
            url,
            "--artifact-store",
            artifacts_url,
            "--s3-endpoint",
            &moto.endpoint,
            "--s3-allow-http",
        ],
        &aws,
    );
    let job_spec = snap_spec(dir, "on-s3", "snapshot_shards: 2,");
    let job_id = submit(&coord, &job_spec);
    let job = wait_for(
        &coord,
        &job_id,
        Duration::from_secs(240),
        "the job",
        finished,
    );
    assert_eq!(state(&job), pb::JobState::Succeeded, "{job:#?}");
    let written: u64 = job
        .tasks
        .iter()
        .filter(|t| t.name.starts_with("snapshots-"))
        .map(|t| result(t)["snapshot_io"]["blobs_written"].as_u64().unwrap())
        .sum();
    assert!(written >= 4, "blobs written: {written}");
    for name in ["segment-1-2", "segment-2-3"] {
        let segment = result(task(&job, name));
        assert!(
            segment["snapshot_io"]["blobs_read"].as_u64().unwrap() >= 2,
            "{segment}"
        );
        assert_eq!(segment["snapshots"]["misses"], 0, "{segment}");
    }
    assert!(
        !dir.join("artifacts/snapshot-store").exists(),
        "snapshots went to the local default store"
    );
    // The coordinator deletes them from the bucket once the job has ended.
    let started = Instant::now();
    loop {
        let listing = moto.http("GET", "/segprop-snaps?list-type=2&prefix=cluster/");
        if !listing.contains("<Key>") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "snapshots left in the bucket: {listing}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Artifacts live in the bucket too (none in the local artifact root), and the model comes
    // back through the coordinator with `segprop-coord fetch`.
    assert_eq!(
        job.run_dir,
        format!("{artifacts_url}/jobs/{job_id}"),
        "run_dir names the store"
    );
    assert!(!dir.join("artifacts/jobs").exists());
    let listing = moto.http(
        "GET",
        &format!("/segprop-snaps?list-type=2&prefix=artifacts/jobs/{job_id}/model"),
    );
    assert!(
        listing.contains("model/model.safetensors</Key>") && listing.contains("model.manifest"),
        "{listing}"
    );
    let fetched = dir.join("fetched");
    let out = coord_cli(
        &coord,
        &["fetch", &job_id, "--out", fetched.to_str().unwrap()],
        TOKEN,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_matches_standalone(&fetched, &job_spec, dir);
}

/// A snapshot budget too small for a job's two live depths fails the job when its snapshots
/// would start, with both numbers in the message; stage 1's work is kept in the store.
#[test]
fn a_job_that_cannot_fit_the_snapshot_budget_fails_with_both_numbers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let coord = coordinator_with(
        dir,
        "127.0.0.1:0",
        &[("SEGPROP_SNAPSHOT_BUDGET_BYTES", "100000".into())],
    );
    let _w = worker(dir, &coord, "w1");
    let job_spec = snap_spec(dir, "over-budget", "snapshot_shards: 1,");
    let job_id = submit(&coord, &job_spec);
    let out = coord_cli(&coord, &["watch", &job_id], TOKEN);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    // A blob put after the job ended (a cancelled shard finishing its write) is swept a lease
    // later.
    let late = dir
        .join("artifacts/snapshot-store/jobs")
        .join(&job_id)
        .join("snapshots/depth-001/late.safetensors");
    std::fs::create_dir_all(late.parent().unwrap()).unwrap();
    std::fs::write(&late, b"late").unwrap();
    let job = get_job(&coord, &job_id);
    assert_eq!(state(&job), pb::JobState::Failed, "{job:#?}");
    assert_eq!(job.tasks[0].state, pb::TaskState::Succeeded as i32);
    assert!(
        job.error.contains("snapshot store budget of 100000 bytes"),
        "{}",
        job.error
    );
    assert!(job.error.contains("snapshot_budget_bytes"), "{}", job.error);
    // The sweep deletes the blob, then logs: wait for both (the log line can trail the delete).
    let started = Instant::now();
    let swept = || std::fs::read_to_string(dir.join("coordinator.log")).unwrap_or_default();
    while late.exists() || !swept().contains("late snapshots swept") {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the late blob was never swept (still there: {}); log:\n{}",
            late.exists(),
            swept()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
