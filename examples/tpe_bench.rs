//! wick's TPE through the library API, for `benches/compare/tpe_quality.py`:
//!
//! - `quality [SEEDS [FIRST [SAMPLER]]]`: Branin (2-D) and Hartmann6 (6-D), 100 trials × SEEDS
//!   seeds (default 20, from FIRST = 0); prints the median best value after 25, 50 and 100
//!   trials, and each seed's, as JSON. SAMPLER is `wick` (`TpeSampler::new()`, the default),
//!   `optuna` (`TpeSampler::optuna()`, Optuna's defaults) or `univariate`
//!   (`TpeSampler::univariate()`, as Optuna's `multivariate=False`), optionally with
//!   overrides: `optuna,gamma=0.2,candidates=64,ei=1` (also `startup=`, `prior=`, `clip=`,
//!   `clip_exp=`, `min_bw=`);
//! - `overhead N [SAMPLER]`: a study of N trials of a trivial objective; prints the sampler's mean time
//!   per trial over the last 50 trials (the cost at that study size) and over all trials;
//! - `proposals S` (a history as JSON on stdin: `{"bounds": [[lo, hi], …], "x": [[…], …],
//!   "values": […]}`): the next point TPE proposes after that history, under sampler seeds
//!   `0..S`, as JSON, for `benches/compare/tpe_same_history.py`. These use Optuna's defaults
//!   (`TpeSampler::optuna()`), since the script tests that wick's algorithm is Optuna's.

use std::time::Instant;

use wick::tune::{Direction, Distribution, FrozenTrial, Study, TpeSampler, TrialState};

/// A named test function and its box bounds.
type Problem = (&'static str, fn(&[f64]) -> f64, Vec<(f64, f64)>);

fn branin(x: &[f64]) -> f64 {
    let pi = std::f64::consts::PI;
    let (x1, x2) = (x[0], x[1]);
    let b = 5.1 / (4.0 * pi * pi);
    let c = 5.0 / pi;
    let t = 1.0 / (8.0 * pi);
    (x2 - b * x1 * x1 + c * x1 - 6.0).powi(2) + 10.0 * (1.0 - t) * x1.cos() + 10.0
}

fn hartmann6(x: &[f64]) -> f64 {
    const A: [[f64; 6]; 4] = [
        [10.0, 3.0, 17.0, 3.5, 1.7, 8.0],
        [0.05, 10.0, 17.0, 0.1, 8.0, 14.0],
        [3.0, 3.5, 1.7, 10.0, 17.0, 8.0],
        [17.0, 8.0, 0.05, 10.0, 0.1, 14.0],
    ];
    const P: [[f64; 6]; 4] = [
        [0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886],
        [0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991],
        [0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650],
        [0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381],
    ];
    const ALPHA: [f64; 4] = [1.0, 1.2, 3.0, 3.2];
    -(0..4)
        .map(|i| {
            let s: f64 = (0..6).map(|j| A[i][j] * (x[j] - P[i][j]).powi(2)).sum();
            ALPHA[i] * (-s).exp()
        })
        .sum::<f64>()
}

/// Best-so-far values after each trial.
fn run(
    f: fn(&[f64]) -> f64,
    bounds: &[(f64, f64)],
    sampler: &TpeSampler,
    seed: u64,
    n: usize,
) -> Vec<f64> {
    let sampler = sampler.clone();
    let mut study = Study::with_seed(Direction::Minimize, Box::new(sampler), None, seed);
    study
        .optimize(n, |t| {
            let x: Vec<f64> = bounds
                .iter()
                .enumerate()
                .map(|(i, &(lo, hi))| t.suggest_float(&format!("x{i}"), lo, hi, false))
                .collect::<Result<_, _>>()?;
            Ok(f(&x))
        })
        .unwrap();
    let mut best = f64::INFINITY;
    study
        .trials
        .iter()
        .map(|t| {
            best = best.min(t.value.unwrap_or(f64::INFINITY));
            best
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// The sampler a command names: `wick` (the default), `optuna` or `univariate`, optionally
/// followed by overrides, e.g. `optuna,gamma=0.2,candidates=64,ei=1` (also `startup=N`,
/// `prior=W`, `clip=0|1`, `clip_exp=E`, `min_bw=F`).
fn sampler(name: Option<&String>) -> TpeSampler {
    let spec = name.map(String::as_str).unwrap_or("wick");
    let mut parts = spec.split(',');
    let mut s = match parts.next() {
        Some("wick") => TpeSampler::new(),
        Some("optuna") => TpeSampler::optuna(),
        Some("univariate") => TpeSampler::univariate(),
        other => fail(&format!(
            "unknown sampler {:?}: expected wick, optuna or univariate",
            other.unwrap_or_default()
        )),
    };
    for kv in parts {
        let (k, v) = kv
            .split_once('=')
            .unwrap_or_else(|| fail(&format!("{kv:?}: expected key=value")));
        let num = |v: &str| -> f64 {
            v.parse()
                .unwrap_or_else(|_| fail(&format!("{kv:?}: expected a number")))
        };
        match k {
            "gamma" => s.gamma = num(v),
            "candidates" => s.n_ei_candidates = num(v) as usize,
            "startup" => s.n_startup_trials = num(v) as usize,
            "prior" => s.prior_weight = num(v),
            "clip" => s.consider_magic_clip = num(v) != 0.0,
            "clip_exp" => s.magic_clip_exponent = num(v),
            "min_bw" => s.min_bandwidth_factor = num(v),
            "ei" => s.ei_weights = num(v) != 0.0,
            _ => fail(&format!(
                "unknown setting {k:?}: expected gamma, candidates, ei, startup, prior, clip, clip_exp or min_bw"
            )),
        }
    }
    s
}

fn fail(msg: &str) -> ! {
    eprintln!("{msg}");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("proposals") => {
            let seeds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
            let h: serde_json::Value = serde_json::from_reader(std::io::stdin()).unwrap();
            let f64s = |v: &serde_json::Value| -> Vec<f64> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect()
            };
            let bounds: Vec<Vec<f64>> = h["bounds"].as_array().unwrap().iter().map(f64s).collect();
            let xs: Vec<Vec<f64>> = h["x"].as_array().unwrap().iter().map(f64s).collect();
            let values = f64s(&h["values"]);
            let dists: std::collections::BTreeMap<String, Distribution> = bounds
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let d = Distribution::Float {
                        low: b[0],
                        high: b[1],
                        log: false,
                        step: None,
                    };
                    (format!("x{i}"), d)
                })
                .collect();
            let history: Vec<FrozenTrial> = xs
                .iter()
                .zip(&values)
                .enumerate()
                .map(|(number, (x, &v))| FrozenTrial {
                    number,
                    state: TrialState::Complete,
                    value: Some(v),
                    params: (0..x.len()).map(|i| (format!("x{i}"), x[i])).collect(),
                    distributions: dists.clone(),
                    intermediate: Default::default(),
                    rungs: Default::default(),
                    duration_s: 0.0,
                    note: None,
                })
                .collect();
            let proposals: Vec<Vec<f64>> = (0..seeds)
                .map(|seed| {
                    let mut study = Study::with_seed(
                        Direction::Minimize,
                        Box::new(TpeSampler::optuna()),
                        None,
                        seed,
                    );
                    study.trials = history.clone();
                    let mut t = study.ask();
                    bounds
                        .iter()
                        .enumerate()
                        .map(|(i, b)| {
                            t.suggest_float(&format!("x{i}"), b[0], b[1], false)
                                .unwrap()
                        })
                        .collect()
                })
                .collect();
            println!("{}", serde_json::json!({ "proposals": proposals }));
        }
        Some("overhead") => {
            let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1000);
            let mut study =
                Study::with_seed(Direction::Minimize, Box::new(sampler(args.get(2))), None, 0);
            let mut times = Vec::with_capacity(n);
            for _ in 0..n {
                let t0 = Instant::now();
                let mut t = study.ask();
                let x = t.suggest_float("x", -10.0, 10.0, false).unwrap();
                let y = t.suggest_float("y", -10.0, 10.0, false).unwrap();
                drop(t);
                // A trivial objective, told through the same path as `optimize`.
                let v = x * x + y * y;
                let last = study.trials.last_mut().unwrap();
                last.state = wick::tune::TrialState::Complete;
                last.value = Some(v);
                times.push(t0.elapsed().as_secs_f64());
            }
            let tail = &times[n.saturating_sub(50)..];
            println!(
                "{}",
                serde_json::json!({
                    "framework": "wick",
                    "trials": n,
                    "ms_per_trial_last50": 1e3 * tail.iter().sum::<f64>() / tail.len() as f64,
                    "ms_per_trial_mean": 1e3 * times.iter().sum::<f64>() / n as f64,
                })
            );
        }
        _ => {
            let problems: [Problem; 2] = [
                ("branin", branin, vec![(-5.0, 10.0), (0.0, 15.0)]),
                ("hartmann6", hartmann6, vec![(0.0, 1.0); 6]),
            ];
            // `quality [SEEDS [FIRST [SAMPLER]]]`: seeds FIRST.. FIRST+SEEDS (default 0..20).
            let seeds: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(20);
            let first: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(0);
            let sampler = sampler(args.get(3));
            let mut out = serde_json::Map::new();
            for (name, f, bounds) in problems {
                let curves: Vec<Vec<f64>> = (first..first + seeds)
                    .map(|s| run(f, &bounds, &sampler, s, 100))
                    .collect();
                let at = |k: usize| median(curves.iter().map(|c| c[k - 1]).collect());
                let per_seed = |k: usize| curves.iter().map(|c| c[k - 1]).collect::<Vec<f64>>();
                out.insert(
                    name.into(),
                    serde_json::json!({
                        "25": at(25), "50": at(50), "100": at(100),
                        "per_seed": {"25": per_seed(25), "50": per_seed(50), "100": per_seed(100)},
                    }),
                );
            }
            println!("{}", serde_json::Value::Object(out));
        }
    }
}
