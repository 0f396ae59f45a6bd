//! Pruners: stop unpromising trials early from their intermediate values (Optuna's
//! `MedianPruner` and `SuccessiveHalvingPruner` rules and defaults).

use super::study::{Direction, FrozenTrial, TrialState};

/// Decides, after a reported intermediate value, whether a trial should stop.
pub trait Pruner: Send {
    /// `trial` has reported up to its last step; `history` holds the trials before it. A
    /// pruner may record per-trial state in `trial.rungs`.
    fn prune(&self, history: &[FrozenTrial], trial: &mut FrozenTrial, direction: Direction)
        -> bool;
}

/// Prunes a trial whose best intermediate value so far is worse than the median of the
/// completed trials' values at the same step.
#[derive(Debug, Clone)]
pub struct MedianPruner {
    pub n_startup_trials: usize,
    pub n_warmup_steps: u64,
    pub interval_steps: u64,
    pub n_min_trials: usize,
}

impl Default for MedianPruner {
    fn default() -> Self {
        Self {
            n_startup_trials: 5,
            n_warmup_steps: 0,
            interval_steps: 1,
            n_min_trials: 1,
        }
    }
}

/// Linear-interpolated percentile (numpy's default) of sorted values.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

impl Pruner for MedianPruner {
    fn prune(
        &self,
        history: &[FrozenTrial],
        trial: &mut FrozenTrial,
        direction: Direction,
    ) -> bool {
        let completed: Vec<&FrozenTrial> = history
            .iter()
            .filter(|t| t.state == TrialState::Complete)
            .collect();
        if completed.is_empty() || completed.len() < self.n_startup_trials {
            return false;
        }
        let Some((step, _)) = trial.last_intermediate() else {
            return false;
        };
        if step < self.n_warmup_steps {
            return false;
        }
        // Only on the first reported step of each interval.
        if self.interval_steps > 1 {
            let interval_start = (step - self.n_warmup_steps) / self.interval_steps
                * self.interval_steps
                + self.n_warmup_steps;
            if trial
                .intermediate
                .range(interval_start..step)
                .next()
                .is_some()
            {
                return false;
            }
        }
        let best = trial
            .intermediate
            .values()
            .copied()
            .fold(None, |b: Option<f64>, v| match b {
                Some(b) if !direction.better(v, b) => Some(b),
                _ => Some(v),
            })
            .unwrap_or(f64::NAN);
        if best.is_nan() {
            return true;
        }
        let mut at_step: Vec<f64> = completed
            .iter()
            .filter_map(|t| t.intermediate.get(&step).copied())
            .filter(|v| !v.is_nan())
            .collect();
        if at_step.len() < self.n_min_trials {
            return false;
        }
        at_step.sort_by(f64::total_cmp);
        let p = percentile(&at_step, 50.0);
        match direction {
            Direction::Maximize => best < p,
            Direction::Minimize => best > p,
        }
    }
}

/// Asynchronous successive halving (ASHA): at rungs `min_resource × reduction_factor^k`, a
/// trial goes on only if its value is in the top `1 / reduction_factor` of all values seen at
/// that rung.
#[derive(Debug, Clone)]
pub struct SuccessiveHalvingPruner {
    /// Steps before the first rung; `None` = auto (max step of completed trials / 100, ≥ 1).
    pub min_resource: Option<u64>,
    pub reduction_factor: u64,
    pub min_early_stopping_rate: u32,
    pub bootstrap_count: usize,
}

impl Default for SuccessiveHalvingPruner {
    fn default() -> Self {
        Self {
            min_resource: None,
            reduction_factor: 4,
            min_early_stopping_rate: 0,
            bootstrap_count: 0,
        }
    }
}

impl Pruner for SuccessiveHalvingPruner {
    fn prune(
        &self,
        history: &[FrozenTrial],
        trial: &mut FrozenTrial,
        direction: Direction,
    ) -> bool {
        let Some((step, value)) = trial.last_intermediate() else {
            return false;
        };
        let min_resource = match self.min_resource {
            Some(r) => r,
            None => {
                let max_step = history
                    .iter()
                    .filter(|t| t.state == TrialState::Complete)
                    .filter_map(|t| t.last_intermediate().map(|(s, _)| s))
                    .max();
                match max_step {
                    Some(s) => (s / 100).max(1),
                    None => return false,
                }
            }
        };
        let mut rung = trial.rungs.len() as u32;
        loop {
            let promotion_step = min_resource
                * self
                    .reduction_factor
                    .pow(self.min_early_stopping_rate + rung);
            if step < promotion_step {
                return false;
            }
            if value.is_nan() {
                return true;
            }
            trial.rungs.insert(rung, value);
            let mut competing: Vec<f64> = history
                .iter()
                .filter_map(|t| t.rungs.get(&rung).copied())
                .chain(std::iter::once(value))
                .collect();
            if competing.len() <= self.bootstrap_count {
                return true;
            }
            competing.sort_by(f64::total_cmp);
            let k = (competing.len() / self.reduction_factor as usize).max(1) - 1;
            let promotable = match direction {
                Direction::Maximize => value >= competing[competing.len() - 1 - k],
                Direction::Minimize => value <= competing[k],
            };
            if !promotable {
                return true;
            }
            rung += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn trial(number: usize, state: TrialState, values: &[f64]) -> FrozenTrial {
        FrozenTrial {
            number,
            state,
            value: values.last().copied(),
            params: BTreeMap::new(),
            distributions: BTreeMap::new(),
            intermediate: values
                .iter()
                .enumerate()
                .map(|(i, &v)| (i as u64 + 1, v))
                .collect(),
            rungs: BTreeMap::new(),
            duration_s: 0.0,
            note: None,
        }
    }

    #[test]
    fn median_prunes_below_the_median_after_startup() {
        let p = MedianPruner::default();
        let done: Vec<FrozenTrial> = (0..5)
            .map(|i| trial(i, TrialState::Complete, &[0.5 + 0.1 * i as f64, 0.9]))
            .collect();
        // Median at step 1 is 0.7 (maximize): 0.6 is pruned, 0.8 goes on.
        assert!(p.prune(
            &done,
            &mut trial(5, TrialState::Running, &[0.6]),
            Direction::Maximize
        ));
        assert!(!p.prune(
            &done,
            &mut trial(5, TrialState::Running, &[0.8]),
            Direction::Maximize
        ));
        // Fewer than 5 completed trials: never.
        assert!(!p.prune(
            &done[..4],
            &mut trial(5, TrialState::Running, &[0.1]),
            Direction::Maximize
        ));
    }

    #[test]
    fn asha_keeps_the_top_quarter_per_rung() {
        let p = SuccessiveHalvingPruner {
            min_resource: Some(1),
            ..Default::default()
        };
        let mut history = Vec::new();
        for (i, v) in [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7].iter().enumerate() {
            let mut t = trial(i, TrialState::Running, &[*v]);
            p.prune(&history, &mut t, Direction::Maximize);
            t.state = TrialState::Complete;
            history.push(t);
        }
        // 8 values at rung 0 with the new one: the top 2 (0.7 and the new one, if >= 0.6) go on.
        assert!(p.prune(
            &history,
            &mut trial(7, TrialState::Running, &[0.55]),
            Direction::Maximize
        ));
        assert!(!p.prune(
            &history,
            &mut trial(7, TrialState::Running, &[0.65]),
            Direction::Maximize
        ));
    }
}
