//! `segprop-coord serve` as a child process, and the job CLI pointed at it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::process::{ChildCommand, ChildOptions, Log, Stdout};

/// What `segprop-coord serve` prints on stdout once it listens, before the address.
const LISTENING: &str = "coordinator listening on ";

/// How long a coordinator may take to print its address.
const STARTUP_LIMIT: Duration = Duration::from_secs(120);

/// How to start `segprop-coord serve`: a builder, like [`Command`], with the settings of
/// [`ChildCommand`].
///
/// The child gets `SEGPROP_TOKEN`, `SEGPROP_LISTEN`, `SEGPROP_STATE_DIR` (`<dir>/state`),
/// `SEGPROP_ARTIFACT_ROOT` (`<dir>/artifacts`) and `SEGPROP_LOG`, then the variables given
/// with [`env`](ChildCommand::env) (which override those), stdin from `/dev/null` and stdout
/// to a pipe that [`spawn`](Self::spawn) reads the address from.
#[derive(Clone, Debug)]
pub struct CoordinatorCommand {
    child: ChildOptions,
    dir: PathBuf,
    listen: String,
    config: Option<PathBuf>,
}

impl ChildCommand for CoordinatorCommand {
    fn child_options(&mut self) -> &mut ChildOptions {
        &mut self.child
    }
}

impl CoordinatorCommand {
    /// The coordinator binary `program` with its state and artifacts under `dir`, accepting
    /// `token`; by default on `127.0.0.1:0` (a free port), with its log discarded.
    pub fn new(program: impl Into<PathBuf>, dir: impl Into<PathBuf>, token: &str) -> Self {
        Self {
            child: ChildOptions::new(program.into(), token),
            dir: dir.into(),
            listen: "127.0.0.1:0".to_string(),
            config: None,
        }
    }

    /// The address to listen on (`SEGPROP_LISTEN`): port 0 picks a free one; a restarted
    /// coordinator is given its predecessor's address.
    pub fn listen(mut self, addr: &str) -> Self {
        self.listen = addr.to_string();
        self
    }

    /// `serve --config <path>` (the environment still overrides the file).
    pub fn config(mut self, path: impl Into<PathBuf>) -> Self {
        self.config = Some(path.into());
        self
    }

    /// Starts the coordinator and waits until it prints the address it listens on.
    pub fn spawn(self) -> anyhow::Result<Coordinator> {
        let mut child = self.child.spawn(Stdout::Piped, |command| {
            command.arg("serve");
            if let Some(config) = &self.config {
                command.arg("--config").arg(config);
            }
            command
                .env("SEGPROP_LISTEN", &self.listen)
                .env("SEGPROP_STATE_DIR", self.dir.join("state"))
                .env("SEGPROP_ARTIFACT_ROOT", self.dir.join("artifacts"));
        })?;
        let stdout = child.stdout.take();
        let ChildOptions {
            program,
            token,
            log,
            ..
        } = self.child;
        // Owned from here: a coordinator that prints no address is killed on the way out.
        let mut coordinator = Coordinator {
            child,
            addr: String::new(),
            program,
            token,
        };
        let line = first_line(stdout, STARTUP_LIMIT)?;
        coordinator.addr = listen_address(&line)
            .with_context(|| {
                let log = match &log {
                    Log::Create(path) | Log::Append(path) => format!(" (log: {})", path.display()),
                    Log::Discard => String::new(),
                };
                format!("unexpected coordinator output {line:?}{log}")
            })?
            .to_string();
        Ok(coordinator)
    }
}

/// The address in the line `segprop-coord serve` prints once it listens.
pub fn listen_address(line: &str) -> Option<&str> {
    line.trim()
        .strip_prefix(LISTENING)
        .filter(|addr| !addr.is_empty())
}

/// The first line of a child's stdout; "" when it closes without one. Read on a thread so a
/// child that never prints cannot hang the caller past `limit`.
fn first_line(
    stdout: Option<std::process::ChildStdout>,
    limit: Duration,
) -> anyhow::Result<String> {
    let stdout = stdout.context("the coordinator's stdout is not piped")?;
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = BufReader::new(stdout).read_line(&mut line).map(|_| line);
        let _ = sender.send(read);
    });
    match receiver.recv_timeout(limit) {
        Ok(read) => read.context("cannot read the coordinator's output"),
        Err(_) => bail!(
            "the coordinator printed no address within {} s",
            limit.as_secs()
        ),
    }
}

/// A running `segprop-coord serve`, SIGKILLed and reaped on drop.
#[derive(Debug)]
pub struct Coordinator {
    /// The process (its stdout is closed once the address is read).
    pub child: Child,
    /// The address it listens on (`127.0.0.1:<port>`).
    pub addr: String,
    program: PathBuf,
    token: String,
}

impl Drop for Coordinator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Coordinator {
    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The job CLI (`segprop-coord`, the binary it runs) pointed at it, sending `token`, with
    /// warnings-only logs; add the arguments.
    pub fn cli(&self, token: &str) -> Command {
        let mut command = Command::new(&self.program);
        command
            .env("SEGPROP_COORDINATOR", self.url())
            .env("SEGPROP_TOKEN", token)
            .env("SEGPROP_LOG", "warn");
        command
    }

    /// Submits the job spec at `spec` through `segprop-coord submit`; the job's id.
    pub fn submit(&self, spec: &Path) -> anyhow::Result<String> {
        let out = self
            .cli(&self.token)
            .arg("submit")
            .arg(spec)
            .output()
            .with_context(|| format!("cannot run {}", self.program.display()))?;
        if !out.status.success() {
            bail!(
                "submit {} failed: {}",
                spec.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if id.is_empty() {
            bail!("submit {} printed no job id", spec.display());
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_read_from_the_listening_line() {
        assert_eq!(
            listen_address("coordinator listening on 127.0.0.1:4567\n"),
            Some("127.0.0.1:4567")
        );
        assert_eq!(listen_address(""), None);
        assert_eq!(listen_address("coordinator listening on \n"), None);
        assert_eq!(listen_address("error: no token configured\n"), None);
    }

    #[test]
    fn a_coordinator_that_prints_no_address_is_an_error() {
        // A shell script stands in for the binary.
        let _spawning = crate::tests::SPAWNING.lock();
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-coord");
        std::fs::write(
            &script,
            "#!/bin/sh\necho \"listening as $SEGPROP_LISTEN with $SEGPROP_TOKEN\"\n",
        )
        .unwrap();
        make_executable(&script);
        let err = CoordinatorCommand::new(&script, dir.path(), "t0k")
            .spawn()
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("listening as 127.0.0.1:0 with t0k"),
            "{err:#}"
        );
    }

    #[test]
    fn the_printed_address_and_settings_reach_the_caller() {
        let _spawning = crate::tests::SPAWNING.lock();
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("fake-coord");
        std::fs::write(
            &script,
            "#!/bin/sh\necho \"coordinator listening on $SEGPROP_LISTEN\"\n\
             echo \"$1 $2 $SEGPROP_STATE_DIR $SEGPROP_LOG $EXTRA\" >&2\nexec sleep 30\n",
        )
        .unwrap();
        make_executable(&script);
        let log = dir.path().join("coordinator.log");
        let coord = CoordinatorCommand::new(&script, dir.path(), "t0k")
            .listen("127.0.0.1:9")
            .config("c.yaml")
            .env("SEGPROP_LOG", "debug")
            .env("EXTRA", "x")
            .log(Log::Create(log.clone()))
            .log_level("info")
            .spawn()
            .unwrap();
        assert_eq!(coord.addr, "127.0.0.1:9");
        assert_eq!(coord.url(), "http://127.0.0.1:9");
        let expected = format!(
            "serve --config {} debug x\n",
            dir.path().join("state").display()
        );
        let started = std::time::Instant::now();
        while std::fs::read_to_string(&log).unwrap() != expected {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "log never written"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn make_executable(path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}
