//! One assignment on the worker's training thread ([`TaskContext`]): train a stage (one rank,
//! or a gang of ranks in this process), advance SnapCheck snapshots, or export the model; with
//! its checkpoints, stage states and metrics in the artifact store.
//!
//! Artifact keys in the artifact store (`jobs/<job>/`), each with its `.manifest`
//! ([`segprop_store::artifact`]):
//! - `stages/<stage>/attempt-<epoch>/ckpt-<step>/` (+ `.events.jsonl`): mid-stage checkpoints
//!   (the newest accepted one and the one before it are kept);
//! - `stages/<stage>/attempt-<epoch>/state/` and `metrics.jsonl`: the state after the stage;
//! - `model/`, `metrics.jsonl`, `summary.json`, `summary.txt`, `loss.svg`: written by `export`.
//!
//! A corrupt or missing checkpoint to resume from falls back to the previous checkpoint, then to
//! the stage's input state (the stage restarts); a corrupt input state or metrics file fails the
//! task, naming the artifact and the file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use segprop_core::JobSpec;
use segprop_proto::v1 as pb;
use segprop_store::Store;
use segprop_train::checkpoint::{self, Digest};
use segprop_train::engine::{AdamWOptimizer, Checkpointer, StageProgress};
use segprop_train::metrics::{RecordingObserver, StageRecord, TrainEvent, TrainObserver};
use segprop_train::segprop::run_next_stage;
use segprop_train::{TrainError, Trainer};

use crate::artifacts::{self, Artifacts, FetchError};
use crate::snapshots::{self, SnapshotIo};

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

/// Everything the training thread needs.
pub(crate) struct TaskContext {
    pub(crate) artifacts: Artifacts,
    /// This attempt's key prefix in the artifact store.
    pub(crate) attempt_key: String,
    pub(crate) work_dir: PathBuf,
    pub(crate) backend: String,
    pub(crate) cancel: Arc<AtomicBool>,
    pub(crate) state: Arc<Mutex<TaskState>>,
    pub(crate) store: Store,
    pub(crate) runtime: tokio::runtime::Handle,
    pub(crate) snapshot_io: Arc<Mutex<SnapshotIo>>,
    /// This worker's name, recorded in task results.
    pub(crate) worker_name: String,
}

pub(crate) fn failed(err: &TrainError) -> pb::TaskFailed {
    let retryable = !matches!(
        err,
        TrainError::Spec(_)
            | TrainError::Corpus { .. }
            | TrainError::Checkpoint(_)
            | TrainError::NonFiniteLoss { .. }
            | TrainError::State { .. }
    );
    pb::TaskFailed {
        reason: err.to_string(),
        retryable,
    }
}

/// A task failure about an artifact that could not be stored or fetched.
pub(crate) fn artifact_failed(reason: String, retryable: bool) -> pb::TaskFailed {
    pb::TaskFailed { reason, retryable }
}

/// A task failure: an input state whose files are damaged (it has no earlier version).
fn damaged_input(m: String) -> pb::TaskFailed {
    artifact_failed(
        format!(
            "input state is damaged and has no earlier version: {m}; resubmit the job (or \
             restore the artifact store from a backup)"
        ),
        false,
    )
}

pub(crate) fn unknown_kind(a: &pb::Assignment) -> pb::TaskFailed {
    pb::TaskFailed {
        reason: format!("unknown task kind {}", a.kind),
        retryable: false,
    }
}

impl TaskContext {
    pub(crate) fn run(
        self: &Arc<Self>,
        a: &pb::Assignment,
    ) -> Result<pb::TaskSucceeded, pb::TaskFailed> {
        let spec = JobSpec::from_yaml_str(&a.spec_yaml, &format!("job {}", a.job_id))
            .map_err(|e| failed(&TrainError::Spec(e)))?;
        match self.backend.as_str() {
            // bf16/f16 run on flex, which has the 16-bit types (docs/adr/0003-cpu-backends.md).
            "cpu" if spec.resources.precision.is_half() => {
                self.run_on::<segprop_train::CpuHalfBackend>(spec, Default::default(), a)
            }
            "cpu" => self.run_on::<segprop_train::CpuBackend>(spec, Default::default(), a),
            #[cfg(feature = "cuda")]
            "cuda" => {
                if !segprop_train::cuda::cuda_available() {
                    return Err(failed(&TrainError::NoDevice {
                        backend: "cuda".into(),
                    }));
                }
                self.run_on::<segprop_train::cuda::CudaBackend>(spec, burn_cuda_device(), a)
            }
            other => Err(pb::TaskFailed {
                reason: format!("backend {other} is not built into this worker"),
                retryable: false,
            }),
        }
    }

    fn run_on<B: burn::tensor::backend::AutodiffBackend>(
        self: &Arc<Self>,
        spec: JobSpec,
        device: B::Device,
        a: &pb::Assignment,
    ) -> Result<pb::TaskSucceeded, pb::TaskFailed> {
        if let Some(world) = segprop_train::gang::gang_size(&spec) {
            // Units that stay sharded from the first byte read to the last written.
            return self.run_gang::<B>(spec, device, world, a);
        }
        let mut trainer =
            Trainer::<B>::new(spec, device.clone(), &self.work_dir).map_err(|e| failed(&e))?;
        let (recovered, _, recorder) =
            self.restore(a, &mut |dir| checkpoint::load(&mut trainer, dir, None))?;
        self.prepare(&mut trainer, a);
        match pb::TaskKind::try_from(a.kind) {
            Ok(pb::TaskKind::TrainStage) => self.train_stage(trainer, recorder, a, recovered),
            Ok(pb::TaskKind::AdvanceSnapshots) => self.advance(trainer, a),
            Ok(pb::TaskKind::Export) => self.export(&mut trainer, a),
            _ => Err(unknown_kind(a)),
        }
    }

    /// Task settings every rank's trainer takes: SnapCheck reads the stored snapshots of the
    /// committed prefix instead of recomputing it, and commits drop snapshots instead of
    /// advancing them (advance tasks do that).
    pub(crate) fn prepare<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        trainer: &mut Trainer<B>,
        a: &pb::Assignment,
    ) {
        trainer.advance_in_place = false;
        if a.snapshot_depth > 0
            && a.snapshot_shards > 0
            && pb::TaskKind::try_from(a.kind) != Ok(pb::TaskKind::Export)
            && trainer.cache.is_some()
        {
            let source = self.snapshot_source(trainer, a, a.snapshot_depth);
            if let Some(cache) = trainer.cache.as_mut() {
                cache.set_source(Box::new(source));
            }
            tracing::info!(
                depth = a.snapshot_depth,
                shards = a.snapshot_shards,
                complete = a.snapshots_complete,
                "reading snapshots from the store"
            );
        }
    }

    /// Fetches the task's starting point into the work directory and hands it to `check`,
    /// which loads it into a trainer or verifies it for the ranks of a gang to load: the
    /// checkpoint to resume from (with the events so far) or the stage's input state. A damaged
    /// or missing checkpoint falls back to the one before it, then to the input state (the
    /// stage restarts; training is deterministic, so the result is the same); the returned note
    /// says so. A damaged input state fails the task: it has no earlier version. Returns the
    /// note, the directory `check` accepted (`None`: the job's first stage) and the events.
    pub(crate) fn restore(
        &self,
        a: &pb::Assignment,
        check: &mut dyn FnMut(&Path) -> Result<(), TrainError>,
    ) -> Result<(Option<String>, Option<PathBuf>, RecordingObserver), pb::TaskFailed> {
        let mut recovered = None;
        let checkpoint_dir = self.work_dir.join("in/checkpoint");
        if let Some(resume) = a.resume_from.as_ref().and_then(|c| c.artifact.as_ref()) {
            let damage = match self.load_checkpoint(&resume.uri, Some(&resume.checksum), check) {
                Ok(events) => {
                    tracing::info!(checkpoint = %resume.uri, "resuming from checkpoint");
                    return Ok((None, Some(checkpoint_dir), RecordingObserver { events }));
                }
                Err(FetchError::Unavailable(m)) => return Err(artifact_failed(m, true)),
                Err(FetchError::Corrupt(m)) => m,
            };
            tracing::warn!(checkpoint = %resume.uri, error = %damage, "the checkpoint to resume from is damaged: falling back to an earlier one");
            let prefix = resume.uri.rsplit_once('/').map_or("", |(p, _)| p);
            let newest = artifacts::checkpoint_step(&resume.uri).unwrap_or(u64::MAX);
            let older = self
                .artifacts
                .checkpoints(prefix)
                .map_err(|m| artifact_failed(m, true))?;
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
                    FetchError::Unavailable(m) => artifact_failed(m, true),
                })?;
            check(&dir).map_err(|e| match e {
                TrainError::Resume { .. } => damaged_input(e.to_string()),
                e => failed(&e),
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
            .fetch(&format!("{key}.events.jsonl"), None, &events)?;
        let loaded = read_events(&events).map_err(|e| FetchError::Corrupt(e.to_string()))?;
        check(&dir).map_err(|e| FetchError::Corrupt(e.to_string()))?;
        Ok(loaded)
    }

    fn train_stage<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        mut trainer: Trainer<B>,
        recorder: RecordingObserver,
        a: &pb::Assignment,
        recovered: Option<String>,
    ) -> Result<pb::TaskSucceeded, pb::TaskFailed> {
        self.check_stage(&trainer, a).map_err(|e| failed(&e))?;
        let ran = self
            .run_stage(&mut trainer, recorder, a)
            .map_err(|e| failed(&e))?;
        let digest = checkpoint::save(&trainer, None, &self.state_dir()).map_err(|e| failed(&e))?;
        self.publish(&trainer, ran, &digest, a, recovered)
    }

    /// Whether the loaded state is where the task starts.
    pub(crate) fn check_stage<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        trainer: &Trainer<B>,
        a: &pb::Assignment,
    ) -> Result<(), TrainError> {
        let refuse = |message: String| TrainError::State {
            path: PathBuf::from(&self.attempt_key),
            message,
        };
        if segprop_train::segprop::plan_done(trainer) {
            return Err(refuse("the plan was already complete".into()));
        }
        if trainer.progress.next_stage != a.stage_index as usize {
            return Err(refuse(format!(
                "the input state is at stage {}, the task is stage {}",
                trainer.progress.next_stage, a.stage_index
            )));
        }
        Ok(())
    }

    /// Trains the task's stage with checkpoints to the store and progress to the heartbeat.
    pub(crate) fn run_stage<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        trainer: &mut Trainer<B>,
        recorder: RecordingObserver,
        a: &pb::Assignment,
    ) -> Result<(StageRecord, RecordingObserver), TrainError> {
        let recorder = Arc::new(Mutex::new(recorder));
        trainer.checkpointer = Some(Box::new(StoreCheckpointer {
            artifacts: self.artifacts.clone(),
            attempt_key: self.attempt_key.clone(),
            local_dir: self.checkpoints_dir(),
            every: a.checkpoint_every_steps,
            recorder: recorder.clone(),
            state: self.state.clone(),
        }));
        let mut observer = DaemonObserver {
            stage_index: a.task_index,
            recorder: recorder.clone(),
            state: self.state.clone(),
            cancel: self.cancel.clone(),
        };
        let record = run_next_stage(trainer, &mut observer);
        trainer.checkpointer = None;
        drop(observer);
        let record = record?.ok_or_else(|| TrainError::State {
            path: PathBuf::from(&self.attempt_key),
            message: "the plan was already complete".into(),
        })?;
        let recorder = Arc::try_unwrap(recorder)
            .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
            .unwrap_or_else(|shared| RecordingObserver {
                events: lock_recorder(&shared).events.clone(),
            });
        Ok((record, recorder))
    }

    /// Where mid-stage checkpoints are written before they are stored (every rank of a gang
    /// writes its file of a sharded one there).
    pub(crate) fn checkpoints_dir(&self) -> PathBuf {
        self.work_dir.join("checkpoints")
    }

    /// Where a stage writes its output state before it is stored.
    pub(crate) fn state_dir(&self) -> PathBuf {
        self.work_dir.join("out/state")
    }

    /// Stores the stage's output state (written to [`Self::state_dir`], whole or sharded) and
    /// metrics and builds the task's result.
    pub(crate) fn publish<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        trainer: &Trainer<B>,
        (record, recorder): (StageRecord, RecordingObserver),
        digest: &Digest,
        a: &pb::Assignment,
        recovered: Option<String>,
    ) -> Result<pb::TaskSucceeded, pb::TaskFailed> {
        let out = self.work_dir.join("out");
        let state_local = self.state_dir();
        let state = self
            .artifacts
            .put(&format!("{}/state", self.attempt_key), &state_local, digest)
            .map_err(|m| artifact_failed(m, true))?;
        let metrics_local = out.join("metrics.jsonl");
        let digest = write_events(&metrics_local, &recorder.events).map_err(|e| failed(&e))?;
        let metrics = self
            .artifacts
            .put(
                &format!("{}/metrics.jsonl", self.attempt_key),
                &metrics_local,
                &digest,
            )
            .map_err(|m| artifact_failed(m, true))?;
        let mut result = serde_json::to_value(&record).unwrap_or_default();
        if let Some(map) = result.as_object_mut() {
            if let Some(note) = recovered {
                map.insert("recovered".into(), note.into());
            }
            if trainer.cache.is_some() {
                let batches: Vec<_> = trainer
                    .snapshot_batches()
                    .iter()
                    .map(|(split, b)| (*split, b.id, b.batch * b.seq))
                    .collect();
                let bytes = snapshots::depth_bytes_estimate(
                    &batches,
                    trainer.config.hidden_size,
                    snapshots::storage_dtype(trainer.spec.segprop.snapshot_dtype),
                    a.snapshot_shards.max(1),
                    snapshots::batches_per_blob(&trainer.spec, trainer.config.hidden_size),
                );
                map.insert("snapshot_depth_bytes".into(), bytes.into());
            }
            let io = self
                .snapshot_io
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            map.insert(
                "snapshot_io".into(),
                serde_json::to_value(io).unwrap_or_default(),
            );
            map.insert("worker".into(), self.worker_name.clone().into());
        }
        Ok(pb::TaskSucceeded {
            artifacts: vec![state],
            result_json: result.to_string(),
            early_exit: trainer.progress.early_exit.is_some(),
            metrics: Some(metrics),
        })
    }

    pub(crate) fn export<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        trainer: &mut Trainer<B>,
        a: &pb::Assignment,
    ) -> Result<pb::TaskSucceeded, pb::TaskFailed> {
        let mut recorder = RecordingObserver::default();
        for (i, m) in a.stage_metrics.iter().enumerate() {
            let path = self.work_dir.join(format!("in/metrics-{i:03}.jsonl"));
            self.artifacts
                .fetch(&m.uri, Some(&m.checksum), &path)
                .map_err(|e| match e {
                    FetchError::Corrupt(m) => {
                        artifact_failed(format!("stage metrics are damaged: {m}"), false)
                    }
                    FetchError::Unavailable(m) => artifact_failed(m, true),
                })?;
            recorder
                .events
                .extend(read_events(&path).map_err(|e| failed(&e))?);
        }
        let out = self.work_dir.join("export");
        let wall_s: f64 = trainer.progress.records.iter().map(|r| r.wall_s).sum();
        let summary =
            segprop_train::run::finish_run(trainer, &out, &recorder, wall_s, Some(5_000_000_000))
                .map_err(|e| failed(&e))?;
        let mut events = recorder.events;
        events.push(TrainEvent::RunFinished(summary.clone()));
        write_events(&out.join("metrics.jsonl"), &events).map_err(|e| failed(&e))?;
        // Everything finish_run wrote (model/, summary.json, summary.txt, loss.svg) and the
        // job's metrics, each as its own artifact under the job's key.
        let mut names: Vec<_> = std::fs::read_dir(&out)
            .map_err(TrainError::io(&out))
            .map_err(|e| failed(&e))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let job_key = a.job_dir.trim_end_matches('/');
        let (mut model, mut metrics) = (None, None);
        for name in names {
            let local = out.join(&name);
            let digest = checkpoint::checksum_dir(&local).map_err(|e| failed(&e))?;
            let stored = self
                .artifacts
                .put(&format!("{job_key}/{name}"), &local, &digest)
                .map_err(|m| artifact_failed(m, true))?;
            match name.as_str() {
                "model" => model = Some(stored),
                "metrics.jsonl" => metrics = Some(stored),
                _ => {}
            }
        }
        let model = model.ok_or_else(|| artifact_failed("export wrote no model".into(), false))?;
        tracing::info!(model = %model.uri, store = self.artifacts.store.location(), eval_loss = summary.final_eval_loss, "model exported");
        Ok(pb::TaskSucceeded {
            artifacts: vec![model],
            result_json: serde_json::to_string(&summary).unwrap_or_default(),
            early_exit: false,
            metrics,
        })
    }
}

#[cfg(feature = "cuda")]
fn burn_cuda_device() -> burn::backend::cuda::CudaDevice {
    burn::backend::cuda::CudaDevice::new(0)
}

fn lock_recorder(r: &Mutex<RecordingObserver>) -> MutexGuard<'_, RecordingObserver> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

fn events_path(checkpoint_dir: &Path) -> PathBuf {
    let mut name = checkpoint_dir
        .file_name()
        .unwrap_or_default()
        .to_os_string();
    name.push(".events.jsonl");
    checkpoint_dir.with_file_name(name)
}

fn write_events(path: &Path, events: &[TrainEvent]) -> Result<Digest, TrainError> {
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

fn read_events(path: &Path) -> Result<Vec<TrainEvent>, TrainError> {
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
struct DaemonObserver {
    stage_index: u32,
    recorder: Arc<Mutex<RecordingObserver>>,
    state: Arc<Mutex<TaskState>>,
    cancel: Arc<AtomicBool>,
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
    format!("ckpt-{:08}", progress.step)
}

/// Writes mid-stage checkpoints to the artifact store and hands the newest to the heartbeat
/// loop: whole ones of a trainer that holds the model, sharded ones (every rank's file and the
/// manifest, written by the gang into [`Checkpointer::sharded_dir`]) of a gang.
struct StoreCheckpointer {
    artifacts: Artifacts,
    attempt_key: String,
    /// Where a checkpoint is written before it is stored.
    local_dir: PathBuf,
    every: u64,
    recorder: Arc<Mutex<RecordingObserver>>,
    state: Arc<Mutex<TaskState>>,
}

impl StoreCheckpointer {
    /// Stores the checkpoint written to `dir` with the events so far, then removes it here.
    fn store(
        &self,
        dir: &Path,
        digest: &Digest,
        progress: &StageProgress,
    ) -> Result<(), TrainError> {
        let key = format!("{}/{}", self.attempt_key, checkpoint_name(progress));
        let events_file = events_path(dir);
        let events = lock_recorder(&self.recorder).events.clone();
        let events_digest = write_events(&events_file, &events)?;
        let store_error = |m: String| TrainError::Io {
            path: PathBuf::from(&key),
            source: std::io::Error::other(m),
        };
        // Events first: a checkpoint that exists always has its events.
        self.artifacts
            .put(&format!("{key}.events.jsonl"), &events_file, &events_digest)
            .map_err(store_error)?;
        let stored = self.artifacts.put(&key, dir, digest).map_err(store_error)?;
        let _ = std::fs::remove_dir_all(dir);
        let _ = std::fs::remove_file(&events_file);
        tracing::debug!(step = progress.step, checkpoint = %key, "checkpoint stored");
        lock(&self.state).checkpoint = Some(pb::CheckpointRef {
            step: progress.step,
            artifact: Some(stored),
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
