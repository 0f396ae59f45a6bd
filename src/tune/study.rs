//! [`Study`] and [`Trial`]: define-by-run optimization of any objective, as in Optuna.
//!
//! ```
//! use wick::tune::{Direction, Study, TpeSampler};
//!
//! let mut study = Study::new(Direction::Minimize, Box::new(TpeSampler::new()), None);
//! study.optimize(40, |t| {
//!     let x = t.suggest_float("x", -10.0, 10.0, false)?;
//!     let y = t.suggest_int("y", -5, 5)?;
//!     Ok((x - 2.0).powi(2) + (y as f64 + 1.0).powi(2))
//! }).unwrap();
//! assert!(study.best_value().unwrap() < 1.0);
//! ```

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::pruner::Pruner;
use super::space::Distribution;
use crate::rng::Rng;

/// Which way the objective is optimized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Minimize,
    Maximize,
}

impl Direction {
    /// Whether `a` is better than `b`.
    pub fn better(self, a: f64, b: f64) -> bool {
        match self {
            Direction::Minimize => a < b,
            Direction::Maximize => a > b,
        }
    }

    /// The value turned into a loss (smaller is better).
    pub fn loss(self, v: f64) -> f64 {
        match self {
            Direction::Minimize => v,
            Direction::Maximize => -v,
        }
    }
}

/// The state of a trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrialState {
    Running,
    Complete,
    Pruned,
    Failed,
}

/// A trial as recorded: parameters (internal representation), value, intermediate values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrozenTrial {
    pub number: usize,
    pub state: TrialState,
    pub value: Option<f64>,
    pub params: BTreeMap<String, f64>,
    pub distributions: BTreeMap<String, Distribution>,
    /// Intermediate values by step (e.g. per epoch), for pruning.
    pub intermediate: BTreeMap<u64, f64>,
    /// Successive-halving rungs passed, with the value recorded at each.
    #[serde(default)]
    pub rungs: BTreeMap<u32, f64>,
    pub duration_s: f64,
    /// Why the trial failed, when it did.
    #[serde(default)]
    pub note: Option<String>,
}

impl FrozenTrial {
    /// The last reported intermediate value.
    pub fn last_intermediate(&self) -> Option<(u64, f64)> {
        self.intermediate.iter().next_back().map(|(&s, &v)| (s, v))
    }
}

/// Picks parameter values.
pub trait Sampler: Send {
    /// Joint sampling of `space` (the parameters every finished trial has) at the start of a
    /// trial. The default samples nothing jointly.
    fn sample_relative(
        &mut self,
        _history: &[FrozenTrial],
        _direction: Direction,
        _space: &BTreeMap<String, Distribution>,
        _rng: &mut Rng,
    ) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }

    /// Samples one parameter on its own.
    fn sample_independent(
        &mut self,
        history: &[FrozenTrial],
        direction: Direction,
        name: &str,
        dist: &Distribution,
        rng: &mut Rng,
    ) -> f64;
}

/// Uniform random sampling (log-uniform for log parameters).
#[derive(Debug, Default, Clone)]
pub struct RandomSampler;

/// A uniform draw from `dist` (internal representation).
pub fn sample_uniform(dist: &Distribution, rng: &mut Rng) -> f64 {
    match dist {
        Distribution::Float {
            low,
            high,
            log: true,
            ..
        } => (low.ln() + (high.ln() - low.ln()) * rng.next_f64())
            .exp()
            .clamp(*low, *high),
        Distribution::Float {
            low,
            high,
            step: Some(s),
            ..
        } => {
            let k = ((high - low) / s + 1e-9).floor() as u64 + 1;
            low + rng.below(k) as f64 * s
        }
        Distribution::Float { low, high, .. } => low + (high - low) * rng.next_f64(),
        Distribution::Int {
            low,
            high,
            log: true,
            ..
        } => {
            let (lo, hi) = (*low as f64 - 0.5, *high as f64 + 0.5);
            let v = (lo.ln() + (hi.ln() - lo.ln()) * rng.next_f64()).exp();
            dist.snap(v)
        }
        Distribution::Int {
            low, high, step, ..
        } => {
            let k = ((high - low) / step) as u64 + 1;
            (*low + rng.below(k) as i64 * step) as f64
        }
        Distribution::Categorical { choices } => rng.below(choices.len() as u64) as f64,
    }
}

impl Sampler for RandomSampler {
    fn sample_independent(
        &mut self,
        _history: &[FrozenTrial],
        _direction: Direction,
        _name: &str,
        dist: &Distribution,
        rng: &mut Rng,
    ) -> f64 {
        sample_uniform(dist, rng)
    }
}

/// Why a trial ended without a value.
#[derive(Debug)]
pub enum TrialError {
    /// The pruner stopped it.
    Pruned,
    /// The objective failed; the message says why.
    Failed(String),
    /// A parameter was suggested with an invalid distribution (a user error: stops the study).
    Invalid(String),
}

impl std::fmt::Display for TrialError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrialError::Pruned => write!(f, "pruned"),
            TrialError::Failed(m) | TrialError::Invalid(m) => write!(f, "{m}"),
        }
    }
}

/// A set of trials optimizing one objective.
pub struct Study {
    pub direction: Direction,
    /// The trials, in number order. Append only (through [`Study::ask`]); a finished trial is
    /// not changed afterwards.
    pub trials: Vec<FrozenTrial>,
    sampler: Box<dyn Sampler>,
    pruner: Option<Box<dyn Pruner>>,
    seed: u64,
    /// The intersection search space of the finished trials before `space_upto`.
    space: Option<BTreeMap<String, Distribution>>,
    space_upto: usize,
}

/// A trial in progress: suggests parameters and reports intermediate values.
pub struct Trial<'a> {
    study: &'a mut Study,
    number: usize,
    rng: Rng,
    relative: BTreeMap<String, f64>,
    started: Instant,
}

impl Study {
    /// A study whose sampler draws from keyed streams of `sampler`'s own seed.
    pub fn new(
        direction: Direction,
        sampler: Box<dyn Sampler>,
        pruner: Option<Box<dyn Pruner>>,
    ) -> Self {
        Self::with_seed(direction, sampler, pruner, 0)
    }

    /// As [`Self::new`], with the seed of the per-trial random streams.
    pub fn with_seed(
        direction: Direction,
        sampler: Box<dyn Sampler>,
        pruner: Option<Box<dyn Pruner>>,
        seed: u64,
    ) -> Self {
        Self {
            direction,
            trials: Vec::new(),
            sampler,
            pruner,
            seed,
            space: None,
            space_upto: 0,
        }
    }

    /// The parameters (with identical distributions) present in every finished trial,
    /// updated incrementally up to the first trial still running.
    fn intersection_space(&mut self) -> BTreeMap<String, Distribution> {
        while let Some(t) = self.trials.get(self.space_upto) {
            match t.state {
                TrialState::Running => break,
                TrialState::Failed => {}
                TrialState::Complete | TrialState::Pruned => match &mut self.space {
                    None => self.space = Some(t.distributions.clone()),
                    Some(s) => s.retain(|k, d| t.distributions.get(k) == Some(d)),
                },
            }
            self.space_upto += 1;
        }
        let mut space = self.space.clone().unwrap_or_default();
        space.retain(|_, d| !d.single());
        space
    }

    /// Starts the next trial.
    pub fn ask(&mut self) -> Trial<'_> {
        let number = self.trials.len();
        let mut rng = Rng::keyed(self.seed, "trial", number as u64);
        let space = self.intersection_space();
        let relative = if space.is_empty() {
            BTreeMap::new()
        } else {
            self.sampler
                .sample_relative(&self.trials, self.direction, &space, &mut rng)
        };
        self.trials.push(FrozenTrial {
            number,
            state: TrialState::Running,
            value: None,
            params: BTreeMap::new(),
            distributions: BTreeMap::new(),
            intermediate: BTreeMap::new(),
            rungs: BTreeMap::new(),
            duration_s: 0.0,
            note: None,
        });
        Trial {
            study: self,
            number,
            rng,
            relative,
            started: Instant::now(),
        }
    }

    /// Runs `n` trials of `objective`. A failed trial is recorded and the study goes on; an
    /// invalid suggestion stops it with the error.
    pub fn optimize(
        &mut self,
        n: usize,
        mut objective: impl FnMut(&mut Trial<'_>) -> Result<f64, TrialError>,
    ) -> Result<(), String> {
        for _ in 0..n {
            let mut trial = self.ask();
            let r = objective(&mut trial);
            match r {
                Ok(v) if v.is_finite() => trial.finish(TrialState::Complete, Some(v)),
                Ok(v) => trial.finish(TrialState::Failed, Some(v)),
                Err(TrialError::Pruned) => trial.finish(TrialState::Pruned, None),
                Err(TrialError::Failed(_)) => trial.finish(TrialState::Failed, None),
                Err(TrialError::Invalid(m)) => {
                    trial.finish(TrialState::Failed, None);
                    return Err(m);
                }
            }
        }
        Ok(())
    }

    /// The best completed trial.
    pub fn best_trial(&self) -> Option<&FrozenTrial> {
        self.trials
            .iter()
            .filter(|t| t.state == TrialState::Complete)
            .fold(None, |best: Option<&FrozenTrial>, t| match best {
                Some(b) if !self.direction.better(t.value.unwrap(), b.value.unwrap()) => Some(b),
                _ => Some(t),
            })
    }

    pub fn best_value(&self) -> Option<f64> {
        self.best_trial().and_then(|t| t.value)
    }
}

impl Trial<'_> {
    pub fn number(&self) -> usize {
        self.number
    }

    /// The parameters suggested so far (internal representation).
    pub fn params(&self) -> BTreeMap<String, f64> {
        self.study.trials[self.number].params.clone()
    }

    fn suggest(&mut self, name: &str, dist: Distribution) -> Result<f64, TrialError> {
        dist.validate()
            .map_err(|e| TrialError::Invalid(format!("parameter `{name}`: {e}")))?;
        let this = &self.study.trials[self.number];
        if let Some(&v) = this.params.get(name) {
            return Ok(v);
        }
        let v = if dist.single() {
            dist.snap(match &dist {
                Distribution::Float { low, .. } => *low,
                Distribution::Int { low, .. } => *low as f64,
                Distribution::Categorical { .. } => 0.0,
            })
        } else if let Some(&v) = self.relative.get(name) {
            v
        } else {
            let history = &self.study.trials[..self.number];
            self.study.sampler.sample_independent(
                history,
                self.study.direction,
                name,
                &dist,
                &mut self.rng,
            )
        };
        let v = dist.snap(v);
        let t = &mut self.study.trials[self.number];
        t.params.insert(name.to_string(), v);
        t.distributions.insert(name.to_string(), dist);
        Ok(v)
    }

    /// A float in `[low, high]` (log-uniform prior with `log`).
    pub fn suggest_float(
        &mut self,
        name: &str,
        low: f64,
        high: f64,
        log: bool,
    ) -> Result<f64, TrialError> {
        self.suggest(
            name,
            Distribution::Float {
                low,
                high,
                log,
                step: None,
            },
        )
    }

    /// An integer in `[low, high]`.
    pub fn suggest_int(&mut self, name: &str, low: i64, high: i64) -> Result<i64, TrialError> {
        self.suggest(
            name,
            Distribution::Int {
                low,
                high,
                log: false,
                step: 1,
            },
        )
        .map(|v| v.round() as i64)
    }

    /// The index of one of `n` choices.
    pub fn suggest_categorical(
        &mut self,
        name: &str,
        choices: &[toml::Value],
    ) -> Result<usize, TrialError> {
        self.suggest(
            name,
            Distribution::Categorical {
                choices: choices.to_vec(),
            },
        )
        .map(|v| v as usize)
    }

    /// A parameter with an explicit distribution (internal value).
    pub fn suggest_distribution(
        &mut self,
        name: &str,
        dist: Distribution,
    ) -> Result<f64, TrialError> {
        self.suggest(name, dist)
    }

    /// Records the intermediate value of `step` (e.g. an epoch's metric).
    pub fn report(&mut self, step: u64, value: f64) {
        self.study.trials[self.number]
            .intermediate
            .insert(step, value);
    }

    /// Whether the pruner says to stop this trial now.
    pub fn should_prune(&mut self) -> bool {
        let Some(p) = &self.study.pruner else {
            return false;
        };
        let (history, rest) = self.study.trials.split_at_mut(self.number);
        p.prune(history, &mut rest[0], self.study.direction)
    }

    fn finish(self, state: TrialState, value: Option<f64>) {
        let t = &mut self.study.trials[self.number];
        t.state = state;
        t.value = value;
        t.duration_s = self.started.elapsed().as_secs_f64();
    }
}
