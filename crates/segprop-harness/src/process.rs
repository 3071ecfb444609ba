//! A child process that does not outlive its owner, where its output goes, and the options
//! that [`CoordinatorCommand`](crate::CoordinatorCommand) and
//! [`WorkerCommand`](crate::WorkerCommand) share.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// A child process, SIGKILLed and reaped on drop.
#[derive(Debug)]
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        // After a wait this signals nothing: std does not kill a reaped (maybe reused) pid.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Where a daemon's log (its stderr) goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Log {
    /// Discarded.
    #[default]
    Discard,
    /// A new file at this path (an existing one is truncated).
    Create(PathBuf),
    /// Appended to this file (created if missing): a restarted daemon adds to its old log.
    Append(PathBuf),
}

impl Log {
    /// The open log file; `None` for [`Log::Discard`].
    pub(crate) fn open(&self) -> anyhow::Result<Option<File>> {
        let (path, append) = match self {
            Log::Discard => return Ok(None),
            Log::Create(path) => (path, false),
            Log::Append(path) => (path, true),
        };
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .with_context(|| format!("cannot open the log {}", path.display()))?;
        Ok(Some(file))
    }
}

/// The options of a daemon's child process that do not depend on the daemon: its program, its
/// token (`SEGPROP_TOKEN`), its log level (`SEGPROP_LOG`), extra environment variables and its
/// [`Log`]. Each builder holds one and sets it through [`ChildCommand`].
#[derive(Clone, Debug)]
pub struct ChildOptions {
    pub(crate) program: PathBuf,
    pub(crate) token: String,
    env: Vec<(OsString, OsString)>,
    pub(crate) log: Log,
    log_level: String,
    only_own_segprop_env: bool,
}

/// Where [`ChildOptions::spawn`] sends the child's stdout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stdout {
    /// A pipe, for the caller to read.
    Piped,
    /// The [`Log`], with stderr.
    Log,
}

impl ChildOptions {
    /// `program` accepting `token`, at log level `warn`, with its log discarded.
    pub(crate) fn new(program: PathBuf, token: &str) -> Self {
        Self {
            program,
            token: token.to_string(),
            env: Vec::new(),
            log: Log::Discard,
            log_level: "warn".to_string(),
            only_own_segprop_env: false,
        }
    }

    /// Starts the program. The child gets `SEGPROP_TOKEN` and `SEGPROP_LOG`, then what
    /// `configure` adds (its arguments and the daemon's own variables), then the variables
    /// given with [`ChildCommand::env`]; stdin from `/dev/null`, stderr to the [`Log`] and
    /// stdout as `stdout` says.
    pub(crate) fn spawn(
        &self,
        stdout: Stdout,
        configure: impl FnOnce(&mut Command),
    ) -> anyhow::Result<Child> {
        let mut command = Command::new(&self.program);
        if self.only_own_segprop_env {
            for (key, _) in std::env::vars_os() {
                if key.to_string_lossy().starts_with("SEGPROP_") {
                    command.env_remove(key);
                }
            }
        }
        command
            .env("SEGPROP_TOKEN", &self.token)
            .env("SEGPROP_LOG", &self.log_level);
        configure(&mut command);
        let log = self.log.open()?;
        let stdout = match (stdout, &log) {
            (Stdout::Piped, _) => Stdio::piped(),
            (Stdout::Log, Some(file)) => Stdio::from(
                file.try_clone()
                    .context("cannot share the log between stdout and stderr")?,
            ),
            (Stdout::Log, None) => Stdio::null(),
        };
        command
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log.map_or_else(Stdio::null, Stdio::from))
            .spawn()
            .with_context(|| format!("cannot start {}", self.program.display()))
    }
}

/// The settings [`CoordinatorCommand`](crate::CoordinatorCommand) and
/// [`WorkerCommand`](crate::WorkerCommand) share, as builder methods: each builder only says
/// where its [`ChildOptions`] are.
pub trait ChildCommand: Sized {
    /// The options this builder starts its child with.
    fn child_options(&mut self) -> &mut ChildOptions;

    /// One more environment variable, applied after (so overriding) the harness's own.
    fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.child_options()
            .env
            .push((key.as_ref().to_os_string(), value.as_ref().to_os_string()));
        self
    }

    /// [`env`](Self::env) for each pair.
    fn envs<K, V>(mut self, vars: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        for (key, value) in vars {
            self = self.env(key, value);
        }
        self
    }

    /// Where its log goes: its stderr, and a worker's stdout too (a coordinator's stdout is
    /// read for its address).
    fn log(mut self, log: Log) -> Self {
        self.child_options().log = log;
        self
    }

    /// `SEGPROP_LOG` (default `warn`).
    fn log_level(mut self, level: &str) -> Self {
        self.child_options().log_level = level.to_string();
        self
    }

    /// Removes every `SEGPROP_*` variable of this process from the child's environment, so
    /// only the settings given here reach it.
    fn only_own_segprop_env(mut self) -> Self {
        self.child_options().only_own_segprop_env = true;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_keeps_what_create_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("daemon.log");
        std::fs::write(&path, "old\n").unwrap();
        {
            use std::io::Write;
            let mut file = Log::Append(path.clone()).open().unwrap().unwrap();
            file.write_all(b"new\n").unwrap();
        }
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "old\nnew\n");
        Log::Create(path.clone()).open().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "");
        assert!(Log::Discard.open().unwrap().is_none());
    }

    #[test]
    fn a_dropped_process_is_killed_and_reaped() {
        let _spawning = crate::tests::SPAWNING.lock();
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        drop(Process(child));
        // Reaped: the pid has no /proc entry left (a zombie would keep it).
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
}
