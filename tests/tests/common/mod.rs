//! The cluster test harness: a coordinator and worker daemons as real processes on loopback,
//! driven through the `segprop-coord` CLI and raw gRPC.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use segprop_harness::{Binaries, ChildCommand, CoordinatorCommand, Log, WorkerCommand};
use segprop_proto::v1 as pb;
use segprop_proto::v1::cluster_service_client::ClusterServiceClient;
use segprop_proto::v1::job_service_client::JobServiceClient;
use tonic::Request;

pub use segprop_harness::Coordinator;
/// A worker daemon (or any child), SIGKILLed and reaped on drop.
pub use segprop_harness::Process as Worker;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `target/<profile>/<name>`, building the coordinator, worker and bench binaries on first use.
pub fn bin(name: &str) -> PathBuf {
    Binaries::build(&repo())
        .and_then(|binaries| binaries.get(name))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

pub const TOKEN: &str = "test-token-4f1c";

/// A spec for cluster tests: tiny, fast, with mid-stage checkpoints every `every` steps.
pub fn spec(dir: &Path, name: &str, segment_steps: u64, every: u64) -> PathBuf {
    let template = std::fs::read_to_string(repo().join("configs/jobs/tiny-soak.yaml")).unwrap();
    let text = template
        .replace("name: tiny-soak", &format!("name: {name}"))
        .replace(
            "segment: { max_steps: 10 }",
            &format!("segment: {{ max_steps: {segment_steps} }}"),
        )
        .replace("every_steps: 4 }", &format!("every_steps: {every} }}"));
    assert!(
        text.contains(&format!("name: {name}\n")),
        "configs/jobs/tiny-soak.yaml changed"
    );
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts `segprop-coord serve` on `listen` with state and artifacts under `dir`.
pub fn coordinator(dir: &Path, listen: &str) -> Coordinator {
    coordinator_with(dir, listen, &[])
}

/// [`coordinator`] with extra `SEGPROP_*` settings.
pub fn coordinator_with(dir: &Path, listen: &str, env: &[(&str, PathBuf)]) -> Coordinator {
    CoordinatorCommand::new(bin("segprop-coord"), dir, TOKEN)
        .listen(listen)
        .env("SEGPROP_HEARTBEAT_INTERVAL_MS", "200")
        .env("SEGPROP_LEASE_MS", "3000")
        .env("SEGPROP_BACKOFF_BASE_MS", "100")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .log(Log::Create(dir.join("coordinator.log")))
        .log_level("info")
        .spawn()
        .unwrap_or_else(|e| panic!("{e:#}"))
}

pub fn worker(dir: &Path, coord: &Coordinator, name: &str) -> Worker {
    worker_with(dir, coord, name, &[])
}

/// [`worker`] with extra `serve` arguments.
pub fn worker_with(dir: &Path, coord: &Coordinator, name: &str, args: &[&str]) -> Worker {
    worker_with_env(dir, coord, name, args, &[])
}

/// [`worker_with`] with extra environment variables.
pub fn worker_with_env(
    dir: &Path,
    coord: &Coordinator,
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Worker {
    WorkerCommand::new(bin("segprop-worker"), &coord.addr, TOKEN, dir, name)
        .args(args)
        .envs(env.iter().copied())
        .log(Log::Create(dir.join(format!("{name}.log"))))
        .log_level("info")
        .spawn()
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// A moto S3 server (`pip install 'moto[server]'`) on a free loopback port, killed on drop.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// Starts the server and creates `bucket`.
    pub fn start(bucket: &str) -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start moto_server ({e}): install `pip install 'moto[server]'`")
            });
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let started = Instant::now();
        while !moto.http("GET", "/").starts_with("HTTP/1.1 200") {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "moto_server never answered"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let created = moto.http("PUT", &format!("/{bucket}"));
        assert!(
            created.starts_with("HTTP/1.1 200"),
            "create bucket: {created}"
        );
        moto
    }

    /// One unsigned HTTP/1.1 request (moto accepts them); the whole response, or "" when the
    /// server is not up yet.
    pub fn http(&self, method: &str, path: &str) -> String {
        use std::io::{Read, Write};
        let Some(addr) = self.endpoint.strip_prefix("http://") else {
            return String::new();
        };
        let Ok(mut conn) = std::net::TcpStream::connect(addr) else {
            return String::new();
        };
        let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(
            conn,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let mut response = String::new();
        let _ = conn.read_to_string(&mut response);
        response
    }
}

pub fn coord_cli(coord: &Coordinator, args: &[&str], token: &str) -> Output {
    coord.cli(token).args(args).output().unwrap()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn submit(coord: &Coordinator, spec: &Path) -> String {
    coord.submit(spec).unwrap_or_else(|e| panic!("{e:#}"))
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

pub fn with_token<T>(message: T, token: &str) -> Request<T> {
    segprop_harness::authorized(message, token).unwrap()
}

pub async fn jobs_client(addr: &str) -> JobServiceClient<tonic::transport::Channel> {
    JobServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

pub async fn cluster_client(addr: &str) -> ClusterServiceClient<tonic::transport::Channel> {
    ClusterServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

pub fn get_job(coord: &Coordinator, job_id: &str) -> pb::Job {
    runtime().block_on(async {
        jobs_client(&coord.addr)
            .await
            .get_job(segprop_harness::get_job_request(job_id, TOKEN).unwrap())
            .await
            .unwrap()
            .into_inner()
    })
}

/// Polls the job until `done` holds (or panics after `limit`).
pub fn wait_for(
    coord: &Coordinator,
    job_id: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&pb::Job) -> bool,
) -> pb::Job {
    let started = Instant::now();
    loop {
        let job = get_job(coord, job_id);
        if done(&job) {
            return job;
        }
        assert!(
            started.elapsed() < limit,
            "timed out waiting for {what}; job is {job:#?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn state(job: &pb::Job) -> pb::JobState {
    pb::JobState::try_from(job.state).unwrap()
}

pub fn finished(job: &pb::Job) -> bool {
    state(job) != pb::JobState::Running && state(job) != pb::JobState::Pending
}

pub fn task_running(job: &pb::Job, index: usize) -> bool {
    job.tasks[index].state == pb::TaskState::Running as i32
}

/// The standalone `segprop-worker train` run of `spec`: its final model bytes and eval loss.
pub fn standalone(spec: &Path, out: &Path) -> (Vec<u8>, f64) {
    let result = Command::new(bin("segprop-worker"))
        .args(["train", spec.to_str().unwrap(), "--quiet", "--out"])
        .arg(out)
        .env("SEGPROP_LOG", "warn")
        .output()
        .unwrap();
    assert!(result.status.success(), "{}", text(&result.stderr));
    run_outputs(out)
}

/// The model and held-out loss in `run_dir` (a job's run directory, or where `fetch` put it)
/// equal a standalone run of `job_spec` (run under `dir/alone`).
pub fn assert_matches_standalone(run_dir: &Path, job_spec: &Path, dir: &Path) {
    let (model, loss) = run_outputs(run_dir);
    let (alone_model, alone_loss) = standalone(job_spec, &dir.join("alone"));
    assert_eq!(loss, alone_loss);
    assert!(
        model == alone_model,
        "weights differ from the standalone run"
    );
}

/// Waits for a worker started with `--max-tasks` to exit.
pub fn wait_exit(w: &mut Worker, limit: std::time::Duration) -> std::process::ExitStatus {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = w.0.try_wait().unwrap() {
            return status;
        }
        assert!(started.elapsed() < limit, "worker did not exit");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The run's final model (every weight's bits in the model's order, however the export laid it
/// out in files: one `model.safetensors`, or one file per unit with an index) and held-out loss.
pub fn run_outputs(dir: &Path) -> (Vec<u8>, f64) {
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    let (model, _) = segprop_model::hf::import::<segprop_train::CpuBackend>(
        &dir.join("model"),
        &Default::default(),
    )
    .unwrap();
    let bits: Vec<u8> = segprop_train::segprop::parameter_values(&model)
        .into_iter()
        .flat_map(|(_, values)| values.into_iter().flat_map(u32::to_le_bytes))
        .collect();
    (bits, summary["final_eval_loss"].as_f64().unwrap())
}

/// Every stage's steps appear exactly once, 1..=n, in the job's metrics (no step lost or
/// duplicated by a retry).
pub fn assert_steps_once(metrics: &Path) {
    let mut steps: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for line in std::fs::read_to_string(metrics).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["event"] == "step" {
            steps
                .entry(v["stage"].as_str().unwrap().to_string())
                .or_default()
                .push(v["step"].as_u64().unwrap());
        }
    }
    assert!(!steps.is_empty());
    for (stage, s) in steps {
        let expected: Vec<u64> = (1..=s.len() as u64).collect();
        assert_eq!(s, expected, "steps of {stage}");
    }
}

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}
