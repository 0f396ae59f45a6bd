//! The tuner's library API: TPE finds good regions of standard test functions faster than
//! random search, reproducibly, and the pruners cut trials.

use wick::tune::{
    Direction, MedianPruner, RandomSampler, Sampler, Study, SuccessiveHalvingPruner, TpeSampler,
    TrialError, TrialState,
};

/// Branin on [-5, 10] × [0, 15]; the minimum is 0.397887.
fn branin(x: f64, y: f64) -> f64 {
    let pi = std::f64::consts::PI;
    let (a, b, c, r, s, t) = (
        1.0,
        5.1 / (4.0 * pi * pi),
        5.0 / pi,
        6.0,
        10.0,
        1.0 / (8.0 * pi),
    );
    a * (y - b * x * x + c * x - r).powi(2) + s * (1.0 - t) * x.cos() + s
}

fn best_after(sampler: Box<dyn Sampler>, seed: u64, n: usize) -> f64 {
    let mut study = Study::with_seed(Direction::Minimize, sampler, None, seed);
    study
        .optimize(n, |t| {
            let x = t.suggest_float("x", -5.0, 10.0, false)?;
            let y = t.suggest_float("y", 0.0, 15.0, false)?;
            Ok(branin(x, y))
        })
        .unwrap();
    study.best_value().unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[test]
fn tpe_beats_random_search_on_branin() {
    let seeds = 0..9u64;
    let tpe = median(
        seeds
            .clone()
            .map(|s| best_after(Box::new(TpeSampler::new()), s, 60))
            .collect(),
    );
    let uni = median(
        seeds
            .clone()
            .map(|s| best_after(Box::new(TpeSampler::univariate()), s, 60))
            .collect(),
    );
    let rnd = median(
        seeds
            .map(|s| best_after(Box::new(RandomSampler), s, 60))
            .collect(),
    );
    assert!(tpe < 0.6, "multivariate TPE median best {tpe}");
    assert!(uni < 0.8, "univariate TPE median best {uni}");
    assert!(tpe < rnd && uni < rnd, "tpe {tpe} / {uni} vs random {rnd}");
}

#[test]
fn same_seed_same_sequence() {
    let run = |seed| {
        let mut study =
            Study::with_seed(Direction::Maximize, Box::new(TpeSampler::new()), None, seed);
        study
            .optimize(30, |t| {
                let lr = t.suggest_float("lr", 1e-4, 1e-1, true)?;
                let layers = t.suggest_int("layers", 1, 4)?;
                let act =
                    t.suggest_categorical("act", &["relu".into(), "tanh".into(), "gelu".into()])?;
                Ok(-(lr.ln() + 5.0).powi(2) - (layers as f64 - 3.0).powi(2) + act as f64)
            })
            .unwrap();
        study
            .trials
            .iter()
            .map(|t| (t.params.clone(), t.value))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(5), run(5));
    assert_ne!(run(5), run(6));
    // Values respect the distributions.
    for (p, _) in run(7) {
        assert!((1e-4..=1e-1).contains(&p["lr"]));
        assert!(p["layers"].fract() == 0.0 && (1.0..=4.0).contains(&p["layers"]));
        assert!([0.0, 1.0, 2.0].contains(&p["act"]));
    }
}

#[test]
fn invalid_suggestions_stop_the_study_with_a_clear_error() {
    let mut study = Study::new(Direction::Minimize, Box::new(TpeSampler::new()), None);
    let e = study
        .optimize(3, |t| t.suggest_float("lr", 0.0, 1.0, true))
        .unwrap_err();
    assert_eq!(e, "parameter `lr`: log = true needs low > 0, got 0");
    let e = study
        .optimize(1, |t| t.suggest_float("x", 2.0, 1.0, false))
        .unwrap_err();
    assert_eq!(e, "parameter `x`: low 2 > high 1");
}

/// A learning curve that approaches `final` as 1/step; trials differ by their `quality`.
fn curve(final_value: f64, step: u64) -> f64 {
    final_value * (1.0 - 1.0 / (step as f64 + 1.0))
}

fn pruned_study(pruner: Option<Box<dyn wick::tune::Pruner>>) -> (f64, u64) {
    let mut study = Study::with_seed(Direction::Maximize, Box::new(TpeSampler::new()), pruner, 3);
    let mut steps = 0u64;
    study
        .optimize(40, |t| {
            let q = t.suggest_float("q", 0.0, 1.0, false)?;
            let final_value = 1.0 - (q - 0.7).powi(2);
            for s in 1..=20 {
                steps += 1;
                t.report(s, curve(final_value, s));
                if t.should_prune() {
                    return Err(TrialError::Pruned);
                }
            }
            Ok(curve(final_value, 20))
        })
        .unwrap();
    (study.best_value().unwrap(), steps)
}

#[test]
fn pruners_cut_work_and_keep_the_best() {
    let (best_full, steps_full) = pruned_study(None);
    assert_eq!(steps_full, 40 * 20);
    for pruner in [
        Box::new(MedianPruner::default()) as Box<dyn wick::tune::Pruner>,
        Box::new(SuccessiveHalvingPruner::default()),
    ] {
        let (best, steps) = pruned_study(Some(pruner));
        assert!(steps < steps_full * 7 / 10, "{steps} of {steps_full} steps");
        assert!(best > best_full - 0.01, "best {best} vs {best_full}");
    }
    let mut study = Study::new(
        Direction::Maximize,
        Box::new(RandomSampler),
        Some(Box::new(MedianPruner::default())),
    );
    study
        .optimize(10, |t| {
            let q = t.suggest_float("q", 0.0, 1.0, false)?;
            t.report(1, q);
            if t.should_prune() {
                return Err(TrialError::Pruned);
            }
            Ok(q)
        })
        .unwrap();
    assert!(study.trials.iter().any(|t| t.state == TrialState::Pruned));
}
