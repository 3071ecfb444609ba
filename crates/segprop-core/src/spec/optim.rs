//! `optimizer:` (AdamW and its learning-rate schedule) and `eval:`.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DecaySchedule {
    Constant,
    #[default]
    Linear,
    Cosine,
}

/// Learning-rate schedule, restarted at every stage over that stage's step budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    #[serde(default = "default_warmup_ratio")]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub decay: DecaySchedule,
    /// Final learning rate as a fraction of `lr`.
    #[serde(default)]
    pub min_lr_ratio: f64,
}

fn default_warmup_ratio() -> f64 {
    0.03
}

impl Default for ScheduleSpec {
    fn default() -> Self {
        Self {
            warmup_ratio: default_warmup_ratio(),
            decay: DecaySchedule::default(),
            min_lr_ratio: 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    #[serde(default = "default_optimizer_name")]
    pub name: String,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Clip the global gradient norm of the trained parameters to this value.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: Option<f64>,
    /// Micro-batches accumulated into one optimizer step.
    #[serde(default = "default_grad_accum")]
    pub grad_accum: usize,
    #[serde(default)]
    pub schedule: ScheduleSpec,
}

fn default_optimizer_name() -> String {
    "adamw".into()
}
fn default_lr() -> f64 {
    3e-4
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_grad_clip() -> Option<f64> {
    Some(1.0)
}
fn default_grad_accum() -> usize {
    1
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        Self {
            name: default_optimizer_name(),
            lr: default_lr(),
            weight_decay: default_weight_decay(),
            betas: default_betas(),
            eps: default_eps(),
            grad_clip: default_grad_clip(),
            grad_accum: default_grad_accum(),
            schedule: ScheduleSpec::default(),
        }
    }
}

/// Held-out evaluation cadence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// Evaluate every this many optimizer steps (and at the end of every stage).
    #[serde(default = "default_eval_every")]
    pub every_steps: u64,
    /// Evaluate on at most this many held-out batches (0 = all).
    #[serde(default)]
    pub max_batches: usize,
    /// End each stage with the model of its best evaluation instead of its last step (Hugging
    /// Face's `load_best_model_at_end`; the ICLR paper's protocol): what the stage commits, hands
    /// to the next stage and exports.
    #[serde(default)]
    pub keep_best: bool,
    /// Multiple-choice tasks scored after every stage and on the exported model.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tasks: Vec<super::TaskSpec>,
}

fn default_eval_every() -> u64 {
    50
}

impl Default for EvalSpec {
    fn default() -> Self {
        Self {
            every_steps: default_eval_every(),
            max_batches: 0,
            keep_best: false,
            tasks: Vec::new(),
        }
    }
}
