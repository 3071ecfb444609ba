//! The coordinator under test as a child process (`segprop-coord serve` with a config file,
//! a free loopback port and its own state directory, started by `segprop-harness`), and its CPU
//! and memory from `/proc`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use segprop_coordinator::auth::AttachToken;
use segprop_harness::{ChildCommand, CoordinatorCommand, Log};
use segprop_proto::v1 as pb;
use segprop_proto::v1::job_service_client::JobServiceClient;
use tonic::transport::Endpoint;

use super::*;

/// The coordinator child process.
pub(super) struct Coordinator {
    process: segprop_harness::Coordinator,
    pub(super) pid: u32,
    log_path: PathBuf,
    stopped: bool,
}

impl Coordinator {
    pub(super) fn start(
        bin: &Path,
        dir: &Path,
        token: &str,
        heartbeat_ms: u64,
        lease_ms: u64,
    ) -> anyhow::Result<Self> {
        let listen = "127.0.0.1:0";
        let log_path = dir.join("coordinator.log");
        let state_dir = dir.join("state");
        let artifact_root = dir.join("artifacts");
        // The settings go in a config file (the coordinator's `--config`), which also exercises
        // the file path of its configuration.
        let quote = |p: &Path| serde_json::Value::from(p.display().to_string()).to_string();
        let config_path = dir.join("coordinator.yaml");
        std::fs::write(
            &config_path,
            format!(
                "listen: \"{listen}\"\nstate_dir: {}\nartifact_root: {}\ntoken: \"{token}\"\n\
                 heartbeat_interval_ms: {heartbeat_ms}\nlease_ms: {lease_ms}\n",
                quote(&state_dir),
                quote(&artifact_root),
            ),
        )
        .with_context(|| format!("cannot write {}", config_path.display()))?;
        // The same settings in the environment, and only ours: no SEGPROP_* variable of the
        // caller's shell leaks in.
        let process = CoordinatorCommand::new(bin, dir, token)
            .listen(listen)
            .config(&config_path)
            .only_own_segprop_env()
            .env("SEGPROP_HEARTBEAT_INTERVAL_MS", heartbeat_ms.to_string())
            .env("SEGPROP_LEASE_MS", lease_ms.to_string())
            .log(Log::Create(log_path.clone()))
            .log_level("warn")
            .spawn()?;
        Ok(Self {
            pid: process.child.id(),
            process,
            log_path,
            stopped: false,
        })
    }

    /// `http://<the address it listens on>`.
    pub(super) fn url(&self) -> String {
        self.process.url()
    }

    /// Waits until the coordinator answers an authenticated call; returns a JobService client.
    pub(super) async fn wait_ready(
        &mut self,
        url: &str,
        auth: &AttachToken,
    ) -> anyhow::Result<JobClient> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last_error = String::from("no attempt");
        while Instant::now() < deadline {
            if let Some(status) = self.process.child.try_wait()? {
                bail!("the coordinator exited during startup ({status})");
            }
            match Endpoint::from_shared(url.to_string())?
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .connect()
                .await
            {
                Ok(channel) => {
                    let mut client = JobServiceClient::with_interceptor(channel, auth.clone());
                    match client.list_jobs(pb::ListJobsRequest {}).await {
                        Ok(_) => return Ok(client),
                        Err(status) => last_error = status.to_string(),
                    }
                }
                Err(e) => last_error = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("the coordinator did not accept calls within 30 s: {last_error}")
    }

    /// Whether the process has ended (a zombie until waited for counts as ended).
    pub(super) fn exited(&mut self) -> bool {
        !matches!(self.process.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then up to 10 s for it to exit, then SIGKILL.
    pub(super) fn stop(&mut self) -> anyhow::Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let child = &mut self.process.child;
        if let Some(status) = child.try_wait()? {
            bail!("the coordinator had already exited ({status})");
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("the coordinator did not exit within 10 s of SIGTERM (killed)")
    }

    pub(super) fn log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log_path)
            .map(|text| text.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }
}

/// utime + stime of a process, in clock ticks.
pub(super) fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .with_context(|| format!("{path}: unexpected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: field {n} missing"))
    };
    Ok(field(14)? + field(15)?)
}

pub(super) fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

pub(super) struct Memory {
    pub(super) peak: u64,
    pub(super) now: u64,
}

pub(super) fn memory_kib(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("{path}: no {name}"))
    };
    Ok(Memory {
        peak: field("VmHWM:")?,
        now: field("VmRSS:")?,
    })
}
