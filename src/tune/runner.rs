//! `wick tune`: a study whose trials are full training runs of a config with sampled
//! overrides, recorded in a shared journal so that it survives crashes and runs on several
//! worker processes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::journal::{replay, Journal, Record};
use super::pruner::{MedianPruner, Pruner, SuccessiveHalvingPruner};
use super::space::Distribution;
use super::study::{Direction, FrozenTrial, RandomSampler, Sampler, Study, TrialState};
use super::tpe::TpeSampler;
use crate::config::{Config, PrunerKind, SamplerKind, TuneConfig};
use crate::rng::Rng;
use crate::train::callback::{Callback, Control, EpochEnd};
use crate::train::metrics::higher_is_better;
use crate::train::{RunDir, Trainer};
use crate::{Error, Result};

/// A validated study: the base config (without `[tune]`), the space, metric and direction.
#[derive(Debug, Clone)]
pub struct TuneRun {
    pub base: Config,
    pub tune: TuneConfig,
    pub space: Vec<(String, Distribution)>,
    pub metric: String,
    pub direction: Direction,
    /// The study directory (holds the journal, the trials' run directories and the outputs).
    pub dir: PathBuf,
    pub journal: PathBuf,
}

fn bad(origin: &str, key: &str, msg: impl std::fmt::Display) -> Error {
    Error::Config(format!("{origin}: [tune.space] \"{key}\": {msg}"))
}

impl TuneRun {
    /// Checks `[tune]` of `cfg` (loaded from `origin`).
    pub fn new(cfg: &Config, origin: &str) -> Result<Self> {
        let tune = cfg.tune.clone().ok_or_else(|| {
            Error::Config(format!(
                "{origin}: no [tune] section; add one with n_trials, metric and [tune.space]"
            ))
        })?;
        let mut base = cfg.clone();
        base.tune = None;
        if tune.n_trials == 0 {
            return Err(Error::Config(format!(
                "{origin}: `tune.n_trials` = 0: expected 1 or more"
            )));
        }
        if tune.workers == 0 {
            return Err(Error::Config(format!(
                "{origin}: `tune.workers` = 0: expected 1 or more"
            )));
        }
        if !(tune.tpe.gamma > 0.0 && tune.tpe.gamma <= 1.0) {
            return Err(Error::Config(format!(
                "{origin}: `tune.tpe.gamma` = {}: expected the good group's share of the trials, in (0, 1], e.g. 0.2",
                tune.tpe.gamma
            )));
        }
        if tune.tpe.n_ei_candidates == 0 {
            return Err(Error::Config(format!(
                "{origin}: `tune.tpe.n_ei_candidates` = 0: expected 1 or more, e.g. 64"
            )));
        }
        if tune.space.is_empty() {
            return Err(Error::Config(format!(
                "{origin}: [tune.space] is empty; add e.g. \"optim.lr\" = {{ float = [1e-4, 1e-1], log = true }}"
            )));
        }
        let metric = tune
            .metric
            .clone()
            .or_else(|| base.train.monitor.clone())
            .unwrap_or_else(|| "eval_accuracy".into());
        let valid = crate::config::monitor_names(crate::config::Task::Auto);
        if !valid.contains(&metric.as_str()) {
            return Err(Error::Config(format!(
                "{origin}: `tune.metric` = \"{metric}\" is not a metric the trainer reports; use one of {}",
                valid.join(", ")
            )));
        }
        let direction = tune.direction.unwrap_or(if higher_is_better(&metric) {
            Direction::Maximize
        } else {
            Direction::Minimize
        });
        let base_text = toml::to_string(&base).expect("config serializes");
        let mut space = Vec::new();
        for (key, spec) in &tune.space {
            let n_kinds = spec.float.is_some() as u8
                + spec.int.is_some() as u8
                + spec.choices.is_some() as u8;
            if n_kinds != 1 {
                return Err(bad(origin, key, "give exactly one of `float = [low, high]`, `int = [low, high]` or `choices = [...]`"));
            }
            let dist = if let Some([low, high]) = spec.float {
                Distribution::Float {
                    low,
                    high,
                    log: spec.log,
                    step: spec.step,
                }
            } else if let Some([low, high]) = spec.int {
                let step = spec.step.unwrap_or(1.0);
                if step.fract() != 0.0 {
                    return Err(bad(
                        origin,
                        key,
                        format!("an int step must be a whole number, got {step}"),
                    ));
                }
                Distribution::Int {
                    low,
                    high,
                    log: spec.log,
                    step: step as i64,
                }
            } else {
                Distribution::Categorical {
                    choices: spec.choices.clone().unwrap_or_default(),
                }
            };
            if let Distribution::Float { low, high, .. } = dist {
                if low == high {
                    return Err(bad(origin, key, "the range is empty (low = high)"));
                }
            }
            dist.validate().map_err(|e| bad(origin, key, e))?;
            if tune.sampler == SamplerKind::Grid {
                if let Distribution::Float { step: None, .. } = dist {
                    return Err(bad(
                        origin,
                        key,
                        "the grid sampler needs `step` (or `choices`) for floats",
                    ));
                }
            }
            // The path must name a config key that accepts such a value, and the config must
            // be valid at both ends of the range (every choice of a categorical): otherwise
            // trials would fail one after another.
            let ends: Vec<f64> = match &dist {
                Distribution::Categorical { choices } => {
                    (0..choices.len()).map(|i| i as f64).collect()
                }
                _ => vec![dist.snap(f64::MIN), dist.snap(f64::MAX)],
            };
            let strip = |e: Error| {
                let msg = e.to_string();
                msg.split_once(": ")
                    .map(|(_, m)| m.to_string())
                    .unwrap_or(msg)
            };
            for end in ends {
                let value = dist.to_value(end);
                let probe = format!("{key}={value}");
                let mut cfg =
                    crate::config::load_str(&base_text, origin, &[probe]).map_err(|e| {
                        bad(
                            origin,
                            key,
                            format!("not a usable config path: {}", strip(e)),
                        )
                    })?;
                crate::config::validate(&mut cfg, origin).map_err(|e| {
                    bad(
                        origin,
                        key,
                        format!("a trial with {key} = {value} would fail: {}", strip(e)),
                    )
                })?;
            }
            space.push((key.clone(), dist));
        }
        let journal = tune.storage.clone().unwrap_or_else(|| {
            PathBuf::from("checkpoints/tune")
                .join(&base.run.name)
                .join("journal.jsonl")
        });
        let dir = journal
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(Self {
            base,
            tune,
            space,
            metric,
            direction,
            dir,
            journal,
        })
    }

    fn sampler(&self) -> Box<dyn Sampler> {
        match self.tune.sampler {
            SamplerKind::Tpe => {
                let t = &self.tune.tpe;
                Box::new(TpeSampler {
                    n_startup_trials: t.n_startup_trials,
                    n_ei_candidates: t.n_ei_candidates,
                    gamma: t.gamma,
                    multivariate: t.multivariate,
                    ei_weights: t.ei_weights,
                    ..TpeSampler::new()
                })
            }
            SamplerKind::Random => Box::new(RandomSampler),
            SamplerKind::Grid => Box::new(GridSampler::new(&self.space)),
        }
    }

    fn pruner(&self) -> Option<Box<dyn Pruner>> {
        match self.tune.pruner {
            PrunerKind::None => None,
            PrunerKind::Median => Some(Box::new(MedianPruner::default())),
            PrunerKind::Asha => Some(Box::new(SuccessiveHalvingPruner::default())),
        }
    }

    /// The parameters of trial `number` given the trials before it.
    fn sample(&self, trials: &[FrozenTrial]) -> Result<BTreeMap<String, f64>> {
        let mut study = Study::with_seed(self.direction, self.sampler(), None, self.tune.seed);
        study.trials = trials.to_vec();
        let mut t = study.ask();
        for (name, dist) in &self.space {
            t.suggest_distribution(name, dist.clone())
                .map_err(|e| Error::Config(format!("tune.space \"{name}\": {e}")))?;
        }
        Ok(t.params())
    }

    /// The full config of a trial with `params`.
    pub fn trial_config(&self, params: &BTreeMap<String, f64>) -> Result<Config> {
        let overrides: Vec<String> = self
            .space
            .iter()
            .map(|(k, d)| format!("{k}={}", d.to_value(params[k])))
            .collect();
        let text = toml::to_string(&self.base).expect("config serializes");
        let mut cfg = crate::config::load_str(&text, "tune trial", &overrides)?;
        crate::config::validate(&mut cfg, "tune trial")?;
        Ok(cfg)
    }

    pub fn trial_dir(&self, number: usize) -> PathBuf {
        self.dir.join("trials").join(format!("trial-{number:04}"))
    }

    /// Marks trials left running by a dead process as failed (they are retried under new
    /// numbers). Call only while no worker of this study runs.
    pub fn recover(&self) -> Result<usize> {
        let mut j = Journal::open(&self.journal)?;
        j.transact(|recs| {
            let stale: Vec<Record> = replay(recs)
                .iter()
                .filter(|t| t.state == TrialState::Running)
                .map(|t| Record::Finish {
                    trial: t.number,
                    state: TrialState::Failed,
                    value: None,
                    duration_s: 0.0,
                    note: Some("the process running it died; retried".into()),
                })
                .collect();
            Ok((stale.len(), stale))
        })
    }

    /// Runs trials until the study has `n_trials` finished (complete or pruned) trials.
    pub fn work(
        &self,
        worker: u32,
        on_finish: &mut dyn FnMut(&FrozenTrial, &[FrozenTrial]),
    ) -> Result<()> {
        let mut journal = Journal::open(&self.journal)?;
        loop {
            let next = journal.transact(|recs| {
                let trials = replay(recs);
                let busy = trials
                    .iter()
                    .filter(|t| {
                        matches!(
                            t.state,
                            TrialState::Complete | TrialState::Pruned | TrialState::Running
                        )
                    })
                    .count();
                if busy >= self.tune.n_trials {
                    return Ok((None, Vec::new()));
                }
                let params = self.sample(&trials)?;
                let number = trials.len();
                let distributions = self.space.iter().cloned().collect();
                let rec = Record::Start {
                    trial: number,
                    params: params.clone(),
                    distributions,
                    worker,
                };
                Ok((Some((number, params)), vec![rec]))
            })?;
            let Some((number, params)) = next else {
                return Ok(());
            };
            let t0 = Instant::now();
            let (state, value, note) = match self.run_trial(number, &params) {
                Ok((s, v)) => (s, v, None),
                Err(e) => (TrialState::Failed, None, Some(e.to_string())),
            };
            let fin = Record::Finish {
                trial: number,
                state,
                value,
                duration_s: t0.elapsed().as_secs_f64(),
                note,
            };
            let trials = journal.transact(|recs| {
                let mut all = recs.to_vec();
                all.push(fin.clone());
                Ok((replay(&all), vec![fin.clone()]))
            })?;
            on_finish(&trials[number], &trials);
            self.check_failures(&trials)?;
        }
    }

    /// An error once the last [`Self::failure_limit`] finished trials all failed: a base
    /// config or space that cannot train would otherwise start new trials forever (failed
    /// trials do not count towards `n_trials`).
    fn check_failures(&self, trials: &[FrozenTrial]) -> Result<()> {
        let limit = self.failure_limit();
        let failed: Vec<&FrozenTrial> = trials
            .iter()
            .rev()
            .filter(|t| t.state != TrialState::Running)
            .take(limit)
            .take_while(|t| t.state == TrialState::Failed)
            .collect();
        if failed.len() < limit {
            return Ok(());
        }
        let why = failed
            .first()
            .and_then(|t| t.note.clone())
            .unwrap_or_else(|| "no reason recorded".into());
        Err(Error::Config(format!(
            "the last {limit} trials all failed (trial {}: {why}); fix the base config or tune.space, then run `wick tune` again to go on (the notes are in {})",
            failed[0].number,
            self.journal.display()
        )))
    }

    /// How many failed trials in a row stop a study: `n_trials`, and at least 5.
    pub fn failure_limit(&self) -> usize {
        self.tune.n_trials.max(5)
    }

    fn run_trial(
        &self,
        number: usize,
        params: &BTreeMap<String, f64>,
    ) -> Result<(TrialState, Option<f64>)> {
        let cfg = self.trial_config(params)?;
        let dir = self.trial_dir(number);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        let mut trainer = Trainer::from_config(&cfg)?;
        let run = RunDir::create(&cfg, &trainer.schema, Some(&dir))?;
        let reporter = Reporter {
            journal: Journal::open(&self.journal)?,
            number,
            metric: self.metric.clone(),
            direction: self.direction,
            pruner: self.pruner(),
            pruned: std::rc::Rc::new(std::cell::Cell::new(false)),
            last: std::rc::Rc::new(std::cell::Cell::new(None)),
        };
        let (pruned, last) = (reporter.pruned.clone(), reporter.last.clone());
        trainer.add_callback(reporter);
        let summary = trainer.fit(&run, false)?;
        if pruned.get() {
            return Ok((TrialState::Pruned, last.get()));
        }
        let v = summary
            .final_metrics
            .get(&self.metric)
            .copied()
            .ok_or_else(|| {
                Error::Config(format!(
                    "the trainer reported no `{}` for this task; set tune.metric to one it reports",
                    self.metric
                ))
            })?;
        Ok((TrialState::Complete, Some(v)))
    }
}

/// Reports the metric after each evaluation and applies the pruner.
struct Reporter {
    journal: Journal,
    number: usize,
    metric: String,
    direction: Direction,
    pruner: Option<Box<dyn Pruner>>,
    pruned: std::rc::Rc<std::cell::Cell<bool>>,
    last: std::rc::Rc<std::cell::Cell<Option<f64>>>,
}

impl Callback for Reporter {
    fn on_epoch_end(&mut self, e: &EpochEnd) -> Result<Control> {
        let Some(&v) = e.metrics.get(&self.metric) else {
            return Ok(Control::Continue);
        };
        self.last.set(Some(v));
        let (number, step) = (self.number, e.epoch as u64);
        let (pruner, direction) = (&self.pruner, self.direction);
        let prune = self.journal.transact(|recs| {
            let mut new = vec![Record::Report {
                trial: number,
                step,
                value: v,
            }];
            let Some(p) = pruner else {
                return Ok((false, new));
            };
            let mut trials = replay(recs);
            let mut me = trials.remove(number);
            me.intermediate.insert(step, v);
            let before = me.rungs.clone();
            let prune = p.prune(&trials, &mut me, direction);
            for (&rung, &value) in me.rungs.iter().filter(|(r, _)| !before.contains_key(r)) {
                new.push(Record::Rung {
                    trial: number,
                    rung,
                    value,
                });
            }
            Ok((prune, new))
        })?;
        if prune {
            self.pruned.set(true);
            return Ok(Control::Stop);
        }
        Ok(Control::Continue)
    }
}

/// Exhaustive search over a grid: trial `n` takes the `n`-th combination (mixed radix, in
/// parameter-name order).
pub struct GridSampler {
    values: BTreeMap<String, Vec<f64>>,
}

impl GridSampler {
    pub fn new(space: &[(String, Distribution)]) -> Self {
        let values = space
            .iter()
            .map(|(k, d)| {
                let v: Vec<f64> = match d {
                    Distribution::Float {
                        low, high, step, ..
                    } => {
                        let s = step.unwrap_or(high - low).max(f64::MIN_POSITIVE);
                        let n = ((high - low) / s + 1e-9).floor() as usize + 1;
                        (0..n).map(|i| low + i as f64 * s).collect()
                    }
                    Distribution::Int {
                        low, high, step, ..
                    } => (0..=((high - low) / step))
                        .map(|i| (low + i * step) as f64)
                        .collect(),
                    Distribution::Categorical { choices } => {
                        (0..choices.len()).map(|i| i as f64).collect()
                    }
                };
                (k.clone(), v)
            })
            .collect();
        Self { values }
    }

    /// Number of grid points.
    pub fn size(&self) -> usize {
        self.values.values().map(Vec::len).product()
    }
}

impl Sampler for GridSampler {
    fn sample_independent(
        &mut self,
        history: &[FrozenTrial],
        _direction: Direction,
        name: &str,
        dist: &Distribution,
        rng: &mut Rng,
    ) -> f64 {
        let Some(vals) = self.values.get(name) else {
            return super::study::sample_uniform(dist, rng);
        };
        let mut idx = history.len() % self.size().max(1);
        for (k, v) in &self.values {
            if k == name {
                return vals[idx % v.len()];
            }
            idx /= v.len();
        }
        vals[0]
    }
}
