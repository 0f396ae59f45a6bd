//! The Tree-structured Parzen Estimator, after Optuna 5's `TPESampler`: Optuna's weights of
//! old trials, prior weight 1, magic-clip bandwidths, no endpoint bandwidths, multivariate
//! sampling and the constant liar, log/int/step handling through truncated and discretised
//! normals, and categoricals as smoothed histograms.
//!
//! [`TpeSampler::optuna`] has Optuna's defaults exactly (10 random start-up trials, 24
//! expected-improvement candidates, a good group of min(⌈0.1 n⌉, 25) trials), and proposes
//! from the same distribution as Optuna given the same history
//! (`benches/compare/tpe_same_history.py`). [`TpeSampler::new`], wick's default, differs in
//! three settings chosen on seeds of Branin and Hartmann6 held out from the reported ones
//! (`docs/PERFORMANCE.md`): a good group of min(⌈0.2 n⌉, 25) trials, weighted by how much each
//! improves on the rest (the "EI" weighting of Watanabe, "Tree-structured Parzen estimator:
//! understanding its algorithm components", 2023), and 64 candidates. The larger group keeps
//! more of the promising region in l(x); the weights pull l(x) towards the best trials within
//! it; the extra candidates search the acquisition more sharply, for about 0.1 ms more per
//! proposal at 1,000 trials.
//!
//! Departures: random numbers come from wick's keyed generator (so a seed gives a different,
//! equally reproducible sequence than Optuna's); constraints and multi-objective are not
//! supported.

use std::collections::BTreeMap;

use super::space::Distribution;
use super::study::{sample_uniform, Direction, FrozenTrial, Sampler, TrialState};
use crate::model::vecmath;
use crate::rng::Rng;

/// How many of `n` finished trials form the "good" group: min(⌈gamma · n⌉, 25). With gamma
/// 0.1 this is Optuna's `default_gamma`.
pub fn n_good(gamma: f64, n: usize) -> usize {
    ((gamma * n as f64).ceil() as usize).min(25)
}

/// Optuna's `default_weights`: recent trials weigh 1, older ones ramp down (beyond 25).
pub fn default_weights(n: usize) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    if n < 25 {
        return vec![1.0; n];
    }
    let ramp_n = n - 25;
    let lo = 1.0 / n as f64;
    let mut w: Vec<f64> = (0..ramp_n)
        .map(|i| {
            if ramp_n == 1 {
                lo
            } else {
                lo + (1.0 - lo) * i as f64 / (ramp_n - 1) as f64
            }
        })
        .collect();
    w.extend(std::iter::repeat_n(1.0, 25));
    w
}

/// TPE settings.
#[derive(Debug, Clone)]
pub struct TpeSampler {
    /// Trials sampled uniformly before the estimator takes over.
    pub n_startup_trials: usize,
    /// Points drawn from l(x), of which the one with the largest l(x)/g(x) is proposed.
    pub n_ei_candidates: usize,
    /// The share of finished trials in the good group (at most 25 trials; see [`n_good`]).
    pub gamma: f64,
    pub prior_weight: f64,
    pub consider_magic_clip: bool,
    /// With the magic clip, the smallest bandwidth is `max(min_bandwidth_factor, (1 + k)^-e)`
    /// of the range for k kernels, `e` being this exponent (Optuna: 1, i.e. range / min(100,
    /// 1 + k)). Watanabe 2023's `b_magic_exponent`.
    pub magic_clip_exponent: f64,
    /// See [`Self::magic_clip_exponent`] (Optuna: 0.01).
    pub min_bandwidth_factor: f64,
    /// Weighs each good trial by how much it improves on the best of the other group
    /// (Watanabe 2023's "EI" weighting), with the prior weighing their mean; `false` is
    /// Optuna's weights (recent trials 1, older ones less, the prior `prior_weight`). The
    /// other group always has Optuna's weights.
    pub ei_weights: bool,
    pub multivariate: bool,
    pub constant_liar: bool,
}

impl TpeSampler {
    /// wick's defaults: Optuna 5's sampler (multivariate, constant liar) with a good group of
    /// ⌈0.2 n⌉ trials (at most 25) weighted by their improvement ([`Self::ei_weights`]), and 64
    /// candidates. On Branin and Hartmann6, over seeds held out from the reported ones, these
    /// find better values than Optuna's defaults at 25, 50 and 100 trials
    /// (`docs/PERFORMANCE.md`). Random numbers come from the study's per-trial streams.
    pub fn new() -> Self {
        Self {
            n_ei_candidates: 64,
            gamma: 0.2,
            ei_weights: true,
            ..Self::optuna()
        }
    }

    /// Optuna 5's `TPESampler()` defaults exactly: 10 start-up trials, 24 candidates, gamma
    /// 0.1, Optuna's weights and magic clip, multivariate, constant liar.
    pub fn optuna() -> Self {
        Self {
            n_startup_trials: 10,
            n_ei_candidates: 24,
            gamma: 0.1,
            prior_weight: 1.0,
            consider_magic_clip: true,
            magic_clip_exponent: 1.0,
            min_bandwidth_factor: 0.01,
            ei_weights: false,
            multivariate: true,
            constant_liar: true,
        }
    }

    /// Independent (univariate) TPE, as Optuna's `TPESampler(multivariate=False)`, the default
    /// before Optuna 5.
    pub fn univariate() -> Self {
        Self {
            multivariate: false,
            ..Self::optuna()
        }
    }
}

impl Default for TpeSampler {
    fn default() -> Self {
        Self::new()
    }
}

const SQRT2: f64 = std::f64::consts::SQRT_2;

/// Standard normal CDF.
fn ndtr(x: f64) -> f64 {
    0.5 * libm::erfc(-x / SQRT2)
}

/// log(Φ(b) - Φ(a)) for a < b, accurate in both tails.
fn log_diff_ndtr(a: f64, b: f64) -> f64 {
    if a < -8.5 && b > 8.5 {
        // Both tails hold less than 1e-17: the mass is 1 to double precision.
        return 0.0;
    }
    if a > 0.0 {
        // Upper tail: Φ(b) - Φ(a) = Φ(-a) - Φ(-b).
        (ndtr(-a) - ndtr(-b)).max(f64::MIN_POSITIVE).ln()
    } else {
        (ndtr(b) - ndtr(a)).max(f64::MIN_POSITIVE).ln()
    }
}

/// Inverse of the standard normal CDF (Acklam's approximation plus a Newton step).
fn ndtri(p: f64) -> f64 {
    let p = p.clamp(1e-300, 1.0 - 1e-16);
    const A: [f64; 6] = [
        -3.969683028665376e+01,
        2.209460984245205e+02,
        -2.759285104469687e+02,
        1.38357751867269e+02,
        -3.066479806614716e+01,
        2.506628277459239e+00,
    ];
    const B: [f64; 5] = [
        -5.447609879822406e+01,
        1.615858368580409e+02,
        -1.556989798598866e+02,
        6.680131188771972e+01,
        -1.328068155288572e+01,
    ];
    const C: [f64; 6] = [
        -7.784894002430293e-03,
        -3.223964580411365e-01,
        -2.400758277161838e+00,
        -2.549732539343734e+00,
        4.374664141464968e+00,
        2.938163982698783e+00,
    ];
    const D: [f64; 4] = [
        7.784695709041462e-03,
        3.224671290700398e-01,
        2.445134137142996e+00,
        3.754408661907416e+00,
    ];
    let x = if p < 0.02425 {
        let q = (-2.0 * p.ln()).sqrt();
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else if p > 1.0 - 0.02425 {
        let q = (-2.0 * (1.0 - p).ln()).sqrt();
        -(((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    };
    // One Newton step on Φ(x) = p.
    let e = ndtr(x) - p;
    let u = e * (2.0 * std::f64::consts::PI).sqrt() * (x * x / 2.0).exp();
    x - u / (1.0 + x * u / 2.0)
}

vecmath::dispatch_wide!(max_of(v: &[f64]) -> f64 {
    // The largest value, NaNs ignored (as a fold of `f64::max` from -∞), in four lanes so that
    // it vectorises.
    let mut acc = [f64::NEG_INFINITY; 4];
    let chunks = v.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..4 {
            if c[i] > acc[i] {
                acc[i] = c[i];
            }
        }
    }
    let mut m = f64::NEG_INFINITY;
    for &x in acc.iter().chain(rest) {
        if x > m {
            m = x;
        }
    }
    m
});

/// log Σ e^v, overwriting `v`.
fn logsumexp(v: &mut [f64]) -> f64 {
    let m = max_of(v);
    if m == f64::NEG_INFINITY {
        return m;
    }
    m + vecmath::sum_exp_minus(v, m).ln()
}

vecmath::dispatch_wide!(sub_half_squares(acc: &mut [f64], x: f64, mus: &[f64], inv_sigmas: &[f64], norms: &[f64]) {
    // acc[k] -= ((x - mu_k) / sigma_k)² / 2 + norm_k: one normal kernel's log-density each.
    for (((a, &mu), &iv), &nm) in acc.iter_mut().zip(mus).zip(inv_sigmas).zip(norms) {
        let z = (x - mu) * iv;
        *a -= 0.5 * z * z + nm;
    }
});

/// One parameter's kernels in a Parzen estimator.
enum Kernels {
    /// Truncated normals over the adapted interval (bounds widened by half a step, then
    /// log-transformed if log); with `step`, the mass of each grid point's bin. `low`, `high`
    /// and `step` are in the original space.
    Numerical {
        mus: Vec<f64>,
        sigmas: Vec<f64>,
        low: f64,
        high: f64,
        step: Option<f64>,
        log: bool,
    },
    /// One probability row per kernel.
    Categorical { probs: Vec<Vec<f64>> },
}

/// A numerical distribution as Optuna's estimator sees it: original bounds, step, log.
fn numerical_space(d: &Distribution) -> (f64, f64, Option<f64>, bool) {
    match d {
        Distribution::Float {
            low,
            high,
            log,
            step,
        } => (*low, *high, *step, *log),
        Distribution::Int {
            low,
            high,
            log,
            step,
        } => (*low as f64, *high as f64, Some(*step as f64), *log),
        Distribution::Categorical { .. } => unreachable!("numerical only"),
    }
}

/// The estimator's interval: bounds widened by half a step, then log-transformed if log.
fn adapted_bounds(low: f64, high: f64, step: Option<f64>, log: bool) -> (f64, f64) {
    let st = step.unwrap_or(0.0);
    let (a, b) = (low - st / 2.0, high + st / 2.0);
    if log {
        (a.ln(), b.ln())
    } else {
        (a, b)
    }
}

fn transform(x: f64, log: bool) -> f64 {
    if log {
        x.ln()
    } else {
        x
    }
}

/// Picks index `i` with probability `p[i]` (the last on rounding shortfall).
fn pick(p: &[f64], rng: &mut Rng) -> usize {
    let mut u = rng.next_f64();
    for (i, &w) in p.iter().enumerate() {
        if u < w {
            return i;
        }
        u -= w;
    }
    p.len() - 1
}

/// A mixture over the observations of a group plus a prior kernel (the last).
struct Parzen {
    weights: Vec<f64>,
    params: Vec<(String, Kernels)>,
}

impl Parzen {
    /// With `given` weights (one per observation), the prior weighs their mean; otherwise
    /// Optuna's [`default_weights`] and `prior_weight`.
    fn new(
        cols: &[Vec<f64>],
        n: usize,
        space: &[(String, Distribution)],
        s: &TpeSampler,
        given: Option<Vec<f64>>,
    ) -> Self {
        let mut weights = match given {
            Some(mut w) if !w.is_empty() => {
                let mean = w.iter().sum::<f64>() / w.len() as f64;
                w.push(mean);
                w
            }
            _ => {
                let mut w = default_weights(n);
                w.push(s.prior_weight);
                w
            }
        };
        let total: f64 = weights.iter().sum();
        weights.iter_mut().for_each(|w| *w /= total);
        let n_kernels = n + 1;
        let params = space
            .iter()
            .zip(cols)
            .map(|((name, d), xs)| {
                let k = match d {
                    Distribution::Categorical { choices } => {
                        let c = choices.len();
                        let base = s.prior_weight / n_kernels as f64;
                        let mut probs: Vec<Vec<f64>> = xs
                            .iter()
                            .map(|&x| {
                                let mut row = vec![base; c];
                                row[x as usize] += 1.0;
                                let sum: f64 = row.iter().sum();
                                row.iter().map(|v| v / sum).collect()
                            })
                            .collect();
                        probs.push(vec![1.0 / c as f64; c]);
                        Kernels::Categorical { probs }
                    }
                    _ => {
                        // Optuna 5 uses neighbour-distance bandwidths per dimension in
                        // univariate and multivariate mode alike.
                        let (low, high, step, log) = numerical_space(d);
                        let (a, b) = adapted_bounds(low, high, step, log);
                        let mut mus: Vec<f64> = xs.iter().map(|&x| transform(x, log)).collect();
                        let mut sigmas = neighbour_sigmas(&mus, a, b);
                        let maxsigma = b - a;
                        let minsigma = if s.consider_magic_clip {
                            maxsigma
                                / (1.0 + n_kernels as f64)
                                    .powf(s.magic_clip_exponent)
                                    .min(1.0 / s.min_bandwidth_factor)
                        } else {
                            1e-12
                        };
                        sigmas
                            .iter_mut()
                            .for_each(|sg| *sg = sg.clamp(minsigma, maxsigma));
                        mus.push(0.5 * (a + b));
                        sigmas.push(maxsigma);
                        Kernels::Numerical {
                            mus,
                            sigmas,
                            low,
                            high,
                            step,
                            log,
                        }
                    }
                };
                (name.clone(), k)
            })
            .collect();
        Self { weights, params }
    }

    /// Draws `count` joint samples (one kernel for all parameters of a sample), each with one
    /// value per parameter in `params` order.
    fn sample(&self, count: usize, rng: &mut Rng) -> Vec<Vec<f64>> {
        (0..count)
            .map(|_| {
                let k = pick(&self.weights, rng);
                self.params
                    .iter()
                    .map(|(_, kern)| match kern {
                        Kernels::Categorical { probs } => pick(&probs[k], rng) as f64,
                        Kernels::Numerical {
                            mus,
                            sigmas,
                            low,
                            high,
                            step,
                            log,
                        } => {
                            let (a, b) = adapted_bounds(*low, *high, *step, *log);
                            let (mu, sg) = (mus[k], sigmas[k]);
                            let (pa, pb) = (ndtr((a - mu) / sg), ndtr((b - mu) / sg));
                            let p = pa + (pb - pa) * rng.next_f64();
                            let mut x = (mu + sg * ndtri(p)).clamp(a, b);
                            if *log {
                                x = x.exp();
                            }
                            match step {
                                Some(st) => {
                                    (low + ((x - low) / st).round() * st).clamp(*low, *high)
                                }
                                None => x.clamp(*low, *high),
                            }
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// Log-density (log-mass on grids) of the mixture at each point.
    fn log_pdf(&self, xs: &[Vec<f64>]) -> Vec<f64> {
        let log_w: Vec<f64> = self.weights.iter().map(|w| w.ln()).collect();
        let half_log_2pi = 0.5 * (2.0 * std::f64::consts::PI).ln();
        // Per numerical parameter and kernel, the constant part of its log-density: the
        // truncation mass (and, for densities, the normal's normalizer).
        let norms: Vec<Vec<f64>> = self
            .params
            .iter()
            .map(|(_, kern)| match kern {
                Kernels::Numerical {
                    mus,
                    sigmas,
                    low,
                    high,
                    step,
                    log,
                } => {
                    let (a, b) = adapted_bounds(*low, *high, *step, *log);
                    // Many bandwidths are the clip's minimum: reuse the last logarithm.
                    let (mut last_sg, mut last_ln) = (f64::NAN, f64::NAN);
                    mus.iter()
                        .zip(sigmas)
                        .map(|(&mu, &sg)| {
                            let log_z = log_diff_ndtr((a - mu) / sg, (b - mu) / sg);
                            match step {
                                Some(_) => log_z,
                                None => {
                                    if sg != last_sg {
                                        (last_sg, last_ln) = (sg, sg.ln());
                                    }
                                    log_z + half_log_2pi + last_ln
                                }
                            }
                        })
                        .collect()
                }
                Kernels::Categorical { .. } => Vec::new(),
            })
            .collect();
        let inv_sigmas: Vec<Vec<f64>> = self
            .params
            .iter()
            .map(|(_, kern)| match kern {
                Kernels::Numerical { sigmas, .. } => sigmas.iter().map(|s| 1.0 / s).collect(),
                Kernels::Categorical { .. } => Vec::new(),
            })
            .collect();
        let mut per_kernel = log_w.clone();
        xs.iter()
            .map(|x| {
                per_kernel.copy_from_slice(&log_w);
                for ((((_, kern), norm), inv), &v) in
                    self.params.iter().zip(&norms).zip(&inv_sigmas).zip(x)
                {
                    match kern {
                        Kernels::Categorical { probs } => {
                            for (k, pk) in per_kernel.iter_mut().enumerate() {
                                *pk += probs[k][v as usize].ln();
                            }
                        }
                        Kernels::Numerical {
                            mus,
                            sigmas,
                            step: Some(s),
                            log,
                            ..
                        } => {
                            let (l, r) =
                                (transform(v - s / 2.0, *log), transform(v + s / 2.0, *log));
                            for (k, pk) in per_kernel.iter_mut().enumerate() {
                                let (mu, sg) = (mus[k], sigmas[k]);
                                *pk += log_diff_ndtr((l - mu) / sg, (r - mu) / sg) - norm[k];
                            }
                        }
                        Kernels::Numerical {
                            mus,
                            step: None,
                            log,
                            ..
                        } => {
                            sub_half_squares(&mut per_kernel, transform(v, *log), mus, inv, norm);
                        }
                    }
                }
                logsumexp(&mut per_kernel)
            })
            .collect()
    }
}

/// Optuna's bandwidths: the larger distance to a neighbour (interval ends included), except
/// that the outermost observations use their inner neighbour (`consider_endpoints=False`).
fn neighbour_sigmas(mus: &[f64], low: f64, high: f64) -> Vec<f64> {
    let m = mus.len();
    if m == 0 {
        return Vec::new();
    }
    // Sorted by (value in `f64::total_cmp`'s order, index): the stable order, from an unstable
    // sort of integer pairs, much faster than one through a comparison closure.
    let mut keyed: Vec<(i64, u32)> = mus
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let b = x.to_bits() as i64;
            (b ^ (((b >> 63) as u64) >> 1) as i64, i as u32)
        })
        .collect();
    keyed.sort_unstable();
    let order: Vec<usize> = keyed.iter().map(|&(_, i)| i as usize).collect();
    let mut ext = Vec::with_capacity(m + 2);
    ext.push(low);
    ext.extend(order.iter().map(|&i| mus[i]));
    ext.push(high);
    let mut sorted: Vec<f64> = (1..=m)
        .map(|i| (ext[i] - ext[i - 1]).max(ext[i + 1] - ext[i]))
        .collect();
    if ext.len() >= 4 {
        sorted[0] = ext[2] - ext[1];
        sorted[m - 1] = ext[m] - ext[m - 1];
    }
    let mut out = vec![0.0; m];
    for (rank, &i) in order.iter().enumerate() {
        out[i] = sorted[rank];
    }
    out
}

/// One side of the split: its trials, in trial-number order, and their values, one column
/// per parameter of the space.
struct Group<'a> {
    trials: Vec<&'a FrozenTrial>,
    cols: Vec<Vec<f64>>,
}

impl<'a> Group<'a> {
    /// Keeps the trials that have every parameter of `space`, with the same distribution.
    fn of(candidates: Vec<&'a FrozenTrial>, space: &[(String, Distribution)]) -> Self {
        let sorted = space.windows(2).all(|w| w[0].0 < w[1].0);
        let mut cols = vec![Vec::with_capacity(candidates.len()); space.len()];
        let mut row = Vec::with_capacity(space.len());
        let trials = candidates
            .into_iter()
            .filter(|t| {
                let ok = if sorted {
                    values_sorted(t, space, &mut row)
                } else {
                    values_lookup(t, space, &mut row)
                };
                if ok {
                    cols.iter_mut().zip(&row).for_each(|(c, &v)| c.push(v));
                }
                ok
            })
            .collect();
        Self { trials, cols }
    }
}

/// `t`'s values of the parameters of `space`, into `row`, if it has them all with the same
/// distributions; one merged walk, as `space` and `t`'s maps are both sorted by name.
fn values_sorted(t: &FrozenTrial, space: &[(String, Distribution)], row: &mut Vec<f64>) -> bool {
    row.clear();
    let (mut dists, mut params) = (t.distributions.iter(), t.params.iter());
    // The next entry named `name`, skipping smaller names; `None` if there is none.
    fn next_named<'m, V>(
        it: &mut std::collections::btree_map::Iter<'m, String, V>,
        name: &str,
    ) -> Option<&'m V> {
        for (k, v) in it {
            match k.as_str().cmp(name) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Equal => return Some(v),
                std::cmp::Ordering::Greater => return None,
            }
        }
        None
    }
    for (name, d) in space {
        match (next_named(&mut dists, name), next_named(&mut params, name)) {
            (Some(td), Some(&v)) if td == d => row.push(v),
            _ => return false,
        }
    }
    true
}

/// As [`values_sorted`], for a space in any order.
fn values_lookup(t: &FrozenTrial, space: &[(String, Distribution)], row: &mut Vec<f64>) -> bool {
    row.clear();
    for (name, d) in space {
        match (t.distributions.get(name), t.params.get(name)) {
            (Some(td), Some(&v)) if td == d => row.push(v),
            _ => return false,
        }
    }
    true
}

/// The "EI" weights of the good group: each trial's improvement on the best loss of the
/// other group (at least 1e-12). `None`, for Optuna's weights instead, when a good trial has
/// no value (pruned) or no other trial has one.
fn ei_weights(
    below: &[&FrozenTrial],
    above: &[&FrozenTrial],
    direction: Direction,
) -> Option<Vec<f64>> {
    let threshold = above
        .iter()
        .filter(|t| t.state == TrialState::Complete)
        .filter_map(|t| t.value)
        .map(|v| direction.loss(v))
        .fold(f64::INFINITY, f64::min);
    if !threshold.is_finite() {
        return None;
    }
    below
        .iter()
        .map(|t| match (t.state, t.value) {
            (TrialState::Complete, Some(v)) => Some((threshold - direction.loss(v)).max(1e-12)),
            _ => None,
        })
        .collect()
}

impl TpeSampler {
    /// Splits the trials into the good ("below") and the other ("above") groups, each in
    /// trial-number order, keeping those that have every parameter of `space` (sorted by
    /// name). Returns the number of finished (complete or pruned) trials too.
    fn split<'a>(
        &self,
        history: &'a [FrozenTrial],
        direction: Direction,
        space: &[(String, Distribution)],
    ) -> (Group<'a>, Group<'a>, usize) {
        let loss = |t: &FrozenTrial| direction.loss(t.value.unwrap());
        let mut complete: Vec<&FrozenTrial> = history
            .iter()
            .filter(|t| t.state == TrialState::Complete && t.value.is_some())
            .collect();
        let mut pruned: Vec<&FrozenTrial> = history
            .iter()
            .filter(|t| t.state == TrialState::Pruned)
            .collect();
        let n_finished = complete.len() + pruned.len();
        let n_below = n_good(self.gamma, n_finished).min(n_finished);
        // The good group is the first n_below of the ranking: complete trials by loss (ties by
        // number), then pruned ones. Only its members are needed, so select, don't sort.
        let mut below: Vec<&FrozenTrial> = if n_below <= complete.len() {
            if n_below > 0 && n_below < complete.len() {
                complete.select_nth_unstable_by(n_below - 1, |a, b| {
                    loss(a).total_cmp(&loss(b)).then(a.number.cmp(&b.number))
                });
            }
            complete.truncate(n_below);
            complete
        } else {
            // Pruned trials rank after complete ones: further along first, then by value there.
            let score = |t: &FrozenTrial| match t.last_intermediate() {
                Some((s, v)) if v.is_nan() => (-(s as i64), f64::INFINITY),
                Some((s, v)) => (-(s as i64), direction.loss(v)),
                None => (1, 0.0),
            };
            pruned.sort_by(|a, b| {
                let (sa, sb) = (score(a), score(b));
                sa.0.cmp(&sb.0)
                    .then(sa.1.total_cmp(&sb.1))
                    .then(a.number.cmp(&b.number))
            });
            let extra = n_below - complete.len();
            complete.extend_from_slice(&pruned[..extra]);
            complete
        };
        below.sort_unstable_by_key(|t| t.number);
        let in_below =
            |t: &FrozenTrial| below.binary_search_by_key(&t.number, |b| b.number).is_ok();
        // Everything else finished is above; with the constant liar, so are other workers'
        // running trials (as the worst results), so that workers spread out.
        let mut above: Vec<&FrozenTrial> = history
            .iter()
            .filter(|t| match t.state {
                TrialState::Complete => t.value.is_some(),
                TrialState::Pruned => true,
                TrialState::Running => self.constant_liar && !t.params.is_empty(),
                TrialState::Failed => false,
            })
            .filter(|t| !in_below(t))
            .collect();
        if !above.is_sorted_by_key(|t| t.number) {
            above.sort_unstable_by_key(|t| t.number);
        }
        (Group::of(below, space), Group::of(above, space), n_finished)
    }

    fn sample_space(
        &self,
        history: &[FrozenTrial],
        direction: Direction,
        space: &[(String, Distribution)],
        rng: &mut Rng,
    ) -> Option<BTreeMap<String, f64>> {
        let (below, above, n_finished) = self.split(history, direction, space);
        if n_finished < self.n_startup_trials {
            return None;
        }
        let ei = if self.ei_weights {
            ei_weights(&below.trials, &above.trials, direction)
        } else {
            None
        };
        let l = Parzen::new(&below.cols, below.trials.len(), space, self, ei);
        let g = Parzen::new(&above.cols, above.trials.len(), space, self, None);
        let candidates = l.sample(self.n_ei_candidates, rng);
        let (ll, lg) = (l.log_pdf(&candidates), g.log_pdf(&candidates));
        // The first maximum of log l(x) - log g(x).
        let mut best = 0;
        for i in 1..candidates.len() {
            if ll[i] - lg[i] > ll[best] - lg[best] {
                best = i;
            }
        }
        Some(
            space
                .iter()
                .zip(&candidates[best])
                .map(|((name, _), &v)| (name.clone(), v))
                .collect(),
        )
    }
}

impl Sampler for TpeSampler {
    fn sample_relative(
        &mut self,
        history: &[FrozenTrial],
        direction: Direction,
        space: &BTreeMap<String, Distribution>,
        rng: &mut Rng,
    ) -> BTreeMap<String, f64> {
        if !self.multivariate {
            return BTreeMap::new();
        }
        let space: Vec<(String, Distribution)> =
            space.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        self.sample_space(history, direction, &space, rng)
            .unwrap_or_default()
    }

    fn sample_independent(
        &mut self,
        history: &[FrozenTrial],
        direction: Direction,
        name: &str,
        dist: &Distribution,
        rng: &mut Rng,
    ) -> f64 {
        let space = [(name.to_string(), dist.clone())];
        match self.sample_space(history, direction, &space, rng) {
            Some(p) => p[name],
            None => sample_uniform(dist, rng),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gamma_and_weights_match_optuna() {
        // Optuna's default_gamma.
        assert_eq!(n_good(0.1, 1), 1);
        assert_eq!(n_good(0.1, 10), 1);
        assert_eq!(n_good(0.1, 11), 2);
        assert_eq!(n_good(0.1, 1000), 25);
        // wick's default.
        assert_eq!(n_good(0.2, 10), 2);
        assert_eq!(n_good(0.2, 51), 11);
        assert_eq!(n_good(0.2, 200), 25);
        assert_eq!(default_weights(3), [1.0, 1.0, 1.0]);
        let w = default_weights(30);
        assert_eq!(w.len(), 30);
        assert!((w[0] - 1.0 / 30.0).abs() < 1e-12);
        assert!((w[4] - 1.0).abs() < 1e-12);
        assert!(w[1] > w[0] && w[2] > w[1]);
    }

    fn trial(number: usize, state: TrialState, value: Option<f64>) -> FrozenTrial {
        FrozenTrial {
            number,
            state,
            value,
            params: BTreeMap::new(),
            distributions: BTreeMap::new(),
            intermediate: BTreeMap::new(),
            rungs: BTreeMap::new(),
            duration_s: 0.0,
            note: None,
        }
    }

    #[test]
    fn ei_weights_are_improvements_on_the_rest() {
        use TrialState::*;
        let below = [trial(0, Complete, Some(1.0)), trial(1, Complete, Some(2.5))];
        let above = [
            trial(2, Complete, Some(3.0)),
            trial(3, Complete, Some(4.0)),
            trial(4, Running, None),
        ];
        let (b, a): (Vec<_>, Vec<_>) = (below.iter().collect(), above.iter().collect());
        assert_eq!(
            ei_weights(&b, &a, Direction::Minimize),
            Some(vec![2.0, 0.5])
        );
        // Maximizing, the best of the rest is 4: the good trials improve on it by nothing.
        assert_eq!(
            ei_weights(&b, &a, Direction::Maximize),
            Some(vec![1e-12, 1e-12])
        );
        // A pruned good trial, or no finished other trial: Optuna's weights.
        let pruned = [trial(0, Pruned, None)];
        let p: Vec<_> = pruned.iter().collect();
        assert_eq!(ei_weights(&p, &a, Direction::Minimize), None);
        assert_eq!(ei_weights(&b, &a[2..], Direction::Minimize), None);
        // The prior weighs the mean of the given weights.
        let s = TpeSampler::new();
        let space = [(
            "x".to_string(),
            Distribution::Float {
                low: 0.0,
                high: 1.0,
                log: false,
                step: None,
            },
        )];
        let pz = Parzen::new(&[vec![0.2, 0.4]], 2, &space, &s, Some(vec![3.0, 1.0]));
        assert_eq!(pz.weights, [0.5, 1.0 / 6.0, 2.0 / 6.0]);
    }

    #[test]
    fn magic_clip_default_is_optunas() {
        // Optuna: the smallest bandwidth is range / min(100, 1 + kernels).
        let s = TpeSampler::optuna();
        let space = [(
            "x".to_string(),
            Distribution::Float {
                low: 0.0,
                high: 10.0,
                log: false,
                step: None,
            },
        )];
        for n in [1usize, 5, 98, 99, 150] {
            // Identical observations: every neighbour distance but the ends' is 0, so clipped.
            let pz = Parzen::new(&[vec![5.0; n]], n, &space, &s, None);
            let Kernels::Numerical { sigmas, .. } = &pz.params[0].1 else {
                unreachable!()
            };
            let want = 10.0 / (100f64).min(1.0 + (n + 1) as f64);
            if n > 2 {
                assert_eq!(sigmas[1], want, "{n}");
            }
        }
    }

    #[test]
    fn values_need_every_parameter_with_its_distribution() {
        let f = |low: f64| Distribution::Float {
            low,
            high: 1.0,
            log: false,
            step: None,
        };
        let mut t = trial(0, TrialState::Complete, Some(1.0));
        for (name, v) in [("a", 0.1), ("b", 0.2), ("c", 0.3)] {
            t.params.insert(name.into(), v);
            t.distributions.insert(name.into(), f(0.0));
        }
        let space = |names: &[&str], low: f64| -> Vec<(String, Distribution)> {
            names.iter().map(|n| (n.to_string(), f(low))).collect()
        };
        let mut row = Vec::new();
        for (names, low, want) in [
            (&["a", "c"][..], 0.0, Some(vec![0.1, 0.3])),
            (&["b"][..], 0.0, Some(vec![0.2])),
            (&["a", "b", "c"][..], 0.0, Some(vec![0.1, 0.2, 0.3])),
            (&["a", "bb"][..], 0.0, None),
            (&["0", "a"][..], 0.0, None),
            (&["c", "d"][..], 0.0, None),
            (&["a"][..], 0.5, None),
        ] {
            let sp = space(names, low);
            let got = values_sorted(&t, &sp, &mut row).then(|| row.clone());
            assert_eq!(got, want, "{names:?}");
            let got = values_lookup(&t, &sp, &mut row).then(|| row.clone());
            assert_eq!(got, want, "{names:?}");
        }
        // A space out of name order goes through lookups, in the space's order.
        let g = Group::of(vec![&t], &space(&["c", "a"], 0.0));
        assert_eq!(g.cols, [vec![0.3], vec![0.1]]);
    }

    #[test]
    fn max_of_ignores_nans_as_f64_max_does() {
        for n in 0..13 {
            let mut v: Vec<f64> = (0..n).map(|i| ((i * 7919) % 13) as f64 - 6.0).collect();
            if n > 2 {
                v[1] = f64::NAN;
            }
            let want = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            assert_eq!(max_of(&v), want, "{v:?}");
        }
        assert_eq!(max_of(&[f64::NAN; 5]), f64::NEG_INFINITY);
    }

    #[test]
    fn normal_helpers_are_accurate() {
        for &p in &[1e-10, 0.001, 0.1, 0.5, 0.9, 0.999] {
            assert!((ndtr(ndtri(p)) - p).abs() < 1e-9 * p.max(1e-3), "{p}");
        }
        assert!((log_diff_ndtr(-1.0, 1.0) - 0.682_689_492_137_086f64.ln()).abs() < 1e-9);
        assert!(log_diff_ndtr(8.0, 9.0).is_finite());
    }

    #[test]
    fn bandwidths_follow_neighbours() {
        // Observations 0.2, 0.5, 0.9 on [0, 1]: the outer ones use their inner neighbour.
        let s = neighbour_sigmas(&[0.5, 0.2, 0.9], 0.0, 1.0);
        assert!((s[1] - 0.3).abs() < 1e-12);
        assert!((s[0] - 0.4).abs() < 1e-12);
        assert!((s[2] - 0.4).abs() < 1e-12);
        // One observation: the larger distance to an end.
        assert!((neighbour_sigmas(&[0.2], 0.0, 1.0)[0] - 0.8).abs() < 1e-12);
    }
}
