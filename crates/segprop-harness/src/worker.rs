//! `segprop-worker serve` as a child process.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context;

use crate::process::{Log, Process};

/// How to start `segprop-worker serve`: a builder, like [`Command`].
///
/// The child runs `serve --coordinator http://<addr> --name <name> --work-dir <dir>/<name>-work`
/// and the extra [`args`](Self::args), with `SEGPROP_TOKEN` and `SEGPROP_LOG`, then the
/// variables given with [`env`](Self::env); its stdout and stderr both go to its [`Log`].
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    program: PathBuf,
    coordinator_addr: String,
    name: String,
    work_dir: PathBuf,
    token: String,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    log: Log,
    log_level: String,
}

impl WorkerCommand {
    /// The worker binary `program` named `name`, joined to the coordinator at `coordinator_addr`
    /// (`host:port`, plaintext) with `token`, working in `<dir>/<name>-work`; its log discarded.
    pub fn new(
        program: impl Into<PathBuf>,
        coordinator_addr: &str,
        token: &str,
        dir: &Path,
        name: &str,
    ) -> Self {
        Self {
            program: program.into(),
            coordinator_addr: coordinator_addr.to_string(),
            name: name.to_string(),
            work_dir: dir.join(format!("{name}-work")),
            token: token.to_string(),
            args: Vec::new(),
            env: Vec::new(),
            log: Log::Discard,
            log_level: "warn".to_string(),
        }
    }

    /// More `serve` arguments (after the harness's own).
    pub fn args<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// One more environment variable, applied after (so overriding) the harness's own.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    /// [`env`](Self::env) for each pair.
    pub fn envs<K, V>(mut self, vars: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (key, value) in vars {
            self = self.env(key, value);
        }
        self
    }

    /// Where its stdout and stderr go.
    pub fn log(mut self, log: Log) -> Self {
        self.log = log;
        self
    }

    /// `SEGPROP_LOG` (default `warn`).
    pub fn log_level(mut self, level: &str) -> Self {
        self.log_level = level.to_string();
        self
    }

    /// Starts the worker (it registers on its own; nothing waits for that).
    pub fn spawn(self) -> anyhow::Result<Process> {
        let (stdout, stderr) = match self.log.open()? {
            Some(file) => (
                Stdio::from(file.try_clone().context("cannot share the worker's log")?),
                Stdio::from(file),
            ),
            None => (Stdio::null(), Stdio::null()),
        };
        let child = Command::new(&self.program)
            .args(["serve", "--coordinator"])
            .arg(format!("http://{}", self.coordinator_addr))
            .arg("--name")
            .arg(&self.name)
            .arg("--work-dir")
            .arg(&self.work_dir)
            .args(&self.args)
            .env("SEGPROP_TOKEN", &self.token)
            .env("SEGPROP_LOG", &self.log_level)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", self.program.display()))?;
        Ok(Process(child))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_worker_gets_its_arguments_settings_and_log() {
        let _spawning = crate::tests::SPAWNING.lock();
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-worker");
        std::fs::write(
            &script,
            "#!/bin/sh\necho \"$*\"\necho \"$SEGPROP_TOKEN $SEGPROP_LOG $EXTRA\" >&2\n",
        )
        .unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let log = dir.path().join("w1.log");
        let mut worker = WorkerCommand::new(&script, "127.0.0.1:9", "t0k", dir.path(), "w1")
            .args(["--max-tasks", "1"])
            .env("EXTRA", "x")
            .log(Log::Create(log.clone()))
            .log_level("info")
            .spawn()
            .unwrap();
        assert!(worker.0.wait().unwrap().success());
        assert_eq!(
            std::fs::read_to_string(&log).unwrap(),
            format!(
                "serve --coordinator http://127.0.0.1:9 --name w1 --work-dir {} --max-tasks 1\n\
                 t0k info x\n",
                dir.path().join("w1-work").display()
            )
        );
    }
}
