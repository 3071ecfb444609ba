//! SnapCheck's advance step as a task (`advance_snapshots`): one shard of
//! `S[to] = F_{from:to}(S[from])` over the job's batches, stored blob by blob in the snapshot
//! store, by a trainer that holds the committed prefix whole or, for a sharded job, by every rank
//! of a gang (`gang_task.rs`); and the store reader a stage's SnapCheck uses for `S[depth]`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use burn::tensor::backend::AutodiffBackend;
use segprop_core::sched::{Advance, Artifact, Dispatch, Snapshots, TaskResult};
use segprop_store::SnapshotHeader;
use segprop_train::snapcheck::entry_values;
use segprop_train::{TrainError, Trainer};

use crate::error::TaskError;
use crate::snapshots::{self, StoreSource};
use crate::task::{Succeeded, TaskContext};

/// What an advance task wrote: batches in all, and how many were advanced from `S[from]` or
/// recomputed through the prefix.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Advanced {
    pub(crate) written: u64,
    pub(crate) advanced: u64,
    pub(crate) recomputed: u64,
}

impl TaskContext {
    /// The blob layout of the job's snapshots and a store reader for the stored `input`.
    pub(crate) fn snapshot_source<B: AutodiffBackend>(
        &self,
        trainer: &Trainer<B>,
        a: &Dispatch,
        input: &Snapshots,
    ) -> StoreSource {
        StoreSource::new(
            self.store.clone(),
            self.runtime.clone(),
            a.job_dir.clone(),
            SnapshotHeader {
                job: a.attempt.job_id.to_string(),
                depth: input.depth,
                fingerprint: input.fingerprint.clone(),
                dtype: snapshots::storage_dtype(trainer.spec.segprop.snapshot_dtype),
            },
            self.blob_plan(trainer, input.shards),
            input.complete,
            self.snapshot_io.clone(),
            self.cancel.clone(),
        )
    }

    /// The blobs of one depth in `shards` shards.
    fn blob_plan<B: AutodiffBackend>(
        &self,
        trainer: &Trainer<B>,
        shards: u32,
    ) -> Vec<snapshots::BlobPlan> {
        let ids: Vec<_> = trainer
            .snapshot_batches()
            .iter()
            .map(|(split, b)| (*split, b.id))
            .collect();
        let per_blob = snapshots::batches_per_blob(&trainer.spec, trainer.config.hidden_size);
        snapshots::blob_plan(&ids, shards, per_blob)
    }

    /// The blobs of SnapCheck's advance step this task writes (its shard), after checking
    /// that the loaded state can produce them.
    pub(crate) fn advance_blobs<B: AutodiffBackend>(
        &self,
        trainer: &Trainer<B>,
        a: &Dispatch,
        step: &Advance,
    ) -> Result<Vec<snapshots::BlobPlan>, TrainError> {
        let to = step.to as usize;
        let refuse = |message: String| TrainError::State {
            path: PathBuf::from(&self.attempt_key),
            message,
        };
        if trainer.committed_depth < to {
            return Err(refuse(format!(
                "the input state has committed depth {}, the task needs {to}",
                trainer.committed_depth
            )));
        }
        if trainer.cache.is_none() {
            return Err(refuse(
                "advance_snapshots for a job without SnapCheck".into(),
            ));
        }
        Ok(self
            .blob_plan(trainer, a.snapshots.shards)
            .into_iter()
            .filter(|b| b.shard == step.shard)
            .collect())
    }

    /// Encodes and stores one blob of `S[to]` (`outs`: each of its batches' snapshot and
    /// whether it was advanced rather than recomputed); counts it in the task's [`Advanced`].
    pub(crate) fn store_blob<B: AutodiffBackend>(
        &self,
        trainer: &mut Trainer<B>,
        a: &Dispatch,
        step: &Advance,
        blob: &snapshots::BlobPlan,
        outs: Vec<(burn::tensor::Tensor<B::InnerBackend, 3>, bool)>,
        done: &mut Advanced,
    ) -> Result<(), TrainError> {
        let header = SnapshotHeader {
            job: a.attempt.job_id.to_string(),
            depth: step.to,
            fingerprint: step.fingerprint.clone(),
            dtype: snapshots::storage_dtype(trainer.spec.segprop.snapshot_dtype),
        };
        let mut entries = Vec::with_capacity(blob.ids.len());
        for (id, (out, was_advanced)) in blob.ids.iter().zip(outs) {
            if was_advanced {
                done.advanced += 1;
            } else {
                done.recomputed += 1;
            }
            let values = entry_values(
                segprop_train::snapcheck::SnapshotKey {
                    depth: step.to as usize,
                    split: blob.split,
                    id: *id,
                },
                out,
            );
            entries.push(segprop_store::SnapshotEntry {
                split: snapshots::store_split(blob.split),
                id: *id as u64,
                shape: values.dims.to_vec(),
                data: values.values,
            });
        }
        let key = snapshots::blob_key(&a.job_dir, step.to, blob);
        let bytes =
            segprop_store::encode_snapshot(&header, &entries).map_err(|e| TrainError::State {
                path: PathBuf::from(&key),
                message: format!("cannot encode the snapshot blob: {e}"),
            })?;
        let len = bytes.len() as u64;
        self.runtime
            .block_on(self.store.put(&key, bytes.into()))
            .map_err(|e| TrainError::Io {
                path: PathBuf::from(&key),
                source: std::io::Error::other(format!("cannot store the snapshot blob: {e}")),
            })?;
        done.written += blob.ids.len() as u64;
        {
            let mut io = self.snapshot_io.lock().unwrap_or_else(|e| e.into_inner());
            io.blobs_written += 1;
            io.bytes_written += len;
        }
        // The blob of S[from] this one came from is no longer needed here.
        if let Some(cache) = trainer.cache.as_mut() {
            cache.drop_depth(step.from as usize);
        }
        Ok(())
    }

    /// The result of an advance task that wrote `done` (over every rank of a gang).
    pub(crate) fn advanced(
        &self,
        a: &Dispatch,
        step: &Advance,
        blobs: usize,
        done: Advanced,
    ) -> Succeeded {
        let io = self
            .snapshot_io
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        tracing::info!(
            depth = step.to,
            shard = step.shard,
            shards = a.snapshots.shards,
            blobs,
            batches = done.written,
            advanced = done.advanced,
            recomputed = done.recomputed,
            bytes = io.bytes_written,
            "snapshots stored"
        );
        let prefix = segprop_store::depth_prefix(&a.job_dir, step.to);
        Succeeded {
            outputs: vec![Artifact {
                uri: prefix,
                checksum: String::new(),
                bytes: io.bytes_written,
            }],
            result: TaskResult {
                snapshot_depth: Some(step.to),
                snapshot_batches: done.written,
                ..Default::default()
            },
            record_json: serde_json::json!({
                "depth": step.to,
                "shard": step.shard,
                "shards": a.snapshots.shards,
                "batches": done.written,
                "advanced": done.advanced,
                "recomputed": done.recomputed,
                "snapshot_io": io,
                "worker": self.worker_name,
            })
            .to_string(),
            early_exit: false,
            metrics: None,
        }
    }

    /// One shard of SnapCheck's advance step: `S[to] = F_{from:to}(S[from])` for this shard's
    /// batches (`from = 0`: the full prefix forward after stage 1), stored blob by blob.
    pub(crate) fn advance<B: AutodiffBackend>(
        &self,
        mut trainer: Trainer<B>,
        a: &Dispatch,
        step: &Advance,
    ) -> Result<Succeeded, TaskError> {
        let (from, to) = (step.from as usize, step.to as usize);
        let mine = self.advance_blobs(&trainer, a, step)?;
        let batches = trainer.snapshot_batches();
        let index = snapshots::batch_index(&batches);
        let mut done = Advanced::default();
        for blob in &mine {
            if self.cancel.load(Ordering::SeqCst) {
                return Err(TaskError::Cancelled);
            }
            let mut outs = Vec::with_capacity(blob.ids.len());
            for batch in snapshots::blob_batches(&index, blob)? {
                outs.push(trainer.advance_batch(from, to, blob.split, batch));
            }
            self.store_blob(&mut trainer, a, step, blob, outs, &mut done)?;
        }
        Ok(self.advanced(a, step, mine.len(), done))
    }
}
