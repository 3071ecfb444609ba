//! What a running task shares with the heartbeat loop and the artifact store: the task's state
//! ([`TaskState`]: progress events, the newest checkpoint, the result), the engine observer that
//! streams progress ([`DaemonObserver`]), the checkpointer that stores mid-stage checkpoints
//! ([`StoreCheckpointer`]), and the stage's events as a JSON-lines file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use segprop_proto::v1 as pb;
use segprop_train::checkpoint::{self, Digest};
use segprop_train::engine::{AdamWOptimizer, Checkpointer, StageProgress};
use segprop_train::metrics::{RecordingObserver, TrainEvent, TrainObserver};
use segprop_train::{TrainError, Trainer};

use crate::artifacts::Artifacts;

/// What the training thread and the heartbeat loop share about the running task.
#[derive(Default)]
pub(crate) struct TaskState {
    pub(crate) events: Vec<pb::Progress>,
    pub(crate) checkpoint: Option<pb::CheckpointRef>,
    /// Newest checkpoint step the coordinator has accepted (checkpoints older than the one
    /// accepted before it are deleted).
    pub(crate) acked_step: u64,
    pub(crate) result: Option<Result<pb::TaskSucceeded, pb::TaskFailed>>,
}

pub(crate) fn lock(state: &Mutex<TaskState>) -> MutexGuard<'_, TaskState> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn lock_recorder(r: &Mutex<RecordingObserver>) -> MutexGuard<'_, RecordingObserver> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn events_path(checkpoint_dir: &Path) -> PathBuf {
    let mut name = checkpoint_dir
        .file_name()
        .unwrap_or_default()
        .to_os_string();
    name.push(".events.jsonl");
    checkpoint_dir.with_file_name(name)
}

pub(crate) fn write_events(path: &Path, events: &[TrainEvent]) -> Result<Digest, TrainError> {
    let mut text = String::new();
    for e in events {
        text.push_str(&serde_json::to_string(e).unwrap_or_default());
        text.push('\n');
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(TrainError::io(parent))?;
    }
    let tmp = path.with_extension("jsonl.partial");
    std::fs::write(&tmp, &text).map_err(TrainError::io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(TrainError::io(path))?;
    checkpoint::checksum_dir(path)
}

pub(crate) fn read_events(path: &Path) -> Result<Vec<TrainEvent>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| TrainError::State {
                path: path.to_path_buf(),
                message: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}

/// Streams engine events to the heartbeat loop and keeps them for the stage's metrics file.
pub(crate) struct DaemonObserver {
    pub(crate) stage_index: u32,
    pub(crate) recorder: Arc<Mutex<RecordingObserver>>,
    pub(crate) state: Arc<Mutex<TaskState>>,
    pub(crate) cancel: Arc<AtomicBool>,
}

impl TrainObserver for DaemonObserver {
    fn on_event(&mut self, event: &TrainEvent) {
        lock_recorder(&self.recorder).on_event(event);
        let progress = match event {
            TrainEvent::Step(s) => pb::Progress {
                task_index: self.stage_index,
                stage: s.stage.clone(),
                step: s.step,
                budget_steps: 0,
                global_step: s.global_step,
                loss: s.loss,
                lr: s.lr,
                eval_loss: None,
                tokens_per_s: s.tokens_per_s,
            },
            TrainEvent::Eval(e) => pb::Progress {
                task_index: self.stage_index,
                stage: e.stage.clone(),
                step: e.step,
                budget_steps: 0,
                global_step: e.global_step,
                loss: f64::NAN,
                lr: 0.0,
                eval_loss: Some(e.eval_loss),
                tokens_per_s: 0.0,
            },
            _ => return,
        };
        let budget = lock_recorder(&self.recorder)
            .events
            .iter()
            .rev()
            .find_map(|e| match e {
                TrainEvent::StageStarted { budget_steps, .. } => Some(*budget_steps),
                _ => None,
            })
            .unwrap_or(0);
        let mut state = lock(&self.state);
        state.events.push(pb::Progress {
            budget_steps: budget,
            ..progress
        });
        // A heartbeat that cannot get through must not grow memory without bound.
        if state.events.len() > 10_000 {
            state.events.drain(..5_000);
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// The name of the mid-stage checkpoint after `progress.step` steps.
pub(crate) fn checkpoint_name(progress: &StageProgress) -> String {
    segprop_store::layout::checkpoint_name(progress.step)
}

/// Writes mid-stage checkpoints to the artifact store and hands the newest to the heartbeat
/// loop: whole ones of a trainer that holds the model, sharded ones (every rank's file and the
/// manifest, written by the gang into [`Checkpointer::sharded_dir`]) of a gang.
pub(crate) struct StoreCheckpointer {
    pub(crate) artifacts: Artifacts,
    pub(crate) attempt_key: String,
    /// Where a checkpoint is written before it is stored.
    pub(crate) local_dir: PathBuf,
    pub(crate) every: u64,
    pub(crate) recorder: Arc<Mutex<RecordingObserver>>,
    pub(crate) state: Arc<Mutex<TaskState>>,
}

impl StoreCheckpointer {
    /// Stores the checkpoint written to `dir` with the events so far, then removes it here.
    fn store(
        &self,
        dir: &Path,
        digest: &Digest,
        progress: &StageProgress,
    ) -> Result<(), TrainError> {
        let key = segprop_store::layout::checkpoint_key(&self.attempt_key, progress.step);
        let events_file = events_path(dir);
        let events = lock_recorder(&self.recorder).events.clone();
        let events_digest = write_events(&events_file, &events)?;
        let store_error = |m: String| TrainError::Io {
            path: PathBuf::from(&key),
            source: std::io::Error::other(m),
        };
        // Events first: a checkpoint that exists always has its events.
        self.artifacts
            .put(
                &segprop_store::layout::events_key(&key),
                &events_file,
                &events_digest,
            )
            .map_err(store_error)?;
        let stored = self.artifacts.put(&key, dir, digest).map_err(store_error)?;
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_file(&events_file);
        tracing::debug!(step = progress.step, checkpoint = %key, "checkpoint stored");
        lock(&self.state).checkpoint = Some(pb::CheckpointRef {
            step: progress.step,
            artifact: Some((&stored).into()),
        });
        Ok(())
    }
}

impl<B: burn::tensor::backend::AutodiffBackend> Checkpointer<B> for StoreCheckpointer {
    fn every_steps(&self) -> u64 {
        self.every
    }

    fn save(
        &mut self,
        trainer: &Trainer<B>,
        local_optimizer: &AdamWOptimizer<B>,
        progress: &StageProgress,
    ) -> Result<(), TrainError> {
        let dir = self.local_dir.join(checkpoint_name(progress));
        let digest = checkpoint::save(trainer, Some((local_optimizer, progress)), &dir)?;
        self.store(&dir, &digest, progress)
    }

    fn sharded_dir(&self, progress: &StageProgress) -> Option<PathBuf> {
        Some(self.local_dir.join(checkpoint_name(progress)))
    }

    fn sharded_saved(
        &mut self,
        dir: &Path,
        digest: &Digest,
        progress: &StageProgress,
    ) -> Result<(), TrainError> {
        self.store(dir, digest, progress)
    }
}
