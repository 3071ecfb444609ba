//! Tasks of a sharded job (`sharding.strategy: full_shard`, or activation checkpointing) run as
//! a gang of ranks in this process whose units stay sharded from the first byte read to the last
//! written (DESIGN §3, "invariants of the scale path"): no rank and no process holds the model
//! whole, between stages either.
//!
//! - A task's starting point (the stage's input state, or the mid-stage checkpoint it resumes)
//!   is a sharded checkpoint: one file per rank and a manifest (`checkpoint::save_sharded`). It is
//!   fetched and verified once for the gang (every rank file against its checksum; a damaged
//!   checkpoint falls back to the one before it), then each rank lays its units out blank and
//!   reads only the byte ranges of its chunks (`Trainer::resume_sharded`, at any world size).
//!   The first stage starts from the seeded init or the streamed HF import instead.
//! - `train_stage`: rank 0 reports and stores; every rank writes its file of each mid-stage
//!   checkpoint and of the output state.
//! - `advance_snapshots`: the task's blobs are dealt out to the ranks; each round, every rank
//!   gathers one unit at a time and runs its own blob through it, and stores it.
//! - `export`: every rank gathers one unit at a time; rank 0 writes it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use burn::tensor::backend::AutodiffBackend;
use segprop_core::JobSpec;
use segprop_core::sched::{Advance, Dispatch, Work};
use segprop_train::checkpoint;
use segprop_train::engine::{AdamWOptimizer, Checkpointer, StageProgress};
use segprop_train::gang;
use segprop_train::metrics::{TrainEvent, TrainObserver};
use segprop_train::segprop::run_next_stage;
use segprop_train::{TrainError, Trainer};

use crate::advance::Advanced;
use crate::error::TaskError;
use crate::observe::checkpoint_name;
use crate::snapshots;
use crate::task::{Succeeded, TaskContext};

/// What the leader of a gang task hands back: the task's result.
type Outcome = Result<Succeeded, TaskError>;

impl TaskContext {
    /// Runs the assignment `a` of a sharded job on a gang of `world` ranks, one per device
    /// from `device` on (CPU ranks are threads). A rank that stops answering fails every
    /// rank's next collective within `sharding.collective_timeout_s`, naming it, and the task
    /// fails retryably: the coordinator retries it from its last checkpoint.
    pub(crate) fn run_gang<B: AutodiffBackend>(
        self: &Arc<Self>,
        spec: JobSpec,
        device: B::Device,
        world: usize,
        a: &Dispatch,
    ) -> Outcome {
        // Verified here once; the ranks then read only their own byte ranges.
        let (recovered, loaded, recorder) = self.restore(a, &mut |dir| {
            checkpoint::preflight(dir, &spec, true).map_err(|e| match e {
                TrainError::Resume { path, message } => TrainError::State { path, message },
                e => e,
            })
        })?;
        let devices = gang::gang_devices::<B>(&device, world);
        tracing::info!(
            ranks = world,
            task = a.kind_name(),
            from_state = loaded.is_some(),
            activation_checkpointing = spec.activation_checkpointing,
            prefetch = spec.sharding.prefetch,
            deadline_s = spec.sharding.collective_timeout_s,
            "sharded task: one trainer per rank, units never whole"
        );
        let leader = |trainer: &mut Trainer<B>| -> Result<Outcome, TrainError> {
            self.prepare(trainer, a);
            match &a.work {
                Work::TrainStage => {
                    self.check_stage(trainer, a)?;
                    let ran = self.run_stage(trainer, recorder, a)?;
                    let digest = checkpoint::save_sharded(trainer, None, &self.state_dir())?;
                    Ok(self.publish(trainer, ran, &digest, a, recovered))
                }
                Work::Advance(step) => {
                    let (blobs, done) = self.advance_rank(trainer, a, step)?;
                    Ok(Ok(self.advanced(a, step, blobs, done)))
                }
                Work::Export { stage_metrics } => Ok(self.export(trainer, a, stage_metrics)),
            }
        };
        let follower = {
            let (ctx, a) = (self.clone(), a.clone());
            let fault = crate::fault::StallRank::from_env();
            move |trainer: &mut Trainer<B>| -> Result<(), TrainError> {
                ctx.prepare(trainer, &a);
                match &a.work {
                    Work::TrainStage => {
                        ctx.check_stage(trainer, &a)?;
                        let rank = trainer.shard.as_ref().map_or(0, |s| s.rank());
                        trainer.checkpointer = Some(Box::new(FollowerCheckpointer {
                            every: a.checkpoint_every_steps,
                            dir: ctx.checkpoints_dir(),
                        }));
                        let mut observer = FollowerObserver {
                            cancel: ctx.cancel.clone(),
                            fault: fault.clone().filter(|f| f.rank == rank),
                            steps: 0,
                        };
                        run_next_stage(trainer, &mut observer)?;
                        trainer.checkpointer = None;
                        checkpoint::save_sharded(trainer, None, &ctx.state_dir())?;
                    }
                    Work::Advance(step) => {
                        ctx.advance_rank(trainer, &a, step)?;
                    }
                    Work::Export { .. } => trainer.follow_finish()?,
                }
                Ok(())
            }
        };
        // Each rank's trainer works in `ranks/rank<r>` (its SnapCheck spill); the task's
        // inputs, outputs and checkpoints stay in the task's directory.
        let ran = gang::train_gang_from::<B, _>(
            &spec,
            devices,
            &self.work_dir.join("ranks"),
            loaded.as_deref(),
            leader,
            follower,
        );
        ran.map_err(|e| {
            // Releases a follower still stalled by the fault injection (it watches the flag).
            self.cancel.store(true, Ordering::SeqCst);
            TaskError::from(e)
        })?
    }

    /// This rank's part of a gang's SnapCheck advance (every rank calls it): the task's blobs
    /// are dealt out round by round (blob `round * world + rank`), each round runs every rank's
    /// blob through the units gathered one at a time, and each rank stores its own. Returns the
    /// task's blob count and what the whole gang wrote.
    fn advance_rank<B: AutodiffBackend>(
        &self,
        trainer: &mut Trainer<B>,
        a: &Dispatch,
        step: &Advance,
    ) -> Result<(usize, Advanced), TrainError> {
        let (from, to) = (step.from as usize, step.to as usize);
        let blobs = self.advance_blobs(trainer, a, step)?;
        let batches = trainer.snapshot_batches();
        let index = snapshots::batch_index(&batches);
        let (rank, world) = trainer
            .shard
            .as_ref()
            .map(|s| (s.rank(), s.world()))
            .expect("a gang's trainer has a shard rank");
        let mut done = Advanced::default();
        for round in 0..blobs.len().div_ceil(world) {
            // Every rank stops at the same round, so none waits in a gather for one that left.
            if trainer.gang_cancelled(self.cancel.load(Ordering::SeqCst))? {
                return Err(TrainError::Cancelled);
            }
            let blob = blobs.get(round * world + rank);
            let mine = match blob {
                Some(blob) => snapshots::blob_batches(&index, blob)?
                    .into_iter()
                    .map(|b| (blob.split, b))
                    .collect(),
                None => Vec::new(),
            };
            let outs = trainer.advance_batches_sharded(from, to, &mine)?;
            if let Some(blob) = blob {
                self.store_blob(trainer, a, step, blob, outs, &mut done)?;
            }
        }
        let sums = trainer.sum_over_ranks(&[done.written, done.advanced, done.recomputed])?;
        Ok((
            blobs.len(),
            Advanced {
                written: sums[0],
                advanced: sums[1],
                recomputed: sums[2],
            },
        ))
    }
}

/// The observer of a follower rank: reports nothing (rank 0 reports for the gang), shares the
/// task's cancel flag, and carries the fault injected for tests, if any.
struct FollowerObserver {
    cancel: Arc<std::sync::atomic::AtomicBool>,
    fault: Option<crate::fault::StallRank>,
    steps: u64,
}

impl TrainObserver for FollowerObserver {
    fn on_event(&mut self, event: &TrainEvent) {
        if let TrainEvent::Step(_) = event {
            self.steps += 1;
            if let Some(fault) = &self.fault {
                fault.maybe_stall(self.steps, &self.cancel);
            }
        }
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
}

/// A follower rank writes its own file of every sharded checkpoint into the directory rank 0
/// stores (`dir`, the task's checkpoint directory), at rank 0's interval.
struct FollowerCheckpointer {
    every: u64,
    dir: PathBuf,
}

impl<B: AutodiffBackend> Checkpointer<B> for FollowerCheckpointer {
    fn every_steps(&self) -> u64 {
        self.every
    }

    fn save(
        &mut self,
        _trainer: &Trainer<B>,
        _local_optimizer: &AdamWOptimizer<B>,
        _progress: &StageProgress,
    ) -> Result<(), TrainError> {
        // Whole checkpoints are rank 0's alone; a gang's trainers save sharded ones.
        Ok(())
    }

    fn sharded_dir(&self, progress: &StageProgress) -> Option<PathBuf> {
        Some(self.dir.join(checkpoint_name(progress)))
    }
}
