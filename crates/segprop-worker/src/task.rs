//! One assignment on the worker's training thread ([`TaskContext`]): train a stage (one rank,
//! or a gang of ranks in this process), advance SnapCheck snapshots, or export the model; with
//! its checkpoints, stage states and metrics in the artifact store.
//!
//! Artifacts go to the keys of [`segprop_store::layout`], each with its `.manifest`: an
//! attempt's mid-stage checkpoints (the newest accepted one and the one before it are kept) with
//! their events, its state and metrics after the stage, and the export's model and summaries.
//!
//! A corrupt or missing checkpoint to resume from falls back to the previous checkpoint, then to
//! the stage's input state (the stage restarts); a corrupt input state or metrics file fails the
//! task, naming the artifact and the file.
//!
//! Here: dispatch, the stage task of a trainer that holds the model, and the stage's result.
//! Beside it: `restore.rs` (the starting point), `advance.rs` (SnapCheck advances), `export.rs`
//! (the final model), `gang_task.rs` (every task of a sharded job, as a gang), `observe.rs`
//! (progress to the heartbeat, checkpoints to the store).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use segprop_core::JobSpec;
use segprop_core::sched::{Artifact, Dispatch, TaskResult, Work};
use segprop_store::Store;
use segprop_train::checkpoint::{self, Digest};
use segprop_train::metrics::{RecordingObserver, StageRecord};
use segprop_train::segprop::run_next_stage;
use segprop_train::{TrainError, Trainer};

use crate::artifacts::Artifacts;
use crate::error::TaskError;
use crate::observe::{DaemonObserver, StoreCheckpointer, TaskState, lock_recorder, write_events};
use crate::snapshots::{self, SnapshotIo};

/// What a task that succeeded reports.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Succeeded {
    /// `[0]`: the state after the stage, the stored depth, or the exported model.
    pub(crate) outputs: Vec<Artifact>,
    /// The stage's metrics.jsonl.
    pub(crate) metrics: Option<Artifact>,
    /// The stage record, for people and tools.
    pub(crate) record_json: String,
    /// What the coordinator reads of the record.
    pub(crate) result: TaskResult,
    /// The global exit criterion fired: the remaining training stages are not needed.
    pub(crate) early_exit: bool,
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

impl TaskContext {
    pub(crate) fn run(self: &Arc<Self>, a: &Dispatch) -> Result<Succeeded, TaskError> {
        let spec = JobSpec::from_yaml_str(&a.spec_yaml, &format!("job {}", a.attempt.job_id))
            .map_err(TrainError::Spec)?;
        match self.backend.as_str() {
            // bf16/f16 run on flex, which has the 16-bit types (docs/adr/0003-cpu-backends.md).
            "cpu" if spec.resources.precision.is_half() => {
                self.run_on::<segprop_train::CpuHalfBackend>(spec, Default::default(), a)
            }
            "cpu" => self.run_on::<segprop_train::CpuBackend>(spec, Default::default(), a),
            #[cfg(feature = "cuda")]
            "cuda" => {
                if !segprop_train::cuda::cuda_available() {
                    return Err(TrainError::NoDevice {
                        backend: "cuda".into(),
                    }
                    .into());
                }
                self.run_on::<segprop_train::cuda::CudaBackend>(spec, burn_cuda_device(), a)
            }
            other => Err(TaskError::Unsupported(format!(
                "backend {other} is not built into this worker"
            ))),
        }
    }

    fn run_on<B: burn::tensor::backend::AutodiffBackend>(
        self: &Arc<Self>,
        spec: JobSpec,
        device: B::Device,
        a: &Dispatch,
    ) -> Result<Succeeded, TaskError> {
        if let Some(world) = segprop_train::gang::gang_size(&spec) {
            // Units that stay sharded from the first byte read to the last written.
            return self.run_gang::<B>(spec, device, world, a);
        }
        let mut trainer = Trainer::<B>::new(spec, device.clone(), &self.work_dir)?;
        let (recovered, _, recorder) =
            self.restore(a, &mut |dir| checkpoint::load(&mut trainer, dir, None))?;
        self.prepare(&mut trainer, a);
        match &a.work {
            Work::TrainStage => self.train_stage(trainer, recorder, a, recovered),
            Work::Advance(step) => self.advance(trainer, a, step),
            Work::Export { stage_metrics } => self.export(&mut trainer, a, stage_metrics),
        }
    }

    /// Task settings every rank's trainer takes: SnapCheck reads the stored snapshots of the
    /// committed prefix instead of recomputing it, and commits drop snapshots instead of
    /// advancing them (advance tasks do that).
    pub(crate) fn prepare<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        trainer: &mut Trainer<B>,
        a: &Dispatch,
    ) {
        trainer.advance_in_place = false;
        if let Some(snapshots) = a.reads_snapshots()
            && trainer.cache.is_some()
        {
            let source = self.snapshot_source(trainer, a, snapshots);
            if let Some(cache) = trainer.cache.as_mut() {
                cache.set_source(Box::new(source));
            }
            tracing::info!(
                depth = snapshots.depth,
                shards = snapshots.shards,
                complete = snapshots.complete,
                "reading snapshots from the store"
            );
        }
    }

    fn train_stage<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        mut trainer: Trainer<B>,
        recorder: RecordingObserver,
        a: &Dispatch,
        recovered: Option<String>,
    ) -> Result<Succeeded, TaskError> {
        self.check_stage(&trainer, a)?;
        let ran = self.run_stage(&mut trainer, recorder, a)?;
        let digest = checkpoint::save(&trainer, None, &self.state_dir())?;
        self.publish(&trainer, ran, &digest, a, recovered)
    }

    /// Whether the loaded state is where the task starts.
    pub(crate) fn check_stage<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        trainer: &Trainer<B>,
        a: &Dispatch,
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
        a: &Dispatch,
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
            stage_index: a.attempt.task_index,
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
        a: &Dispatch,
        recovered: Option<String>,
    ) -> Result<Succeeded, TaskError> {
        let out = self.work_dir.join("out");
        let state_local = self.state_dir();
        let state = self
            .artifacts
            .put(
                &segprop_store::layout::stage_state(&self.attempt_key),
                &state_local,
                digest,
            )
            .map_err(TaskError::Unavailable)?;
        let metrics_local = out.join("metrics.jsonl");
        let digest = write_events(&metrics_local, &recorder.events)?;
        let metrics = self
            .artifacts
            .put(
                &segprop_store::layout::stage_metrics(&self.attempt_key),
                &metrics_local,
                &digest,
            )
            .map_err(TaskError::Unavailable)?;
        // SnapCheck: the size of one stored depth, which the coordinator's snapshot budget
        // reserves by before the first depth is measured.
        let snapshot_depth_bytes = trainer.cache.is_some().then(|| {
            let batches: Vec<_> = trainer
                .snapshot_batches()
                .iter()
                .map(|(split, b)| (*split, b.id, b.batch * b.seq))
                .collect();
            snapshots::depth_bytes_estimate(
                &batches,
                trainer.config.hidden_size,
                snapshots::storage_dtype(trainer.spec.segprop.snapshot_dtype),
                a.snapshots.shards.max(1),
                snapshots::batches_per_blob(&trainer.spec, trainer.config.hidden_size),
            )
        });
        let typed = TaskResult {
            steps: record.steps,
            eval_loss: Some(record.eval_loss),
            snapshot_depth_bytes,
            ..Default::default()
        };
        let mut result = serde_json::to_value(&record).unwrap_or_default();
        if let Some(map) = result.as_object_mut() {
            if let Some(note) = recovered {
                map.insert("recovered".into(), note.into());
            }
            if let Some(bytes) = snapshot_depth_bytes {
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
        Ok(Succeeded {
            outputs: vec![state],
            record_json: result.to_string(),
            result: typed,
            early_exit: trainer.progress.early_exit.is_some(),
            metrics: Some(metrics),
        })
    }
}

#[cfg(feature = "cuda")]
fn burn_cuda_device() -> burn::backend::cuda::CudaDevice {
    burn::backend::cuda::CudaDevice::new(0)
}
