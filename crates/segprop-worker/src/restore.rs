//! A task's starting point: the mid-stage checkpoint it resumes from (falling back to the one
//! before it, then to the stage's input state, when one is damaged) or the stage's input state,
//! fetched from the artifact store and checked before anything trains on it.

use std::path::{Path, PathBuf};

use segprop_train::TrainError;
use segprop_train::metrics::{RecordingObserver, TrainEvent};

use crate::artifacts::FetchError;
use crate::error::TaskError;
use crate::observe::{events_path, read_events};
use crate::task::TaskContext;
use segprop_core::sched::Dispatch;

/// A task failure: an input state whose files are damaged (it has no earlier version).
fn damaged_input(m: String) -> TaskError {
    TaskError::Damaged(format!(
        "input state is damaged and has no earlier version: {m}; resubmit the job (or restore \
         the artifact store from a backup)"
    ))
}

impl TaskContext {
    /// Fetches the task's starting point into the work directory and hands it to `check`,
    /// which loads it into a trainer or verifies it for the ranks of a gang to load: the
    /// checkpoint to resume from (with the events so far) or the stage's input state. A damaged
    /// or missing checkpoint falls back to the one before it, then to the input state (the
    /// stage restarts; training is deterministic, so the result is the same); the returned note
    /// says so. A damaged input state fails the task: it has no earlier version. Returns the
    /// note, the directory `check` accepted (`None`: the job's first stage) and the events.
    pub(crate) fn restore(
        &self,
        a: &Dispatch,
        check: &mut dyn FnMut(&Path) -> Result<(), TrainError>,
    ) -> Result<(Option<String>, Option<PathBuf>, RecordingObserver), TaskError> {
        let mut recovered = None;
        let checkpoint_dir = self.work_dir.join("in/checkpoint");
        if let Some(resume) = a.resume_from.as_ref().map(|c| &c.artifact) {
            let damage = match self.load_checkpoint(&resume.uri, Some(&resume.checksum), check) {
                Ok(events) => {
                    tracing::info!(checkpoint = %resume.uri, "resuming from checkpoint");
                    return Ok((None, Some(checkpoint_dir), RecordingObserver { events }));
                }
                Err(FetchError::Unavailable(m)) => return Err(TaskError::Unavailable(m)),
                Err(FetchError::Corrupt(m)) => m,
            };
            tracing::warn!(checkpoint = %resume.uri, error = %damage, "the checkpoint to resume from is damaged: falling back to an earlier one");
            let prefix = resume.uri.rsplit_once('/').map_or("", |(p, _)| p);
            let newest = segprop_store::layout::checkpoint_step(&resume.uri).unwrap_or(u64::MAX);
            let older = self
                .artifacts
                .checkpoints(prefix)
                .map_err(TaskError::Unavailable)?;
            for (step, key) in older.into_iter().filter(|(s, _)| *s < newest) {
                match self.load_checkpoint(&key, None, check) {
                    Ok(events) => {
                        let note = format!(
                            "checkpoint {} is damaged ({damage}); resumed from step {step} ({key})",
                            resume.uri
                        );
                        tracing::warn!("{note}");
                        return Ok((
                            Some(note),
                            Some(checkpoint_dir),
                            RecordingObserver { events },
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(checkpoint = %key, error = %e, "earlier checkpoint unusable too")
                    }
                }
            }
            let note = format!(
                "checkpoint {} is damaged ({damage}) and no earlier one is usable; the stage \
                 restarted from its input state",
                resume.uri
            );
            tracing::warn!("{note}");
            recovered = Some(note);
        }
        if let Some(input) = &a.input_state {
            let dir = self.work_dir.join("in/state");
            self.artifacts
                .fetch(&input.uri, Some(&input.checksum), &dir)
                .map_err(|e| match e {
                    FetchError::Corrupt(m) => damaged_input(m),
                    FetchError::Unavailable(m) => TaskError::Unavailable(m),
                })?;
            check(&dir).map_err(|e| match e {
                TrainError::Resume { .. } => damaged_input(e.to_string()),
                e => TaskError::from(e),
            })?;
            return Ok((recovered, Some(dir), RecordingObserver::default()));
        }
        Ok((recovered, None, RecordingObserver::default()))
    }

    /// Fetches the checkpoint `key` and its events, and hands the checkpoint to `check`;
    /// returns the events.
    fn load_checkpoint(
        &self,
        key: &str,
        expected: Option<&str>,
        check: &mut dyn FnMut(&Path) -> Result<(), TrainError>,
    ) -> Result<Vec<TrainEvent>, FetchError> {
        let dir = self.work_dir.join("in/checkpoint");
        self.artifacts.fetch(key, expected, &dir)?;
        let events = events_path(&dir);
        self.artifacts
            .fetch(&segprop_store::layout::events_key(key), None, &events)?;
        let loaded = read_events(&events).map_err(|e| FetchError::Corrupt(e.to_string()))?;
        check(&dir).map_err(|e| FetchError::Corrupt(e.to_string()))?;
        Ok(loaded)
    }
}
