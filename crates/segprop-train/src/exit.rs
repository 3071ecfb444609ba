//! Exit criteria (the papers' per-stage stopping rules): step and epoch budgets, a loss plateau
//! on the held-out split (patience, min delta), and a target held-out loss.

use segprop_core::{ExitSpec, GlobalExitSpec};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    MaxSteps,
    MaxEpochs,
    Plateau,
    TargetReached,
}

/// Tracks one stage's progress against its [`ExitSpec`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExitTracker {
    spec: ExitSpec,
    best_eval: f64,
    evals_without_improvement: u32,
    triggered: Option<ExitReason>,
}

impl ExitTracker {
    pub fn new(spec: &ExitSpec) -> Self {
        Self {
            spec: spec.clone(),
            best_eval: f64::INFINITY,
            evals_without_improvement: 0,
            triggered: None,
        }
    }

    /// The stage's step budget given `steps_per_epoch` (the tighter of the two limits).
    pub fn step_budget(&self, steps_per_epoch: u64) -> u64 {
        let by_epochs = self.spec.max_epochs.map(|e| e * steps_per_epoch.max(1));
        match (self.spec.max_steps, by_epochs) {
            (Some(s), Some(e)) => s.min(e),
            (Some(s), None) => s,
            (None, Some(e)) => e,
            (None, None) => unreachable!("validated: every stage has max_steps or max_epochs"),
        }
    }

    /// Records a held-out loss; returns the reason to stop, if any.
    pub fn on_eval(&mut self, eval_loss: f64) -> Option<ExitReason> {
        if let Some(target) = self.spec.target_eval_loss
            && eval_loss <= target
        {
            self.triggered = Some(ExitReason::TargetReached);
            return self.triggered;
        }
        if eval_loss < self.best_eval - self.spec.min_delta {
            self.best_eval = eval_loss;
            self.evals_without_improvement = 0;
        } else {
            self.evals_without_improvement += 1;
            if let Some(patience) = self.spec.patience
                && self.evals_without_improvement >= patience
            {
                self.triggered = Some(ExitReason::Plateau);
            }
        }
        self.triggered
    }

    /// Checks the budgets after `steps` optimizer steps and `epochs` full epochs.
    pub fn on_step(&mut self, steps: u64, epochs: u64) -> Option<ExitReason> {
        if self.triggered.is_some() {
            return self.triggered;
        }
        if self.spec.max_steps.is_some_and(|m| steps >= m) {
            self.triggered = Some(ExitReason::MaxSteps);
        } else if self.spec.max_epochs.is_some_and(|m| epochs >= m) {
            self.triggered = Some(ExitReason::MaxEpochs);
        }
        self.triggered
    }
}

/// The global exit criterion of stage 2, checked after each committed segment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GlobalExitTracker {
    spec: GlobalExitSpec,
    best: f64,
    segments_without_improvement: u32,
}

impl GlobalExitTracker {
    pub fn new(spec: &GlobalExitSpec, stage1_eval_loss: f64) -> Self {
        Self {
            spec: spec.clone(),
            best: stage1_eval_loss,
            segments_without_improvement: 0,
        }
    }

    /// Returns the reason to stop stage 2 after a segment committed with `eval_loss`.
    pub fn on_commit(&mut self, eval_loss: f64) -> Option<ExitReason> {
        if self.spec.target_eval_loss.is_some_and(|t| eval_loss <= t) {
            return Some(ExitReason::TargetReached);
        }
        if eval_loss < self.best - self.spec.min_delta {
            self.best = eval_loss;
            self.segments_without_improvement = 0;
        } else {
            self.segments_without_improvement += 1;
        }
        match self.spec.patience {
            Some(p) if self.segments_without_improvement >= p => Some(ExitReason::Plateau),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plateau_needs_patience_evals_without_min_delta_improvement() {
        let mut t = ExitTracker::new(&ExitSpec {
            max_steps: Some(1000),
            max_epochs: None,
            patience: Some(2),
            min_delta: 0.1,
            target_eval_loss: None,
        });
        assert_eq!(t.on_eval(3.0), None);
        assert_eq!(t.on_eval(2.95), None); // not a 0.1 improvement
        assert_eq!(t.on_eval(2.5), None); // resets
        assert_eq!(t.on_eval(2.45), None);
        assert_eq!(t.on_eval(2.44), Some(ExitReason::Plateau));
    }

    #[test]
    fn budgets_and_targets() {
        let spec = ExitSpec {
            max_steps: Some(50),
            max_epochs: Some(2),
            patience: None,
            min_delta: 0.0,
            target_eval_loss: Some(1.0),
        };
        let mut t = ExitTracker::new(&spec);
        assert_eq!(t.step_budget(10), 20);
        assert_eq!(t.on_step(20, 2), Some(ExitReason::MaxEpochs));
        let mut t = ExitTracker::new(&spec);
        assert_eq!(t.on_eval(0.9), Some(ExitReason::TargetReached));
    }

    #[test]
    fn global_exit_counts_segments() {
        let spec = GlobalExitSpec {
            target_eval_loss: None,
            patience: Some(2),
            min_delta: 0.01,
        };
        let mut g = GlobalExitTracker::new(&spec, 3.0);
        assert_eq!(g.on_commit(2.5), None);
        assert_eq!(g.on_commit(2.499), None);
        assert_eq!(g.on_commit(2.6), Some(ExitReason::Plateau));
    }
}
