//! Learning-rate schedules, evaluated at every optimizer step.

use crate::config::{ScheduleConfig, ScheduleKind};

/// A schedule bound to a run's length.
#[derive(Debug, Clone)]
pub struct Schedule {
    cfg: ScheduleConfig,
    base_lr: f64,
    total_steps: u64,
    steps_per_epoch: u64,
    warmup: u64,
}

impl Schedule {
    pub fn new(cfg: &ScheduleConfig, base_lr: f64, total_steps: u64, steps_per_epoch: u64) -> Self {
        let warmup = if cfg.warmup_steps > 0 {
            cfg.warmup_steps as u64
        } else {
            (cfg.warmup_ratio * total_steps as f64).ceil() as u64
        };
        Self {
            cfg: cfg.clone(),
            base_lr,
            total_steps,
            steps_per_epoch: steps_per_epoch.max(1),
            warmup,
        }
    }

    /// The learning rate for the optimizer step that follows `step` completed steps
    /// (the HF Trainer's convention: warm-up rises linearly from 0).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.base_lr * step as f64 / self.warmup as f64;
        }
        let (base, min) = (self.base_lr, self.cfg.min_lr);
        let span = self.total_steps.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        match self.cfg.kind {
            ScheduleKind::Constant => base,
            ScheduleKind::Step => {
                let epoch = step / self.steps_per_epoch;
                base * self
                    .cfg
                    .gamma
                    .powi((epoch / self.cfg.step_size as u64) as i32)
            }
            ScheduleKind::Cosine => {
                min + (base - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            ScheduleKind::Linear => min + (base - min) * (1.0 - progress),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind, warmup: usize) -> Schedule {
        let cfg = ScheduleConfig {
            kind,
            warmup_steps: warmup,
            step_size: 2,
            gamma: 0.5,
            ..ScheduleConfig::default()
        };
        Schedule::new(&cfg, 1.0, 100, 10)
    }

    #[test]
    fn shapes_are_right() {
        let c = sched(ScheduleKind::Constant, 10);
        assert_eq!(c.lr(0), 0.0);
        assert_eq!(c.lr(5), 0.5);
        assert_eq!(c.lr(10), 1.0);
        assert_eq!(c.lr(99), 1.0);
        let s = sched(ScheduleKind::Step, 0);
        assert_eq!(s.lr(19), 1.0);
        assert_eq!(s.lr(20), 0.5);
        assert_eq!(s.lr(45), 0.25);
        let cos = sched(ScheduleKind::Cosine, 0);
        assert_eq!(cos.lr(0), 1.0);
        assert!((cos.lr(50) - 0.5).abs() < 1e-12);
        assert!(cos.lr(100).abs() < 1e-12);
        let lin = sched(ScheduleKind::Linear, 20);
        assert_eq!(lin.lr(20), 1.0);
        assert!((lin.lr(60) - 0.5).abs() < 1e-12);
    }
}
