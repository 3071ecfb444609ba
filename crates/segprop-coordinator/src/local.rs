//! A cluster in one process tree: the coordinator in this process and one `segprop-worker serve`
//! child on this machine's CPU (what `segprop-coord demo` and `sweep --local` run on).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::client::Connect;
use crate::config::CoordConfig;
use crate::server;

/// A running local cluster; [`LocalCluster::stop`] ends the worker, then the coordinator.
pub struct LocalCluster {
    running: server::Running,
    worker: tokio::process::Child,
    pub connect: Connect,
    pub worker_log: PathBuf,
    pub worker_bin: PathBuf,
}

fn random_token() -> String {
    let mut bytes = [0u8; 24];
    let _ = getrandom::fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl LocalCluster {
    /// Empties `dir` and starts the coordinator (state and artifacts under `dir`) and one worker
    /// (`segprop-worker` next to this executable) with a fresh random token.
    pub async fn start(dir: &Path, worker_name: &str) -> anyhow::Result<Self> {
        let worker_bin = std::env::current_exe()
            .map_err(|e| anyhow::anyhow!("cannot locate this executable: {e}"))?
            .with_file_name(format!("segprop-worker{}", std::env::consts::EXE_SUFFIX));
        if !worker_bin.is_file() {
            anyhow::bail!(
                "{} not found: build the workspace first (cargo build --release)",
                worker_bin.display()
            );
        }
        if dir.exists() {
            std::fs::remove_dir_all(dir)
                .map_err(|e| anyhow::anyhow!("cannot empty {}: {e}", dir.display()))?;
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        let token = random_token();
        let config = CoordConfig {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            state_dir: dir.join("state"),
            artifact_root: dir.join("artifacts"),
            token: Some(token.clone()),
            heartbeat_interval_ms: 500,
            lease_ms: 5000,
            ..CoordConfig::default()
        };
        let running = server::start(config).await?;
        let url = format!("http://{}", running.addr);
        let worker_log = dir.join("worker.log");
        let log = std::fs::File::create(&worker_log)
            .map_err(|e| anyhow::anyhow!("{}: {e}", worker_log.display()))?;
        let log_err = log
            .try_clone()
            .map_err(|e| anyhow::anyhow!("{}: {e}", worker_log.display()))?;
        let worker = tokio::process::Command::new(&worker_bin)
            .args(["serve", "--coordinator", &url, "--name", worker_name])
            .arg("--work-dir")
            .arg(dir.join("worker-work"))
            .env("SEGPROP_TOKEN", &token)
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {}: {e}", worker_bin.display()))?;
        Ok(Self {
            running,
            worker,
            connect: Connect {
                url,
                token,
                tls_ca: None,
            },
            worker_log,
            worker_bin,
        })
    }

    /// Graceful stop: SIGTERM lets the worker finish its report and exit; then the coordinator.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.worker.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            if tokio::time::timeout(Duration::from_secs(10), self.worker.wait())
                .await
                .is_err()
            {
                let _ = self.worker.kill().await;
            }
        }
        self.running.stop().await
    }
}
