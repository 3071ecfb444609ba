//! The peak heap of a whole sharded job, for the "never whole" invariant (issue 18,
//! docs/benchmarks.md "Never whole"): an HF import, every SegProp stage with its commit and
//! SnapCheck advance, mid-stage checkpoints and the export, run by a gang of CPU ranks in this
//! process, with the counting allocator's whole-run high-water mark
//! ([`alloc::run_peak_bytes`]). Two layouts of the same job side by side:
//! - [`Layout::Whole`] (before): every rank imports the model whole, shards it per stage and
//!   gathers it back at each stage end; rank 0 checkpoints and exports it whole;
//! - [`Layout::NeverWhole`]: [`Trainer::new_sharded`], units sharded from the import to the
//!   export;
//! - [`Layout::StageTasks`]: the same job as a worker daemon runs it, a gang per task with
//!   sharded stage states between them.
//!
//! Beside each peak: what the ranks account for ([`JobPeak::accounted_bytes`]): their shards,
//! masters, moments and gradient shards, the gathered units the schedule allows, the saved
//! activations, their snapshots and their data.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use burn::tensor::backend::AutodiffBackend;
use segprop_core::JobSpec;

use crate::alloc;
use crate::checkpoint;
use crate::engine::{AdamWOptimizer, Checkpointer, StageProgress, Trainer};
use crate::error::TrainError;
use crate::gang;
use crate::metrics::{NullObserver, StageRecord};
use crate::segprop::run_plan;

/// How the ranks hold the model between stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Each rank holds the model whole between stages (the engine before issue 18).
    Whole,
    /// Units sharded from the first byte read to the last written.
    NeverWhole,
    /// As a worker daemon runs the job: each stage a gang of its own that continues from the
    /// previous stage's sharded state (`gang::train_gang_from`) and writes its own
    /// (`checkpoint::save_sharded` between stages), then an export gang from the last state.
    StageTasks,
}

/// What one whole job held at its peak.
#[derive(Debug, Clone)]
pub struct JobPeak {
    pub world: usize,
    pub layout: Layout,
    /// The process's heap high-water mark over the job, above what it held before.
    pub peak_bytes: u64,
    /// The sum over ranks of what each accounts for at its heaviest stage.
    pub accounted_bytes: u64,
    /// The planner's prediction of the peak: `world ×` the heaviest stage's
    /// [`segprop_core::planner::cpu_gang_step`].
    pub predicted_bytes: u64,
    /// The model's weights in fp32 (one whole copy).
    pub model_bytes: u64,
    /// Rank 0's stage records.
    pub stages: Vec<StageRecord>,
}

/// The job: a 4-block model wide enough that weights dominate, imported from an HF checkpoint,
/// trained with SegProp (stage 1 and three segments of 3 steps, SnapCheck, head policy reset),
/// checkpointed every 2 steps and exported.
pub fn job_spec(world: usize, hf_dir: &Path) -> JobSpec {
    let yaml = format!(
        "version: 1
name: never-whole
model: {{ from: {{ hf_dir: {hf} }} }}
data: {{ corpus: builtin:synthetic, seq_len: 16, batch_size: 2, synthetic_tokens: 3000, eval_fraction: 0.1 }}
regime: segprop
segprop:
  base_depth: 1
  head_layers: 1
  segment_size: 1
  snapcheck: true
  head_policy: reset
  exit: {{ stage1: {{ max_steps: 3 }}, segment: {{ max_steps: 3 }} }}
optimizer: {{ lr: 1.0e-3, grad_accum: 4 }}
eval: {{ every_steps: 3, max_batches: 2 }}
activation_checkpointing: true
sharding: {{ strategy: full_shard }}
resources: {{ devices_per_gang: {world} }}
seed: 5
",
        hf = hf_dir.display()
    );
    JobSpec::from_yaml_str(&yaml, "never-whole.yaml").expect("the probe's job is valid")
}

/// The probe's model: 4 blocks of hidden 256, intermediate 768, vocabulary 4096 (3.1M weights,
/// 12.6 MB in fp32).
pub fn job_model() -> segprop_core::LlamaConfig {
    let mut config = segprop_core::LlamaConfig::preset("tiny").expect("tiny exists");
    config.vocab_size = 4096;
    config.hidden_size = 256;
    config.intermediate_size = 768;
    config.num_heads = 4;
    config.num_kv_heads = 4;
    config.num_layers = 4;
    config
}

/// Writes the probe's model as an HF checkpoint into `dir` (seeded; before the measurement).
pub fn write_model(dir: &Path) -> Result<(), TrainError> {
    let config = job_model();
    let model =
        segprop_model::LlamaInit::random::<crate::CpuBackend>(&config, 9, &Default::default());
    segprop_model::hf::export(&model, &config, dir, None, segprop_core::Precision::F32)?;
    Ok(())
}

/// Mid-stage checkpoints of the probe: whole ones by rank 0 (layout `Whole`), sharded ones by
/// every rank (`NeverWhole`), each replacing the last.
#[derive(Clone)]
struct Checkpoints {
    dir: PathBuf,
    leader: bool,
    saved: Arc<Mutex<u64>>,
}

impl<B: AutodiffBackend> Checkpointer<B> for Checkpoints {
    fn every_steps(&self) -> u64 {
        2
    }

    fn save(
        &mut self,
        trainer: &Trainer<B>,
        optimizer: &AdamWOptimizer<B>,
        progress: &StageProgress,
    ) -> Result<(), TrainError> {
        if self.leader {
            checkpoint::save(trainer, Some((optimizer, progress)), &self.dir)?;
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        }
        Ok(())
    }

    fn sharded_dir(&self, _progress: &StageProgress) -> Option<PathBuf> {
        Some(self.dir.clone())
    }

    fn sharded_saved(
        &mut self,
        _dir: &Path,
        _digest: &checkpoint::Digest,
        _progress: &StageProgress,
    ) -> Result<(), TrainError> {
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        Ok(())
    }
}

/// Runs the probe's job on `world` CPU ranks in `layout` under `dir` (the HF checkpoint must be
/// at `dir/hf`, [`write_model`]) and measures its peak. The counting allocator must be
/// installed.
pub fn job_peak(world: usize, layout: Layout, dir: &Path) -> Result<JobPeak, TrainError> {
    type B = crate::CpuBackend;
    let spec = job_spec(world, &dir.join("hf"));
    let model_bytes = job_model().num_params() * 4;
    let work = dir.join(format!("work-{world}-{layout:?}"));
    let _ = std::fs::remove_dir_all(&work);
    let saved = Arc::new(Mutex::new(0u64));
    let ckpt = |leader: bool| Checkpoints {
        dir: work.join("checkpoint"),
        leader,
        saved: saved.clone(),
    };
    let export = work.join("model");
    let before = alloc::current_bytes().unwrap_or(0) as u64;
    alloc::reset_run_peak();
    let devices = vec![Default::default(); world];
    let stages = match layout {
        Layout::NeverWhole => {
            let (lead, follow) = (ckpt(true), ckpt(false));
            let export = export.clone();
            gang::train_gang::<B, _>(
                &spec,
                devices,
                &work,
                move |t| {
                    t.checkpointer = Some(Box::new(lead));
                    run_plan(t, &mut NullObserver)?;
                    t.final_eval()?;
                    t.export_model(&export, None)?;
                    Ok(t.progress.records.clone())
                },
                move |t| {
                    t.checkpointer = Some(Box::new(follow.clone()));
                    run_plan(t, &mut NullObserver)?;
                    t.follow_finish()
                },
            )?
        }
        Layout::StageTasks => {
            let mut state: Option<PathBuf> = None;
            for stage in 0.. {
                let (lead, follow) = (ckpt(true), ckpt(false));
                let next = work.join(format!("state-{stage}"));
                let (lead_out, follow_out) = (next.clone(), next.clone());
                let ran = gang::train_gang_from::<B, _>(
                    &spec,
                    devices.clone(),
                    &work.join(format!("task-{stage}")),
                    state.as_deref(),
                    move |t| {
                        t.checkpointer = Some(Box::new(lead));
                        let ran = crate::segprop::run_next_stage(t, &mut NullObserver)?;
                        t.checkpointer = None;
                        if ran.is_some() {
                            checkpoint::save_sharded(t, None, &lead_out)?;
                        }
                        Ok(ran.is_some())
                    },
                    move |t| {
                        t.checkpointer = Some(Box::new(follow.clone()));
                        if crate::segprop::run_next_stage(t, &mut NullObserver)?.is_some() {
                            t.checkpointer = None;
                            checkpoint::save_sharded(t, None, &follow_out)?;
                        }
                        Ok(())
                    },
                )?;
                if !ran {
                    break;
                }
                if let Some(done) = state.replace(next) {
                    let _ = std::fs::remove_dir_all(done);
                }
            }
            let export = export.clone();
            gang::train_gang_from::<B, _>(
                &spec,
                devices,
                &work.join("export"),
                state.as_deref(),
                move |t| {
                    t.final_eval()?;
                    t.export_model(&export, None)?;
                    Ok(t.progress.records.clone())
                },
                move |t| t.follow_finish(),
            )?
        }
        Layout::Whole => {
            let group = gang::gang_group::<B>(&spec, &devices)?;
            let options = crate::rank::ShardOptions::of(&spec);
            let build = {
                let (spec, work) = (spec.clone(), work.clone());
                move |shard: crate::rank::ShardRank, ckpt: Checkpoints| {
                    let rank = shard.rank();
                    let mut t = Trainer::<B>::new(
                        spec.clone(),
                        Default::default(),
                        &work.join(format!("rank{rank}")),
                    )?;
                    t.shard = Some(shard);
                    t.checkpointer = Some(Box::new(ckpt));
                    Ok::<_, TrainError>(t)
                }
            };
            let follower_build = build.clone();
            let follow = ckpt(false);
            let lead = ckpt(true);
            let export = export.clone();
            gang::run_gang(
                group,
                gang::collective_deadline(&spec),
                options,
                move |shard| {
                    let mut t = build(shard, lead)?;
                    run_plan(&mut t, &mut NullObserver)?;
                    t.final_eval()?;
                    t.export_model(&export, None)?;
                    Ok(t.progress.records.clone())
                },
                Arc::new(move |shard| {
                    let mut t = follower_build(shard, follow.clone())?;
                    run_plan(&mut t, &mut NullObserver).map(|_| ())
                }),
            )?
        }
    };
    let peak = (alloc::run_peak_bytes().unwrap_or(0) as u64).saturating_sub(before);
    let saved = *saved.lock().unwrap_or_else(|e| e.into_inner());
    if saved == 0 {
        return Err(TrainError::State {
            path: work,
            message: "the probe wrote no checkpoint".into(),
        });
    }
    let _ = std::fs::remove_dir_all(&work);
    let graphs: Vec<u64> = planned_stages(&spec, world)?
        .iter()
        .map(|s| s.graph)
        .collect();
    let accounted = accounted_bytes(&stages, &graphs, world);
    Ok(JobPeak {
        world,
        layout,
        peak_bytes: peak,
        accounted_bytes: accounted,
        predicted_bytes: predicted_bytes(&spec, world)?,
        model_bytes,
        stages,
    })
}

/// The planner's peak for the probe's job on `world` ranks: the heaviest stage's
/// [`segprop_core::planner::cpu_gang_step`] on every rank. Each rank keeps snapshots of the
/// batches it trained on (`steps × grad_accum / world`) and of its share of the eval batches.
pub fn predicted_bytes(spec: &JobSpec, world: usize) -> Result<u64, TrainError> {
    let peak = planned_stages(spec, world)?
        .iter()
        .map(|s| s.total())
        .max()
        .unwrap_or(0);
    Ok(peak * world as u64)
}

/// The planner's [`segprop_core::planner::CpuGangStep`] of each stage of the probe's job.
fn planned_stages(
    spec: &JobSpec,
    world: usize,
) -> Result<Vec<segprop_core::planner::CpuGangStep>, TrainError> {
    use segprop_core::planner::{CpuProfile, cpu_gang_step, preflight::stage_workload};
    let config = job_model();
    let plan = segprop_core::StagePlan::new(spec, config.num_layers);
    let data = crate::data::Dataset::load(spec)?;
    let accum = spec.optimizer.grad_accum;
    let steps = spec.segprop.exit.segment.max_steps.unwrap_or(1) as usize;
    let batch = spec.data.batch_size.get();
    let eval = spec.eval.max_batches.min(data.eval.len());
    let frozen_bytes = spec.resources.precision.bytes();
    Ok(plan
        .stages
        .iter()
        .map(|entry| {
            let w = stage_workload(spec, &entry.kind, config.num_layers);
            let cached = if w.held_embedding {
                (steps * accum).min(data.train.len()).div_ceil(world) + eval.div_ceil(world)
            } else {
                0
            };
            cpu_gang_step(
                &config,
                &CpuProfile::FLEX_F32,
                &w,
                world,
                (accum / world, batch, spec.data.seq_len),
                frozen_bytes,
                cached,
                spec.sharding.prefetch,
            )
        })
        .collect())
}

/// What `world` ranks account for at their heaviest stage: every rank's shards (trained
/// masters, frozen prefix, parked blocks), AdamW moments, gradient shards and in-flight full
/// gradients, the gathered units the schedule allows, the largest unit's full gradient as
/// tensors, the saved activations, and its snapshots, as its stage records report them; and
/// what autodiff holds for one unit's recompute and the logits, which no record sees (`graphs`,
/// the planner's term, per stage).
fn accounted_bytes(stages: &[StageRecord], graphs: &[u64], world: usize) -> u64 {
    stages
        .iter()
        .zip(graphs)
        .map(|(s, graph)| {
            let m = s.sharding.unwrap_or_default();
            let snapshots = s.snapshots.as_ref().map_or(0, |c| c.memory_bytes);
            m.params_bytes
                + m.optimizer_bytes
                + m.grad_bytes
                + m.prefix_bytes
                + m.parked_bytes
                + m.gathered_peak_bytes
                + m.transient_bytes
                + m.activation_bytes
                + graph
                + snapshots
        })
        .max()
        .unwrap_or(0)
        * world as u64
}
