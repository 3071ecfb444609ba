//! The benches' cluster on loopback (`snapcheck-cluster`, `chaos`), started through
//! `segprop-harness`: the benches' token and settings, and whether a process keeps its log.

use std::path::Path;

use anyhow::Result;
use segprop_harness::{
    Binaries, COORDINATOR, ChildCommand, CoordinatorCommand, Log, WORKER, WorkerCommand,
};

pub use segprop_harness::{Coordinator, Process};

/// The bearer token of the benches' coordinators.
pub const TOKEN: &str = "bench-token";

/// `path` appended to when `keep` (a restarted process adds to its old log), else discarded.
fn log(keep: bool, path: impl FnOnce() -> std::path::PathBuf) -> Log {
    if keep {
        Log::Append(path())
    } else {
        Log::Discard
    }
}

fn log_level(keep_log: bool) -> &'static str {
    if keep_log { "info" } else { "warn" }
}

/// `segprop-coord serve` on `listen` (`127.0.0.1:0`: a free port) with its state and artifacts
/// under `dir`, 200 ms heartbeats and the extra `SEGPROP_*` settings `env`; `keep_log`: append
/// its log to `dir/coordinator.log` (else discarded).
pub fn coordinator(
    bins: &Binaries,
    dir: &Path,
    listen: &str,
    env: &[(&str, &str)],
    keep_log: bool,
) -> Result<Coordinator> {
    CoordinatorCommand::new(bins.path(COORDINATOR), dir, TOKEN)
        .listen(listen)
        .env("SEGPROP_HEARTBEAT_INTERVAL_MS", "200")
        .envs(env.iter().copied())
        .log(log(keep_log, || dir.join("coordinator.log")))
        .log_level(log_level(keep_log))
        .spawn()
}

/// `segprop-worker serve` named `name`, working in `dir/<name>-work`, joined to `addr`;
/// `keep_log`: append its log to `dir/<name>.log` (else discarded).
pub fn worker(
    bins: &Binaries,
    dir: &Path,
    addr: &str,
    name: &str,
    keep_log: bool,
) -> Result<Process> {
    WorkerCommand::new(bins.path(WORKER), addr, TOKEN, dir, name)
        .log(log(keep_log, || dir.join(format!("{name}.log"))))
        .log_level(log_level(keep_log))
        .spawn()
}

/// A GetJob request carrying the benches' token.
pub fn get_job(job_id: &str) -> Result<tonic::Request<segprop_proto::v1::GetJobRequest>> {
    segprop_harness::get_job_request(job_id, TOKEN)
}
