//! What the engine reports: per-step, per-eval and per-stage records, delivered to observers
//! (the JSONL writer, terminal progress bars, a worker's heartbeat later).

use std::io::Write;
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::exit::ExitReason;
use crate::snapcheck::SnapshotStats;

/// One task's score on one network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskScore {
    pub task: String,
    pub examples: usize,
    pub shots: usize,
    /// Fraction of examples whose right choice has the highest summed log-probability.
    pub acc: f64,
    /// The same with each choice's log-probability divided by its length in bytes.
    pub acc_norm: f64,
    /// Standard error of `acc` over examples (`sqrt(acc (1 - acc) / (n - 1))`, as lm-eval).
    pub acc_stderr: f64,
    /// `acc` of guessing: the mean of `1 / choices` over examples.
    pub chance: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    pub stage: String,
    pub stage_index: usize,
    /// 1-based optimizer step within the stage.
    pub step: u64,
    /// 1-based optimizer step across the whole job (stage-concatenated x axis).
    pub global_step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    /// Matmul TFLOP/s the step achieved (the FLOPs the model launched over the step's time).
    #[serde(default)]
    pub tflops: f64,
    /// `tflops` over the device's measured matmul rate ([`crate::utilization`]).
    #[serde(default)]
    pub mfu: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalRecord {
    pub stage: String,
    pub stage_index: usize,
    pub step: u64,
    pub global_step: u64,
    pub eval_loss: f64,
    pub eval_ppl: f64,
    /// Training wall time of the stage when this evaluation ran (its earlier evaluations
    /// included); with the earlier stages' `wall_s` it places the point on a wall-time axis.
    #[serde(default)]
    pub stage_wall_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageRecord {
    pub stage: String,
    pub stage_index: usize,
    pub steps: u64,
    pub exit_reason: ExitReason,
    pub final_train_loss: f64,
    pub eval_loss: f64,
    pub eval_ppl: f64,
    /// With `eval.keep_best`, the step whose model the stage kept when an earlier evaluation
    /// beat the last one (`eval_loss` is then that evaluation's); `None` otherwise.
    #[serde(default)]
    pub best_step: Option<u64>,
    pub wall_s: f64,
    pub tokens: u64,
    pub tokens_per_s: f64,
    /// Matmul TFLOP/s over the stage's steps and their MFU ([`crate::utilization`]).
    #[serde(default)]
    pub tflops: f64,
    #[serde(default)]
    pub mfu: f64,
    pub trainable_params: u64,
    /// Sequences per forward/backward pass (`data.micro_batch`; the batch size when batches
    /// run whole).
    #[serde(default)]
    pub micro_batch: usize,
    /// Peak live host heap during the stage, everything counted: the SnapCheck cache's entries
    /// in memory too (only with the counting allocator installed).
    pub peak_bytes: Option<u64>,
    /// The same peak less the SnapCheck cache's entries in memory at that moment: what
    /// training itself needed (weights, optimizer state, activations, gradients, data).
    #[serde(default)]
    pub training_peak_bytes: Option<u64>,
    pub snapshots: Option<SnapshotStats>,
    /// What one rank held in a sharded stage (rank 0's view; ranks differ only by padding).
    #[serde(default)]
    pub sharding: Option<crate::rank::RankMemory>,
    /// `eval.tasks` scored on the stage's network at its end (after `keep_best`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskScore>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunSummary {
    pub job: String,
    pub regime: String,
    pub num_params: u64,
    pub stages: Vec<StageRecord>,
    pub total_steps: u64,
    pub wall_s: f64,
    pub tokens_per_s: f64,
    /// Held-out loss of the exported model (full forward).
    pub final_eval_loss: f64,
    pub final_eval_ppl: f64,
    pub final_num_layers: usize,
    /// Set when a global exit criterion stopped stage 2 early and the model was pruned.
    pub early_exit: Option<ExitReason>,
    pub model_dir: Option<PathBuf>,
    /// `eval.tasks` scored on the exported model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<TaskScore>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainEvent {
    StageStarted {
        stage: String,
        stage_index: usize,
        num_stages: usize,
        budget_steps: u64,
        trainable_params: u64,
    },
    Step(StepRecord),
    Eval(EvalRecord),
    StageFinished(Box<StageRecord>),
    RunFinished(RunSummary),
}

/// Receives engine events. Implementations must be cheap: they run on the training thread.
pub trait TrainObserver {
    fn on_event(&mut self, event: &TrainEvent);

    /// Polled between steps; returning true stops the job with [`crate::TrainError::Cancelled`].
    fn cancelled(&self) -> bool {
        false
    }
}

/// Drops every event (the follower ranks of a sharded gang: rank 0 reports for the gang).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullObserver;

impl TrainObserver for NullObserver {
    fn on_event(&mut self, _event: &TrainEvent) {}
}

/// Keeps every event (tests, benches).
#[derive(Debug, Default)]
pub struct RecordingObserver {
    pub events: Vec<TrainEvent>,
}

impl RecordingObserver {
    pub fn steps(&self) -> Vec<&StepRecord> {
        self.events
            .iter()
            .filter_map(|e| match e {
                TrainEvent::Step(s) => Some(s),
                _ => None,
            })
            .collect()
    }
}

impl TrainObserver for RecordingObserver {
    fn on_event(&mut self, event: &TrainEvent) {
        self.events.push(event.clone());
    }
}

/// Appends one JSON object per event to `metrics.jsonl`.
pub struct JsonlWriter {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
}

impl JsonlWriter {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            file: std::io::BufWriter::new(std::fs::File::create(path)?),
        })
    }
}

impl TrainObserver for JsonlWriter {
    fn on_event(&mut self, event: &TrainEvent) {
        let line = serde_json::to_string(event).unwrap_or_default();
        if writeln!(self.file, "{line}").is_err() {
            tracing::warn!(path = %self.path.display(), "cannot append to metrics file");
        }
        if matches!(
            event,
            TrainEvent::StageFinished(_) | TrainEvent::RunFinished(_)
        ) {
            let _ = self.file.flush();
        }
    }
}

/// One progress bar per stage on stderr (hidden when stderr is not a terminal).
#[derive(Default)]
pub struct ProgressReporter {
    bar: Option<ProgressBar>,
}

impl TrainObserver for ProgressReporter {
    fn on_event(&mut self, event: &TrainEvent) {
        match event {
            TrainEvent::StageStarted {
                stage,
                stage_index,
                num_stages,
                budget_steps,
                ..
            } => {
                let bar = ProgressBar::new(*budget_steps);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>22} [{bar:30}] {pos:>5}/{len:5} {msg} ({elapsed}, eta {eta})",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_prefix(format!("[{}/{}] {stage}", stage_index + 1, num_stages));
                self.bar = Some(bar);
            }
            TrainEvent::Step(s) => {
                if let Some(bar) = &self.bar {
                    bar.set_position(s.step);
                    bar.set_message(format!("loss {:.4} {:.0} tok/s", s.loss, s.tokens_per_s));
                }
            }
            TrainEvent::StageFinished(s) => {
                if let Some(bar) = self.bar.take() {
                    bar.finish_with_message(format!(
                        "eval {:.4} ({:?})",
                        s.eval_loss, s.exit_reason
                    ));
                }
            }
            _ => {}
        }
    }
}

/// Plain-text table of the stages of a run.
pub fn summary_table(summary: &RunSummary) -> String {
    let mut out = format!(
        "{:<16} {:>7} {:>12} {:>10} {:>10} {:>9} {:>11} {:>9} {:>6} {:>15} {:>15}\n",
        "stage",
        "steps",
        "exit",
        "train",
        "eval",
        "ppl",
        "tok/s",
        "TFLOP/s",
        "MFU",
        "train peak MiB",
        "SnapCheck MiB"
    );
    let mib = |b: Option<u64>| {
        b.map(|b| format!("{:.1}", b as f64 / (1u64 << 20) as f64))
            .unwrap_or_else(|| "-".into())
    };
    for s in &summary.stages {
        // The SnapCheck cache at the stage's end: in memory, plus what spilled to disk.
        let snapshots = match &s.snapshots {
            Some(c) if c.disk_bytes > 0 => format!(
                "{} +{} disk",
                mib(Some(c.memory_bytes)),
                mib(Some(c.disk_bytes))
            ),
            Some(c) => mib(Some(c.memory_bytes)),
            None => "-".into(),
        };
        out.push_str(&format!(
            "{:<16} {:>7} {:>12} {:>10.4} {:>10.4} {:>9.2} {:>11.0} {:>9.3} {:>5.1}% {:>15} {:>15}\n",
            s.stage,
            s.steps,
            format!("{:?}", s.exit_reason),
            s.final_train_loss,
            s.eval_loss,
            s.eval_ppl,
            s.tokens_per_s,
            s.tflops,
            100.0 * s.mfu,
            mib(s.training_peak_bytes),
            snapshots
        ));
    }
    if let Some((stage, m)) = summary
        .stages
        .iter()
        .find_map(|s| s.sharding.map(|m| (&s.stage, m)))
    {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        out.push_str(&format!(
            "sharded over {} ranks; per rank in {}: params {:.1} MiB + optimizer {:.1} MiB of \
             {:.1} MiB of units, gathered peak {:.1} MiB, {:.1} MiB moved per step\n",
            m.world,
            stage,
            mib(m.params_bytes),
            mib(m.optimizer_bytes),
            mib(m.unit_bytes),
            mib(m.gathered_peak_bytes),
            mib(m.comm_bytes_per_step),
        ));
    }
    out.push_str(&format!(
        "final model: {} layers, eval loss {:.4} (ppl {:.2}), {} steps in {:.1}s, {:.0} tok/s{}\n",
        summary.final_num_layers,
        summary.final_eval_loss,
        summary.final_eval_ppl,
        summary.total_steps,
        summary.wall_s,
        summary.tokens_per_s,
        match summary.early_exit {
            Some(reason) => format!(", early exit ({reason:?})"),
            None => String::new(),
        }
    ));
    if summary.tasks.is_empty() {
        return out;
    }
    // Task accuracy after each stage (the papers' per-layer tables) and of the exported model.
    let names: Vec<&str> = summary.tasks.iter().map(|t| t.task.as_str()).collect();
    out.push_str(&format!("\n{:<16}", "task acc"));
    for name in &names {
        out.push_str(&format!(" {:>22}", name));
    }
    out.push('\n');
    let cell = |t: Option<&TaskScore>| match t {
        Some(t) => format!("{:.3} (norm {:.3})", t.acc, t.acc_norm),
        None => "-".into(),
    };
    for s in &summary.stages {
        out.push_str(&format!("{:<16}", s.stage));
        for name in &names {
            out.push_str(&format!(
                " {:>22}",
                cell(s.tasks.iter().find(|t| t.task == *name))
            ));
        }
        out.push('\n');
    }
    out.push_str(&format!("{:<16}", "final model"));
    for t in &summary.tasks {
        out.push_str(&format!(" {:>22}", cell(Some(t))));
    }
    out.push_str(&format!(
        "\n{:<16}{}\n",
        "(chance)",
        summary
            .tasks
            .iter()
            .map(|t| format!(" {:>22.3}", t.chance))
            .collect::<String>()
    ));
    out
}
