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
    // Activation checkpointing alone runs each stage as a gang of one rank (the sharded step),
    // so the worker also exposes a sharded stage's per-rank accounting.
    let mut yaml = std::fs::read_to_string(&job_spec).unwrap();
    yaml.push_str("activation_checkpointing: true\n");
    std::fs::write(&job_spec, yaml).unwrap();
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
    // The device offered: one CPU rank with all of the host's (or the cgroup's) memory.
    assert!(
        sample(
            &worker_text,
            "segprop_worker_device_memory_bytes{worker=\"w1\",device=\"cpu\"}"
        ) > (1u64 << 30) as f64
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
    // The last stage's rank: its shards of the weights, of both moments, and what it moved.
    let rank = |kind: &str| {
        sample(
            &worker_text,
            &format!(
                "segprop_worker_rank_memory_bytes{{worker=\"w1\",world=\"1\",kind=\"{kind}\"}}"
            ),
        )
    };
    assert!(rank("params") > 0.0);
    assert_eq!(rank("optimizer"), 2.0 * rank("params"));
    assert!(rank("gathered_peak") > 0.0 && rank("activations") > 0.0);
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

/// A coordinator and one CPU worker `w1` offering `memory`, once the coordinator has counted it.
fn coordinator_and_registered_worker(dir: &std::path::Path, memory: &str) -> (Coordinator, Worker) {
    let metrics = free_port();
    let coord = coordinator_with(
        dir,
        "127.0.0.1:0",
        &[("SEGPROP_METRICS_LISTEN", metrics.clone().into())],
    );
    let worker = worker_with(dir, &coord, "w1", &["--memory", memory]);
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
    (coord, worker)
}

#[test]
fn submit_refuses_a_job_that_does_not_fit_the_worker_with_the_breakdown() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A worker offering 256 MiB: the small preset (110M parameters, 1.3 GB of weights and AdamW
    // moments) cannot train there; the tiny one can.
    let (coord, _w) = coordinator_and_registered_worker(dir, "256MiB");

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
        text(&out.stderr).contains(
            "data.batch_size: auto -> 13 on worker w1 (largest whole batch per stage: stage1 "
        ),
        "{}",
        text(&out.stderr)
    );
    let job = get_job(&coord, text(&out.stdout).trim());
    assert_eq!(state(&job), pb::JobState::Succeeded);
    assert!(job.preflight.contains("auto -> 13"), "{}", job.preflight);
    assert!(
        job.preflight
            .ends_with("; every stage runs whole batches of 13"),
        "{}",
        job.preflight
    );
    // The stages trained 13 sequences of 32 tokens per step.
    let stage1: serde_json::Value = serde_json::from_str(&job.tasks[0].result_json).unwrap();
    let (steps, tokens) = (
        stage1["steps"].as_u64().unwrap(),
        stage1["tokens"].as_u64().unwrap(),
    );
    assert_eq!(tokens, steps * 13 * 32, "{stage1}");
}

#[test]
fn micro_batch_auto_runs_a_batch_too_large_for_the_worker_in_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // 32 MiB: the tiny model's stages fit about 15 whole sequences of 32, not 40.
    let (coord, _w) = coordinator_and_registered_worker(dir, "32MiB");
    let job = spec(dir, "passes", 3, 2);
    let whole = std::fs::read_to_string(&job)
        .unwrap()
        .replace("batch_size: 8", "batch_size: 40")
        .replace("stage1: { max_steps: 12 }", "stage1: { max_steps: 3 }");
    std::fs::write(&job, &whole).unwrap();
    // Whole batches of 40 are refused, with the pass that would fit.
    let out = coord_cli(&coord, &["submit", job.to_str().unwrap()], TOKEN);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("data.micro_batch: { stage1: "),
        "{}",
        text(&out.stderr)
    );
    // `micro_batch: auto` keeps the batch of 40 and splits it per stage.
    std::fs::write(
        &job,
        whole.replace("batch_size: 40", "batch_size: 40, micro_batch: auto"),
    )
    .unwrap();
    let out = coord_cli(&coord, &["submit", job.to_str().unwrap(), "--watch"], TOKEN);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let job = get_job(&coord, text(&out.stdout).trim());
    assert_eq!(state(&job), pb::JobState::Succeeded);
    assert!(
        job.preflight.starts_with(
            "data.micro_batch: auto on worker w1; data.micro_batch -> passes of stage1 "
        ),
        "{}",
        job.preflight
    );
    assert!(
        job.preflight
            .ends_with("(gradients accumulated over a batch of 40)"),
        "{}",
        job.preflight
    );
    let mut trained = 0;
    for task in &job.tasks {
        let Ok(record) = serde_json::from_str::<serde_json::Value>(&task.result_json) else {
            continue;
        };
        let Some(micro) = record["micro_batch"].as_u64() else {
            continue;
        };
        let stage = record["stage"].as_str().unwrap();
        assert!(micro > 0 && micro < 40, "{record}");
        assert!(
            job.preflight.contains(&format!("{stage} {micro}")),
            "{stage} ran passes of {micro}: {}",
            job.preflight
        );
        // Every step still trained the whole batch of 40 sequences of 32 tokens.
        let steps = record["steps"].as_u64().unwrap();
        assert_eq!(
            record["tokens"].as_u64().unwrap(),
            steps * 40 * 32,
            "{record}"
        );
        trained += 1;
    }
    assert_eq!(trained, 3, "stage 1 and two segments");
}

/// `scripts/otlp_receiver.py` on loopback: a real OTLP/gRPC trace receiver writing one JSON line
/// per span it receives.
struct OtlpReceiver {
    child: std::process::Child,
    endpoint: String,
    spans: std::path::PathBuf,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl OtlpReceiver {
    fn start(dir: &std::path::Path) -> OtlpReceiver {
        use std::io::BufRead;
        let spans = dir.join("spans.jsonl");
        let mut child = Command::new("python3")
            .arg(repo().join("scripts/otlp_receiver.py"))
            .args(["--port", "0", "--out"])
            .arg(&spans)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("otlp-receiver.log")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start python3 scripts/otlp_receiver.py: {e}"));
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().strip_prefix("listening on ").unwrap_or_else(|| {
            panic!(
                "the OTLP receiver did not start ({line:?}); it needs `pip install grpcio opentelemetry-proto`: {}",
                std::fs::read_to_string(dir.join("otlp-receiver.log")).unwrap_or_default()
            )
        });
        OtlpReceiver {
            endpoint: format!("http://{addr}"),
            child,
            spans,
        }
    }

    fn spans(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.spans)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn field<'a>(span: &'a serde_json::Value, key: &str) -> &'a str {
    span[key].as_str().unwrap_or("")
}

#[test]
fn one_submitted_job_is_one_connected_trace_across_cli_coordinator_and_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let receiver = OtlpReceiver::start(dir);
    // Export every 100 ms: the daemons are killed at the end of the test, not drained.
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let coord = coordinator_with(
        dir,
        "127.0.0.1:0",
        &otel.map(|(k, v)| (k, std::path::PathBuf::from(v))),
    );
    let _w = worker_with_env(dir, &coord, "w1", &[], &otel);

    let job_spec = spec(dir, "traced", 3, 0);
    let out = Command::new(bin("segprop-coord"))
        .args(["submit", job_spec.to_str().unwrap(), "--watch"])
        .env("SEGPROP_COORDINATOR", format!("http://{}", coord.addr))
        .env("SEGPROP_TOKEN", TOKEN)
        .envs(otel)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let job_id = text(&out.stdout).trim().to_string();
    let job = get_job(&coord, &job_id);
    assert_eq!(state(&job), pb::JobState::Succeeded);
    let tasks = job.tasks.len();
    let stages = job
        .tasks
        .iter()
        .filter(|t| t.kind == pb::TaskKind::TrainStage as i32)
        .count();
    assert!(
        stages >= 3 && tasks > stages,
        "{tasks} tasks, {stages} stages"
    );

    // The CLI flushed its spans before exiting; the daemons export within 100 ms of a span's
    // end. Wait for the last ones: every task's report to the coordinator.
    let started = Instant::now();
    let spans = loop {
        let spans = receiver.spans();
        let reports = spans
            .iter()
            .filter(|s| field(s, "name") == "ClusterService/ReportTask")
            .count();
        let stage_spans = spans
            .iter()
            .filter(|s| field(s, "name").starts_with("stage "))
            .count();
        // A task's own span ends (and is exported) after its report and stage spans: wait
        // until no span names a parent the receiver has not seen yet.
        let job_trace = spans
            .iter()
            .find(|s| field(s, "service_name") == "segprop-cli")
            .map(|s| field(s, "trace_id"));
        let in_trace = |s: &&serde_json::Value| Some(field(s, "trace_id")) == job_trace;
        let ids: std::collections::HashSet<&str> = spans
            .iter()
            .filter(in_trace)
            .map(|s| field(s, "span_id"))
            .collect();
        let dangling = spans.iter().filter(in_trace).any(|s| {
            let parent = field(s, "parent_span_id");
            !parent.is_empty() && !ids.contains(parent)
        });
        if reports >= tasks && stage_spans >= stages && !dangling {
            break spans;
        }
        if reports >= tasks && stage_spans >= stages && started.elapsed() > Duration::from_secs(60)
        {
            // Past the deadline with every span counted: the checks below name the dangling one.
            break spans;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "after 60 s the receiver has {reports} ReportTask spans of {tasks} and {stage_spans} stage spans of {stages}: {spans:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };

    // The root: the CLI's submit, with no parent.
    let roots: Vec<_> = spans
        .iter()
        .filter(|s| field(s, "service_name") == "segprop-cli")
        .collect();
    assert_eq!(roots.len(), 1, "one CLI span: {roots:#?}");
    let root = roots[0];
    assert_eq!(field(root, "name"), "segprop-coord submit");
    assert_eq!(field(root, "parent_span_id"), "");
    assert_eq!(root["attributes"]["job.id"], job_id.as_str());
    let trace_id = field(root, "trace_id");
    assert_eq!(trace_id.len(), 32);

    // One trace: every span of the job shares the root's trace id, and every parent is a span
    // of the trace (nothing dangles), so the three processes' spans form one tree.
    let trace: Vec<_> = spans
        .iter()
        .filter(|s| field(s, "trace_id") == trace_id)
        .collect();
    let ids: std::collections::HashSet<&str> = trace.iter().map(|s| field(s, "span_id")).collect();
    for span in &trace {
        let parent = field(span, "parent_span_id");
        assert!(
            parent.is_empty() && std::ptr::eq(*span, root) || ids.contains(parent),
            "span {} of {} has a parent outside the trace: {span:#?}",
            field(span, "name"),
            field(span, "service_name")
        );
    }
    let services: std::collections::BTreeSet<&str> =
        trace.iter().map(|s| field(s, "service_name")).collect();
    assert_eq!(
        services.into_iter().collect::<Vec<_>>(),
        ["segprop-cli", "segprop-coordinator", "segprop-worker"]
    );

    // CLI -> coordinator: the SubmitJob server span is the root's child.
    let by_name = |name: &str| -> Vec<&serde_json::Value> {
        trace
            .iter()
            .copied()
            .filter(|s| field(s, "name") == name)
            .collect()
    };
    let submit = by_name("JobService/SubmitJob");
    assert_eq!(submit.len(), 1);
    assert_eq!(field(submit[0], "service_name"), "segprop-coordinator");
    assert_eq!(field(submit[0], "parent_span_id"), field(root, "span_id"));

    // coordinator -> worker: one task span per task, each the SubmitJob span's child.
    let task_spans: Vec<_> = trace
        .iter()
        .filter(|s| field(s, "name").starts_with("task "))
        .collect();
    assert_eq!(task_spans.len(), tasks, "{task_spans:#?}");
    for task in &task_spans {
        assert_eq!(field(task, "service_name"), "segprop-worker");
        assert_eq!(field(task, "parent_span_id"), field(submit[0], "span_id"));
        assert_eq!(task["attributes"]["job.id"], job_id.as_str());
    }
    let task_ids: std::collections::HashSet<&str> =
        task_spans.iter().map(|s| field(s, "span_id")).collect();

    // Per stage: a stage span under its task span; the worker's reports back to the
    // coordinator are children of the task spans too.
    let stage_spans: Vec<_> = trace
        .iter()
        .filter(|s| field(s, "name").starts_with("stage "))
        .collect();
    assert_eq!(stage_spans.len(), stages);
    for stage in &stage_spans {
        assert!(task_ids.contains(field(stage, "parent_span_id")));
        assert!(
            stage["attributes"]["stage.steps"]
                .as_str()
                .is_some_and(|s| s != "0")
        );
    }
    let reports = by_name("ClusterService/ReportTask");
    assert_eq!(reports.len(), tasks);
    for report in &reports {
        assert_eq!(field(report, "service_name"), "segprop-coordinator");
        assert!(task_ids.contains(field(report, "parent_span_id")));
    }
    // Per-second calls stay out of the traces.
    assert!(
        spans
            .iter()
            .all(|s| field(s, "name") != "ClusterService/Heartbeat"),
        "heartbeats must not be exported"
    );
}
