//! `segprop-worker serve` as a child process.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

use crate::process::{ChildCommand, ChildOptions, Process, Stdout};

/// How to start `segprop-worker serve`: a builder, like [`Command`](std::process::Command), with the settings of
/// [`ChildCommand`].
///
/// The child runs `serve --coordinator http://<addr> --name <name> --work-dir <dir>/<name>-work`
/// and the extra [`args`](Self::args), with `SEGPROP_TOKEN` and `SEGPROP_LOG`, then the
/// variables given with [`env`](ChildCommand::env); its stdout and stderr both go to its
/// [`Log`](crate::Log).
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    child: ChildOptions,
    coordinator_addr: String,
    name: String,
    work_dir: PathBuf,
    args: Vec<OsString>,
}

impl ChildCommand for WorkerCommand {
    fn child_options(&mut self) -> &mut ChildOptions {
        &mut self.child
    }
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
            child: ChildOptions::new(program.into(), token),
            coordinator_addr: coordinator_addr.to_string(),
            name: name.to_string(),
            work_dir: dir.join(format!("{name}-work")),
            args: Vec::new(),
        }
    }

    /// More `serve` arguments (after the harness's own).
    pub fn args<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// Starts the worker (it registers on its own; nothing waits for that).
    pub fn spawn(self) -> anyhow::Result<Process> {
        let child = self.child.spawn(Stdout::Log, |command| {
            command
                .args(["serve", "--coordinator"])
                .arg(format!("http://{}", self.coordinator_addr))
                .arg("--name")
                .arg(&self.name)
                .arg("--work-dir")
                .arg(&self.work_dir)
                .args(&self.args);
        })?;
        Ok(Process(child))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::Log;

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
