//! A child process that does not outlive its owner, and where its output goes.

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::process::{Child, Stdio};

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

    /// Where the child's stderr goes.
    pub(crate) fn stdio(&self) -> anyhow::Result<Stdio> {
        Ok(self.open()?.map_or_else(Stdio::null, Stdio::from))
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
