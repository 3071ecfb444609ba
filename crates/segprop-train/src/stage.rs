//! The stage loop of Algorithm 1 (ICLR Alg. 1 / TMLR Alg. 1, the inner `while not exit` of
//! each stage): optimizer steps over the epoch's batches until the stage's exit criterion holds,
//! with evaluations, mid-stage checkpoints and cancellation. Which parameters a stage trains
//! and where its input comes from are the route's business ([`crate::route`]); how a step runs
//! (the whole model, or this rank's FSDP units) is the [`StageStep`]'s ([`crate::step`]), applied
//! from outside the loop. Commits, SnapCheck advances and the sequencing of stages are
//! [`crate::segprop`]'s.

use std::time::Instant;

use segprop_core::{ExitSpec, StagePlanEntry};

use segprop_model::Llama;

use crate::alloc;
use crate::data::Batch;
use crate::engine::{StageProgress, Trainer, count_params};
use crate::error::TrainError;
use crate::exit::ExitTracker;
use crate::metrics::{EvalRecord, StageRecord, StepRecord, TrainEvent, TrainObserver};
use crate::precision;
use crate::route::RouteInput;
use crate::schedule::LrSchedule;
use crate::step::{LocalStep, ShardedStep, StageStep};

impl<B: burn::tensor::backend::AutodiffBackend> Trainer<B> {
    /// Trains one stage until its exit criterion holds. Does not commit: the caller does.
    pub fn train_stage(
        &mut self,
        entry: &StagePlanEntry,
        exit: &ExitSpec,
        observer: &mut dyn TrainObserver,
    ) -> Result<StageRecord, TrainError> {
        let route = self.route(entry);
        let trainable = self.trainable(route);
        let trainable_params = match &self.shards {
            Some(shards) => shards.count_params(&trainable.all()),
            None => count_params(&self.model, &trainable.all()),
        };
        if self.shards.is_none() {
            // Mixed precision: fp32 masters for what this stage trains, 16 bits for the rest
            // (sharded units take this layout when the stage takes them).
            self.model = precision::set_layout(self.model.clone(), &trainable.all(), self.compute);
        }
        match route.input() {
            RouteInput::Prefix { depth } if self.shards.is_none() => self.freeze_prefix(depth),
            _ => self.frozen = None,
        }
        let accum = self.spec.optimizer.grad_accum;
        let micro = self.spec.micro_batch(&entry.name);
        if micro < self.spec.data.batch_size.get() {
            tracing::info!(
                stage = %entry.name,
                batch = self.spec.data.batch_size.get(),
                micro_batch = micro,
                "batches run in passes of {micro} sequences (gradients accumulated)"
            );
        }
        let steps_per_epoch = (self.data.train.len() / accum).max(1) as u64;
        let resume = self
            .resume
            .take()
            .filter(|r| r.progress.stage_index == entry.index);
        let resuming = resume.is_some();
        let (local_opt, mut at) = match resume {
            Some(r) => {
                tracing::info!(stage = %entry.name, step = r.progress.step, "stage resumes from a checkpoint");
                (r.local_optimizer, r.progress)
            }
            None => (
                self.new_optimizer(),
                StageProgress {
                    stage_index: entry.index,
                    step: 0,
                    epoch: 0,
                    chunk: 0,
                    tracker: ExitTracker::new(exit),
                    last_loss: f64::NAN,
                    last_eval: None,
                    wall_s: 0.0,
                },
            ),
        };
        // Parallelism is applied from outside the stage loop: the same loop runs the local and
        // the sharded step.
        let mut runner: Box<dyn StageStep<B>> = match &self.shard {
            Some(_) => Box::new(ShardedStep::new(
                self, route, &trainable, local_opt, resuming,
            )),
            None => Box::new(LocalStep::new(trainable, local_opt)),
        };
        let budget = at.tracker.step_budget(steps_per_epoch);
        let schedule = LrSchedule::new(
            self.spec.optimizer.lr,
            &self.spec.optimizer.schedule,
            budget,
        );
        observer.on_event(&TrainEvent::StageStarted {
            stage: entry.name.clone(),
            stage_index: entry.index,
            num_stages: self.plan.stages.len(),
            budget_steps: budget,
            trainable_params,
        });
        if let Some(cache) = &self.cache {
            tracing::debug!(stage = %entry.name, depths = ?cache.depths(), "stage starts");
        }
        alloc::reset_stage_peak();
        let peak_flops =
            crate::utilization::peak_flops::<B::InnerBackend>(&self.device, self.compute);
        let mut meter = crate::utilization::Meter::default();
        let started = Instant::now();
        let wall_before = at.wall_s;
        let tokens_per_step =
            (accum * self.spec.data.batch_size.get() * self.spec.data.seq_len) as u64;
        let mut checkpointed = at.step;
        // `eval.keep_best`: the model of the stage's best evaluation so far. Cloning a module
        // shares its tensors, so this holds one extra copy of what the stage trains, no more.
        // (Sharded stages are refused at validation.)
        let keep_best = self.spec.eval.keep_best && self.shard.is_none();
        if keep_best && resuming {
            tracing::warn!(
                stage = %entry.name,
                step = at.step,
                "eval.keep_best: the stage resumed from a checkpoint, so its best model is chosen \
                 among the evaluations from here on"
            );
        }
        let mut best: Option<(u64, f64, Llama<B>)> = None;
        let reason = 'train: loop {
            let order = self
                .data
                .epoch_order(self.spec.seed ^ ((entry.index as u64) << 32), at.epoch);
            for chunk in order.chunks_exact(accum).skip(at.chunk) {
                if self.gang_cancelled(observer.cancelled())? {
                    if at.step > checkpointed {
                        at.wall_s = wall_before + started.elapsed().as_secs_f64();
                        runner.save_checkpoint(self, &at)?;
                    }
                    runner.finish(self)?;
                    return Err(TrainError::Cancelled);
                }
                let batches: Vec<Batch> =
                    chunk.iter().map(|&i| self.data.train[i].clone()).collect();
                let refs: Vec<&Batch> = batches.iter().collect();
                let step_started = Instant::now();
                let lr = schedule.lr(at.step);
                meter.start();
                let (loss, grad_norm) = runner.step(self, route, &refs, micro, lr)?;
                let rate = meter.stop(peak_flops);
                if !loss.is_finite() {
                    return Err(TrainError::NonFiniteLoss {
                        stage: entry.name.clone(),
                        step: at.step + 1,
                        value: loss,
                    });
                }
                at.step += 1;
                at.chunk += 1;
                self.global_step += 1;
                at.last_loss = loss;
                observer.on_event(&TrainEvent::Step(StepRecord {
                    stage: entry.name.clone(),
                    stage_index: entry.index,
                    step: at.step,
                    global_step: self.global_step,
                    loss,
                    lr,
                    grad_norm,
                    tokens_per_s: tokens_per_step as f64 / step_started.elapsed().as_secs_f64(),
                    tflops: rate.tflops,
                    mfu: rate.mfu,
                }));
                let mut stop = None;
                if at.step % self.spec.eval.every_steps == 0 {
                    let eval_loss = runner.evaluate(self, route)?;
                    at.last_eval = Some((at.step, eval_loss));
                    self.emit_eval(
                        observer,
                        entry,
                        at.step,
                        eval_loss,
                        wall_before + started.elapsed().as_secs_f64(),
                    );
                    if keep_best && best.as_ref().is_none_or(|(_, b, _)| eval_loss < *b) {
                        best = Some((at.step, eval_loss, self.model.clone()));
                    }
                    stop = at.tracker.on_eval(eval_loss);
                }
                if stop.is_none() {
                    stop = at.tracker.on_step(at.step, at.epoch);
                }
                if let Some(reason) = stop {
                    break 'train reason;
                }
                let every = self.checkpointer.as_ref().map_or(0, |c| c.every_steps());
                if every > 0 && at.step % every == 0 {
                    at.wall_s = wall_before + started.elapsed().as_secs_f64();
                    runner.save_checkpoint(self, &at)?;
                    checkpointed = at.step;
                }
            }
            at.epoch += 1;
            at.chunk = 0;
            if let Some(reason) = at.tracker.on_step(at.step, at.epoch) {
                break reason;
            }
        };
        let step = at.step;
        let last_loss = at.last_loss;
        let last_eval = at.last_eval;
        let wall_s = wall_before + started.elapsed().as_secs_f64();
        let mut eval_loss = match last_eval {
            Some((at, loss)) if at == step => loss,
            _ => {
                let loss = runner.evaluate(self, route)?;
                self.emit_eval(observer, entry, step, loss, wall_s);
                loss
            }
        };
        let mut best_step = None;
        if let Some((best_at, best_loss, model)) = best
            && best_loss < eval_loss
        {
            tracing::info!(
                stage = %entry.name,
                best_step = best_at,
                best_eval_loss = best_loss,
                last_step = step,
                last_eval_loss = eval_loss,
                "eval.keep_best: the stage ends with the model of step {best_at}"
            );
            self.model = model;
            eval_loss = best_loss;
            best_step = Some(best_at);
        }
        // The stage's units go back to the trainer: whole modules, or this rank's shards when
        // the trainer keeps them sharded between stages.
        let sharding = runner.finish(self)?;
        let stage_rate = meter.total(peak_flops);
        let record = StageRecord {
            stage: entry.name.clone(),
            stage_index: entry.index,
            steps: step,
            exit_reason: reason,
            final_train_loss: last_loss,
            eval_loss,
            eval_ppl: eval_loss.exp(),
            best_step,
            wall_s,
            tokens: step * tokens_per_step,
            tokens_per_s: (step * tokens_per_step) as f64 / wall_s.max(1e-9),
            tflops: stage_rate.tflops,
            mfu: stage_rate.mfu,
            trainable_params,
            micro_batch: micro,
            peak_bytes: alloc::stage_peak_bytes().map(|b| b as u64),
            training_peak_bytes: alloc::stage_training_peak_bytes().map(|b| b as u64),
            snapshots: self.cache.as_ref().map(|c| c.stats()),
            sharding,
            tasks: Vec::new(),
        };
        // Scored after the stage's time and memory are taken: neither counts the scoring.
        let mut record = record;
        record.tasks = crate::tasks::score(self, route)?;
        observer.on_event(&TrainEvent::StageFinished(Box::new(record.clone())));
        Ok(record)
    }

    fn emit_eval(
        &self,
        observer: &mut dyn TrainObserver,
        entry: &StagePlanEntry,
        step: u64,
        eval_loss: f64,
        stage_wall_s: f64,
    ) {
        observer.on_event(&TrainEvent::Eval(EvalRecord {
            stage: entry.name.clone(),
            stage_index: entry.index,
            step,
            global_step: self.global_step,
            eval_loss,
            eval_ppl: eval_loss.exp(),
            stage_wall_s,
        }));
    }
}
