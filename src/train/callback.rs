//! Hooks into the training loop. Loggers, progress display, the tuner's pruning and
//! data-parallel gradient reduction all plug in here.

use crate::model::Grads;
use crate::train::metrics::Metrics;
use crate::Result;

/// What the loop should do after a hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Stop gracefully: save `last`, write the summary, return normally (e.g. pruned).
    Stop,
    /// Stop at once without saving anything, as a crash would (used to test resume).
    Abort,
}

/// Facts about the run, given once at the start.
#[derive(Debug, Clone)]
pub struct FitStart {
    pub epochs: usize,
    pub steps_per_epoch: u64,
    pub total_steps: u64,
    /// Optimizer steps already done (non-zero when resuming).
    pub start_step: u64,
    pub train_samples: usize,
    pub eval_samples: usize,
    pub num_params: usize,
    /// The model's frozen part runs once per sample and the rest trains on its cached output
    /// (see [`crate::model::Model::cached_features`]).
    pub cached_features: bool,
}

/// After each optimizer step.
#[derive(Debug, Clone)]
pub struct StepEnd {
    pub epoch: usize,
    /// Optimizer steps done.
    pub step: u64,
    /// Mean loss of the micro-batches of this step.
    pub loss: f64,
    pub lr: f64,
    /// Training samples processed since the start of the run.
    pub samples: u64,
    /// Training throughput so far, samples per second of training time.
    pub samples_per_s: f64,
}

/// After each epoch (with evaluation metrics when it was an evaluation epoch).
#[derive(Debug, Clone)]
pub struct EpochEnd {
    /// Epochs completed (1-based).
    pub epoch: usize,
    pub step: u64,
    /// `train_loss`, `lr`, and `eval_*` when evaluated.
    pub metrics: Metrics,
    pub evaluated: bool,
    /// Whether this evaluation is the best so far on the monitored metric.
    pub is_best: bool,
}

/// A training-loop hook. Every method has a no-op default.
pub trait Callback {
    fn on_fit_start(&mut self, _info: &FitStart) -> Result<()> {
        Ok(())
    }

    /// Gradients of one optimizer step, after accumulation and before clipping: the place to
    /// all-reduce them across data-parallel ranks.
    fn on_after_backward(&mut self, _grads: &mut Grads) -> Result<()> {
        Ok(())
    }

    fn on_step_end(&mut self, _step: &StepEnd) -> Result<Control> {
        Ok(Control::Continue)
    }

    fn on_epoch_end(&mut self, _epoch: &EpochEnd) -> Result<Control> {
        Ok(Control::Continue)
    }

    fn on_fit_end(&mut self, _summary: &crate::train::Summary) -> Result<()> {
        Ok(())
    }
}

/// Aborts the run after `n` optimizer steps, as if the process had been killed there.
pub struct AbortAfter(pub u64);

impl Callback for AbortAfter {
    fn on_step_end(&mut self, step: &StepEnd) -> Result<Control> {
        Ok(if step.step >= self.0 {
            Control::Abort
        } else {
            Control::Continue
        })
    }
}
