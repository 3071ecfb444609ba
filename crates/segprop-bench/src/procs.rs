//! Real coordinator and worker processes on loopback, for the benches that drive them
//! (`snapcheck-cluster`, `chaos`): the binaries next to this one, a coordinator started on an
//! address and the address it reports, workers joined to it, jobs submitted through the CLI.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

/// The bearer token of the benches' coordinators.
pub const TOKEN: &str = "bench-token";

/// A child process, SIGKILLed and reaped on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The directory of this binary, which must hold `segprop-coord` and `segprop-worker`.
pub fn bin_dir() -> Result<PathBuf> {
    let here = std::env::current_exe()?;
    let dir = here.parent().context("the bench binary has no directory")?;
    for name in ["segprop-coord", "segprop-worker"] {
        anyhow::ensure!(
            dir.join(name).is_file(),
            "{} is missing: build the binaries next to this one (cargo build --release -p \
             segprop-coordinator -p segprop-worker -p segprop-bench)",
            dir.join(name).display()
        );
    }
    Ok(dir.to_path_buf())
}

/// Where a process's stderr goes: discarded, or appended to a log file.
fn log(path: Option<PathBuf>) -> Result<Stdio> {
    Ok(match path {
        Some(p) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .with_context(|| format!("cannot open {}", p.display()))?,
        ),
        None => Stdio::null(),
    })
}

/// `segprop-coord serve` on `listen` (`127.0.0.1:0`: a free port) with its state and artifacts
/// under `dir` and the extra `SEGPROP_*` settings `env`; returns it and the address it reports.
/// `log`: append its log to `dir/coordinator.log` (else discarded).
pub fn coordinator(
    bins: &Path,
    dir: &Path,
    listen: &str,
    env: &[(&str, &str)],
    keep_log: bool,
) -> Result<(Proc, String)> {
    let mut child = Command::new(bins.join("segprop-coord"))
        .arg("serve")
        .env("SEGPROP_TOKEN", TOKEN)
        .env("SEGPROP_LISTEN", listen)
        .env("SEGPROP_STATE_DIR", dir.join("state"))
        .env("SEGPROP_ARTIFACT_ROOT", dir.join("artifacts"))
        .env("SEGPROP_HEARTBEAT_INTERVAL_MS", "200")
        .env("SEGPROP_LOG", if keep_log { "info" } else { "warn" })
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(log(keep_log.then(|| dir.join("coordinator.log")))?)
        .spawn()
        .context("cannot start segprop-coord")?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut line)?;
    }
    let child = Proc(child);
    let addr = line
        .trim()
        .strip_prefix("coordinator listening on ")
        .with_context(|| format!("unexpected coordinator output {line:?}"))?
        .to_string();
    Ok((child, addr))
}

/// `segprop-worker serve` named `name`, working in `dir/<name>-work`, joined to `addr`.
pub fn worker(bins: &Path, dir: &Path, addr: &str, name: &str, keep_log: bool) -> Result<Proc> {
    let stderr = log(keep_log.then(|| dir.join(format!("{name}.log"))))?;
    Ok(Proc(
        Command::new(bins.join("segprop-worker"))
            .args(["serve", "--coordinator", &format!("http://{addr}")])
            .args(["--name", name, "--work-dir"])
            .arg(dir.join(format!("{name}-work")))
            .env("SEGPROP_TOKEN", TOKEN)
            .env("SEGPROP_LOG", if keep_log { "info" } else { "warn" })
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("cannot start segprop-worker")?,
    ))
}

/// Submits `spec` through `segprop-coord submit`; returns the job id.
pub fn submit(bins: &Path, addr: &str, spec: &Path) -> Result<String> {
    let out = Command::new(bins.join("segprop-coord"))
        .arg("submit")
        .arg(spec)
        .env("SEGPROP_COORDINATOR", format!("http://{addr}"))
        .env("SEGPROP_TOKEN", TOKEN)
        .env("SEGPROP_LOG", "warn")
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "submit {}: {}",
        spec.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A GetJob request carrying the benches' token.
pub fn get_job(job_id: &str) -> Result<tonic::Request<segprop_proto::v1::GetJobRequest>> {
    let mut req = tonic::Request::new(segprop_proto::v1::GetJobRequest {
        job_id: job_id.to_string(),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse()?);
    Ok(req)
}
