//! Operations surface (issue 7): gRPC health on both daemons without a token, Prometheus
//! `/metrics` and `/healthz` on both, checked by `promtool check metrics` (Debian
//! `prometheus`, installed by .ci/run), and the deployment configs load.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use segprop_proto::v1 as pb;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// `GET path` over plain HTTP/1.1: (status line, body).
fn http_get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// Waits until `addr` accepts connections.
fn wait_listening(addr: &str) {
    let start = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{addr} never listened"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn health(addr: &str) -> ServingStatus {
    runtime().block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);
        let reply = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health check without a token");
        reply.into_inner().status()
    })
}

/// `promtool check metrics` on `text`.
fn promtool(text: &str) -> std::process::Output {
    let promtool = which("promtool").expect(
        "promtool is not on PATH: install Debian `prometheus` (apt-get install prometheus; .ci/run does)",
    );
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Runs `promtool check metrics` on `text`; panics with its complaints.
fn promtool_check(what: &str, text: &str) {
    let out = promtool(text);
    assert!(
        out.status.success(),
        "promtool check metrics rejects the {what} exposition: {}{}\n{text}",
        common::text(&out.stdout),
        common::text(&out.stderr)
    );
}

fn sample(text: &str, line_prefix: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .unwrap_or_else(|| panic!("no sample `{line_prefix}` in\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn daemons_serve_health_and_metrics_that_promtool_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let coord_metrics = free_port();
    let coord = coordinator_with(
        dir,
        "127.0.0.1:0",
        &[("SEGPROP_METRICS_LISTEN", coord_metrics.clone().into())],
    );
    let (worker_health, worker_metrics) = (free_port(), free_port());
    let _w = worker_with(
        dir,
        &coord,
        "w1",
        &[
            "--health-listen",
            &worker_health,
            "--metrics-listen",
            &worker_metrics,
        ],
    );
    wait_listening(&coord_metrics);
    wait_listening(&worker_health);
    wait_listening(&worker_metrics);

    // gRPC health answers without a token on both daemons; the coordinator's other services
    // still refuse a call without one.
    assert_eq!(health(&coord.addr), ServingStatus::Serving);
    assert_eq!(health(&worker_health), ServingStatus::Serving);
    let refused = runtime().block_on(async {
        jobs_client(&coord.addr)
            .await
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap_err()
    });
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    for addr in [&coord_metrics, &worker_metrics] {
        let (status, body) = http_get(addr, "/healthz");
        assert!(status.contains("200"), "{addr}: {status}");
        assert_eq!(body.trim(), "ok");
    }

    let job_spec = spec(dir, "metrics", 4, 2);
    let out = coord_cli(
        &coord,
        &["submit", job_spec.to_str().unwrap(), "--watch"],
        TOKEN,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let job = get_job(&coord, text(&out.stdout).trim());
    assert_eq!(state(&job), pb::JobState::Succeeded);

    let (status, coord_text) = http_get(&coord_metrics, "/metrics");
    assert!(status.contains("200"), "{status}");
    promtool_check("coordinator", &coord_text);
    assert_eq!(
        sample(&coord_text, "segprop_jobs{state=\"succeeded\"}"),
        1.0
    );
    assert_eq!(sample(&coord_text, "segprop_jobs{state=\"running\"}"), 0.0);
    assert_eq!(
        sample(&coord_text, "segprop_tasks{state=\"succeeded\"}"),
        job.tasks.len() as f64
    );
    assert_eq!(sample(&coord_text, "segprop_task_retries_total"), 0.0);
    assert_eq!(sample(&coord_text, "segprop_workers{backend=\"cpu\"}"), 1.0);
    assert!(
        sample(
            &coord_text,
            "segprop_worker_heartbeat_lag_seconds{worker=\"w1\"}"
        ) < 5.0
    );
    assert_eq!(
        sample(&coord_text, "segprop_task_commits_total"),
        job.tasks.len() as f64
    );

    // The worker reports its last task before the CLI sees the job succeed.
    let (status, worker_text) = http_get(&worker_metrics, "/metrics");
    assert!(status.contains("200"), "{status}");
    promtool_check("worker", &worker_text);
    assert_eq!(
        sample(
            &worker_text,
            "segprop_worker_tasks_total{worker=\"w1\",outcome=\"succeeded\"}"
        ),
        job.tasks.len() as f64
    );
    assert_eq!(
        sample(
            &worker_text,
            "segprop_worker_tasks_total{worker=\"w1\",outcome=\"failed\"}"
        ),
        0.0
    );
    // Both segments read their prefixes from stored snapshots.
    assert!(
        sample(
            &worker_text,
            "segprop_worker_snapshot_hits_total{worker=\"w1\"}"
        ) > 0.0
    );
    assert!(
        sample(
            &worker_text,
            "segprop_worker_snapshot_written_bytes_total{worker=\"w1\"}"
        ) > 0.0
    );
    assert!(
        sample(
            &worker_text,
            "segprop_worker_stage_peak_memory_bytes{worker=\"w1\"}"
        ) > 0.0
    );
}

#[test]
fn promtool_rejects_a_broken_exposition() {
    // The check above would pass vacuously if promtool accepted anything.
    let out = promtool("# TYPE bad_total counter\nbad_total{x=\"1\"} not-a-number\n");
    assert!(!out.status.success());
}

#[test]
fn the_deployment_configs_load() {
    for path in [
        "deploy/docker/coordinator.yaml",
        "deploy/k8s/base/config/coordinator.yaml",
        "deploy/k8s/overlays/gpu-8x/coordinator.yaml",
    ] {
        let config = segprop_coordinator::CoordConfig::load(Some(&repo().join(path)))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(config.metrics_listen.is_some(), "{path}: metrics_listen");
    }
}

#[test]
fn submit_refuses_a_job_that_does_not_fit_the_worker_with_the_breakdown() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let metrics = free_port();
    let coord = coordinator_with(
        dir,
        "127.0.0.1:0",
        &[("SEGPROP_METRICS_LISTEN", metrics.clone().into())],
    );
    // A worker offering 256 MiB: the small preset (110M parameters, 1.3 GB of weights and AdamW
    // moments) cannot train there; the tiny one can.
    let _w = worker_with(dir, &coord, "w1", &["--memory", "256MiB"]);
    wait_listening(&metrics);
    let start = Instant::now();
    while !http_get(&metrics, "/metrics")
        .1
        .contains("segprop_workers{backend=\"cpu\"} 1")
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the worker never registered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let big = dir.join("big.yaml");
    std::fs::write(
        &big,
        "version: 1\nname: too-big\nmodel: { preset: small }\n\
         data: { corpus: builtin:synthetic, seq_len: 128, batch_size: 4 }\nregime: segprop\n\
         segprop: { base_depth: 2, head_layers: 2, segment_size: 2 }\noptimizer: { lr: 1.0e-3 }\n",
    )
    .unwrap();
    let out = coord_cli(&coord, &["submit", big.to_str().unwrap()], TOKEN);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let message = text(&out.stderr);
    for expected in [
        "pre-flight: stage stage1 needs",
        "of host memory at data.batch_size 4",
        "worker w1 has 0.25 GiB",
        "weights 0.41 GiB",
        "optimizer",
        "not even one sequence fits",
    ] {
        assert!(
            message.contains(expected),
            "`{expected}` missing from: {message}"
        );
    }
    // Nothing was created.
    let list = coord_cli(&coord, &["list"], TOKEN);
    assert!(
        !text(&list.stdout).contains("too-big"),
        "{}",
        text(&list.stdout)
    );

    // `auto` on a model that cannot fit is refused the same way.
    std::fs::write(
        &big,
        std::fs::read_to_string(&big)
            .unwrap()
            .replace("batch_size: 4", "batch_size: auto"),
    )
    .unwrap();
    let out = coord_cli(&coord, &["submit", big.to_str().unwrap()], TOKEN);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("not even one sequence fits"),
        "{}",
        text(&out.stderr)
    );

    // A tiny job with `batch_size: auto` fits: the coordinator picks the batch (here the corpus
    // caps it: 8000 tokens of 32 make 249 sequences, 13 of them eval), the job runs with it.
    let auto = spec(dir, "auto", 4, 2);
    std::fs::write(
        &auto,
        std::fs::read_to_string(&auto)
            .unwrap()
            .replace("batch_size: 8", "batch_size: auto")
            .replace("synthetic_tokens: 30000", "synthetic_tokens: 8000"),
    )
    .unwrap();
    let out = coord_cli(
        &coord,
        &["submit", auto.to_str().unwrap(), "--watch"],
        TOKEN,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr)
            .contains("data.batch_size: auto -> 13 on worker w1 (largest per stage: stage1 "),
        "{}",
        text(&out.stderr)
    );
    let job = get_job(&coord, text(&out.stdout).trim());
    assert_eq!(state(&job), pb::JobState::Succeeded);
    assert!(job.preflight.contains("auto -> 13"), "{}", job.preflight);
    // The stages trained 13 sequences of 32 tokens per step.
    let stage1: serde_json::Value = serde_json::from_str(&job.tasks[0].result_json).unwrap();
    let (steps, tokens) = (
        stage1["steps"].as_u64().unwrap(),
        stage1["tokens"].as_u64().unwrap(),
    );
    assert_eq!(tokens, steps * 13 * 32, "{stage1}");
}
