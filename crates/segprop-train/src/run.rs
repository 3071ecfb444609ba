//! A whole job on the local machine: build the trainer, run the plan, export the final model and
//! write the run directory.
//!
//! Run directory layout:
//! - `job.yaml`: the resolved spec that ran;
//! - `metrics.jsonl`: one event per line (steps, evals, stage ends, the run summary);
//! - `summary.json`, and `summary.txt` (the table printed at the end);
//! - `loss.svg`: stage-concatenated train loss and held-out loss;
//! - `model/`: the final model in Hugging Face layout (`config.json` + `model.safetensors`, or
//!   shards + `model.safetensors.index.json` above 5 GB; a sharded job writes one file per unit);
//! - `checkpoints/stage<i>-step<n>/`: mid-stage checkpoints, with `checkpoint_every` (whole, or
//!   one file per rank and a manifest for a gang); `resume_from` continues from one.

use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use segprop_core::JobSpec;

use crate::engine::Trainer;
use crate::error::TrainError;
use crate::metrics::{
    JsonlWriter, RecordingObserver, RunSummary, TrainEvent, TrainObserver, summary_table,
};
use crate::plot::{Series, loss_curves_svg};
use crate::segprop::run_plan;

/// Process-level options of a local run (not part of the job spec).
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub out_dir: PathBuf,
    /// Shard the exported safetensors above this size (HF's usual is 5 GB).
    pub max_shard_bytes: Option<u64>,
    /// Save a mid-stage checkpoint every this many steps of a stage (0: none).
    pub checkpoint_every: u64,
    /// Continue from this checkpoint (one `checkpoint_every` wrote, for the same job).
    pub resume_from: Option<PathBuf>,
}

impl RunOptions {
    pub fn new(out_dir: impl Into<PathBuf>) -> Self {
        Self {
            out_dir: out_dir.into(),
            max_shard_bytes: Some(5_000_000_000),
            checkpoint_every: 0,
            resume_from: None,
        }
    }
}

/// Fans events out to several observers.
struct Fanout<'a> {
    observers: Vec<&'a mut dyn TrainObserver>,
}

impl TrainObserver for Fanout<'_> {
    fn on_event(&mut self, event: &TrainEvent) {
        for o in &mut self.observers {
            o.on_event(event);
        }
    }

    fn cancelled(&self) -> bool {
        self.observers.iter().any(|o| o.cancelled())
    }
}

/// Runs `spec` on `device` and writes the run directory. `observer` also receives every event.
pub fn run_job<B: AutodiffBackend>(
    spec: JobSpec,
    device: B::Device,
    options: &RunOptions,
    observer: &mut dyn TrainObserver,
) -> Result<RunSummary, TrainError> {
    let out = &options.out_dir;
    // A checkpoint that cannot resume this job is refused before anything is written.
    let gang = crate::gang::gang_size(&spec);
    if let Some(dir) = &options.resume_from {
        crate::checkpoint::preflight(dir, &spec, gang.is_some())?;
    }
    std::fs::create_dir_all(out).map_err(TrainError::io(out))?;
    let resolved = serde_yaml::to_string(&spec).unwrap_or_default();
    write(&out.join("job.yaml"), &resolved)?;
    let started = Instant::now();
    let work_dir = out.join("work");
    let checkpoints = LocalCheckpoints {
        every: options.checkpoint_every,
        dir: out.join("checkpoints"),
    };
    if let Some(dir) = &options.resume_from {
        tracing::info!(checkpoint = %dir.display(), "resuming");
    }
    let prepare = move |trainer: &mut Trainer<B>| -> Result<(), TrainError> {
        if checkpoints.every > 0 {
            trainer.checkpointer = Some(Box::new(checkpoints.clone()));
        }
        Ok(())
    };
    let summary = match gang {
        None => {
            let mut trainer = Trainer::<B>::new(spec, device, &work_dir)?;
            if let Some(dir) = &options.resume_from {
                crate::checkpoint::load(&mut trainer, dir, None)?;
            }
            prepare(&mut trainer)?;
            lead_run(&mut trainer, out, options, observer, started)?
        }
        Some(world) => {
            tracing::info!(
                ranks = world,
                strategy = ?spec.sharding.strategy,
                activation_checkpointing = spec.activation_checkpointing,
                "sharded run: one trainer per rank"
            );
            let devices = crate::gang::gang_devices::<B>(&device, world);
            let follower_prepare = prepare.clone();
            // Every rank reads its byte ranges of the checkpoint preflight verified.
            crate::gang::train_gang_from::<B, _>(
                &spec,
                devices,
                &work_dir,
                options.resume_from.as_deref(),
                |trainer| {
                    prepare(trainer)?;
                    lead_run(trainer, out, options, observer, started)
                },
                move |trainer| {
                    follower_prepare(trainer)?;
                    run_plan(trainer, &mut crate::metrics::NullObserver)?;
                    // The final evaluation and the export gather every unit on every rank.
                    trainer.follow_finish()
                },
            )?
        }
    };
    let _ = std::fs::remove_dir_all(&work_dir);
    Ok(summary)
}

/// Mid-stage checkpoints of a local run under `out/checkpoints/stage<i>-step<n>`: whole ones
/// by an unsharded trainer, sharded ones (one file per rank) by a gang.
#[derive(Clone)]
struct LocalCheckpoints {
    every: u64,
    dir: PathBuf,
}

impl LocalCheckpoints {
    fn path(&self, progress: &crate::engine::StageProgress) -> PathBuf {
        self.dir.join(format!(
            "stage{}-step{:06}",
            progress.stage_index, progress.step
        ))
    }
}

impl<B: AutodiffBackend> crate::engine::Checkpointer<B> for LocalCheckpoints {
    fn every_steps(&self) -> u64 {
        self.every
    }

    fn save(
        &mut self,
        trainer: &Trainer<B>,
        optimizer: &crate::engine::AdamWOptimizer<B>,
        progress: &crate::engine::StageProgress,
    ) -> Result<(), TrainError> {
        let dir = self.path(progress);
        let digest = crate::checkpoint::save(trainer, Some((optimizer, progress)), &dir)?;
        tracing::info!(checkpoint = %dir.display(), bytes = digest.bytes, "checkpoint saved");
        Ok(())
    }

    fn sharded_dir(&self, progress: &crate::engine::StageProgress) -> Option<PathBuf> {
        Some(self.path(progress))
    }

    fn sharded_saved(
        &mut self,
        dir: &Path,
        digest: &crate::checkpoint::Digest,
        _progress: &crate::engine::StageProgress,
    ) -> Result<(), TrainError> {
        tracing::info!(checkpoint = %dir.display(), bytes = digest.bytes, "sharded checkpoint saved");
        Ok(())
    }
}

/// Runs the plan on `trainer` (rank 0 of a gang, or the only trainer), writing the events, and
/// finishes the run directory.
fn lead_run<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    out: &Path,
    options: &RunOptions,
    observer: &mut dyn TrainObserver,
    started: Instant,
) -> Result<RunSummary, TrainError> {
    tracing::info!(
        job = %trainer.spec.name,
        regime = %trainer.spec.regime,
        params = trainer.config.num_params(),
        stages = trainer.plan.stages.len(),
        train_batches = trainer.data.train.len(),
        eval_batches = trainer.data.eval.len(),
        "job starts"
    );
    let mut jsonl = JsonlWriter::create(&out.join("metrics.jsonl"))
        .map_err(TrainError::io(out.join("metrics.jsonl")))?;
    let mut recorder = RecordingObserver::default();
    {
        let mut fanout = Fanout {
            observers: vec![&mut jsonl, &mut recorder, observer],
        };
        run_plan(trainer, &mut fanout)?;
    }
    let wall_s = started.elapsed().as_secs_f64();
    let summary = finish_run(trainer, out, &recorder, wall_s, options.max_shard_bytes)?;
    let event = TrainEvent::RunFinished(summary.clone());
    jsonl.on_event(&event);
    observer.on_event(&event);
    Ok(summary)
}

/// Ends a run whose plan is done: evaluates the final model (full forward), exports it to
/// `out/model` in Hugging Face layout, and writes `summary.json`, `summary.txt` and `loss.svg`
/// from the run's events. The worker's export task calls it with the events of every stage.
pub fn finish_run<B: AutodiffBackend>(
    trainer: &mut Trainer<B>,
    out: &Path,
    recorder: &RecordingObserver,
    wall_s: f64,
    max_shard_bytes: Option<u64>,
) -> Result<RunSummary, TrainError> {
    let final_eval_loss = trainer.final_eval()?;
    let tasks = crate::tasks::score(
        trainer,
        crate::route::Route::Full {
            num_layers: trainer.model.num_layers(),
        },
    )?;
    let model_dir = out.join("model");
    trainer.export_model(&model_dir, max_shard_bytes)?;
    let stages = trainer.progress.records.clone();
    let total_steps = stages.iter().map(|s| s.steps).sum();
    let tokens: u64 = stages.iter().map(|s| s.tokens).sum();
    let summary = RunSummary {
        job: trainer.spec.name.clone(),
        regime: trainer.spec.regime.to_string(),
        num_params: trainer.config.num_params(),
        stages,
        total_steps,
        wall_s,
        tokens_per_s: tokens as f64 / wall_s.max(1e-9),
        final_eval_loss,
        final_eval_ppl: final_eval_loss.exp(),
        final_num_layers: trainer.model.num_layers(),
        early_exit: trainer.progress.early_exit,
        model_dir: Some(model_dir),
        tasks,
    };
    write(
        &out.join("summary.json"),
        &serde_json::to_string_pretty(&summary).unwrap_or_default(),
    )?;
    write(&out.join("summary.txt"), &summary_table(&summary))?;
    write(&out.join("loss.svg"), &loss_plot(&summary, recorder))?;
    Ok(summary)
}

fn write(path: &Path, text: &str) -> Result<(), TrainError> {
    std::fs::write(path, text).map_err(TrainError::io(path))
}

/// The stage-concatenated loss curves of one run.
pub fn loss_plot(summary: &RunSummary, recorder: &RecordingObserver) -> String {
    let train: Vec<(f64, f64)> = recorder
        .steps()
        .iter()
        .map(|s| (s.global_step as f64, s.loss))
        .collect();
    let eval: Vec<(f64, f64)> = recorder
        .events
        .iter()
        .filter_map(|e| match e {
            TrainEvent::Eval(r) => Some((r.global_step as f64, r.eval_loss)),
            _ => None,
        })
        .collect();
    let mut boundaries = Vec::new();
    let mut at = 0u64;
    for stage in &summary.stages {
        boundaries.push((at as f64, stage.stage.clone()));
        at += stage.steps;
    }
    loss_curves_svg(
        &format!("{} ({}): loss by stage", summary.job, summary.regime),
        &[
            Series {
                label: "train loss".into(),
                points: train,
                markers: false,
            },
            Series {
                label: "held-out loss".into(),
                points: eval,
                markers: true,
            },
        ],
        &boundaries,
    )
}
