//! Learning-rate schedule: linear warmup, then constant, linear or cosine decay. Restarted at
//! every stage over that stage's step budget (as the papers' per-stage recipes do).

use segprop_core::{DecaySchedule, ScheduleSpec};

#[derive(Debug, Clone)]
pub struct LrSchedule {
    peak: f64,
    min: f64,
    warmup_steps: u64,
    total_steps: u64,
    decay: DecaySchedule,
}

impl LrSchedule {
    pub fn new(peak: f64, spec: &ScheduleSpec, total_steps: u64) -> Self {
        let warmup_steps = ((total_steps as f64) * spec.warmup_ratio).round() as u64;
        Self {
            peak,
            min: peak * spec.min_lr_ratio,
            warmup_steps,
            total_steps: total_steps.max(1),
            decay: spec.decay,
        }
    }

    /// Learning rate for optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).clamp(0.0, 1.0);
        let factor = match self.decay {
            DecaySchedule::Constant => 1.0,
            DecaySchedule::Linear => 1.0 - progress,
            DecaySchedule::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        self.min + (self.peak - self.min) * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_linear_decay() {
        let spec = ScheduleSpec {
            warmup_ratio: 0.1,
            decay: DecaySchedule::Linear,
            min_lr_ratio: 0.0,
        };
        let s = LrSchedule::new(1.0, &spec, 100);
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert!((s.lr(9) - 1.0).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(55) - 0.5).abs() < 1e-12);
        assert!(s.lr(100).abs() < 1e-12);
    }

    #[test]
    fn cosine_ends_at_min() {
        let spec = ScheduleSpec {
            warmup_ratio: 0.0,
            decay: DecaySchedule::Cosine,
            min_lr_ratio: 0.1,
        };
        let s = LrSchedule::new(2.0, &spec, 10);
        assert!((s.lr(0) - 2.0).abs() < 1e-12);
        assert!((s.lr(10) - 0.2).abs() < 1e-12);
    }
}
