#!/usr/bin/env python3
"""Does wick's TPE propose what Optuna's TPESampler proposes, given the same history?

Whole-study comparisons (tpe_quality.py) mix the sampler with the luck of each study's random
stream: two exact copies of one algorithm differ there by chance. This script removes that
luck. It records one history per case (an Optuna TPE study of Branin or Hartmann6, n trials),
then asks both samplers, with default settings, for the next point after exactly that history,
under 1,000 sampler seeds each. If the algorithms are the same, the two sets of 1,000 proposals
are samples of one distribution. It reports, per case:

- the two-sample Kolmogorov-Smirnov test per coordinate (p-value; small means "different");
- the objective at the proposals: mean, median, and the Mann-Whitney U test p-value.

Run from the repository root with a Python that has optuna and scipy:

    python benches/compare/tpe_same_history.py [--seeds 1000] [--json]
"""
import argparse
import json
import subprocess

import numpy as np
import optuna
from optuna.distributions import FloatDistribution
from scipy import stats

from tpe_quality import PROBLEMS

optuna.logging.set_verbosity(optuna.logging.WARNING)

CASES = [("branin", 12), ("branin", 20), ("branin", 30), ("branin", 50), ("hartmann6", 15), ("hartmann6", 30), ("hartmann6", 60)]


def history(name, n, seed=12345):
    f, bounds = PROBLEMS[name]
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(lambda t: f([t.suggest_float(f"x{i}", lo, hi) for i, (lo, hi) in enumerate(bounds)]), n_trials=n)
    xs = [[t.params[f"x{i}"] for i in range(len(bounds))] for t in study.trials]
    return bounds, xs, [t.value for t in study.trials]


def optuna_proposals(bounds, xs, values, seeds):
    dists = {f"x{i}": FloatDistribution(lo, hi) for i, (lo, hi) in enumerate(bounds)}
    frozen = [
        optuna.trial.create_trial(params={f"x{i}": v for i, v in enumerate(x)}, distributions=dists, value=y)
        for x, y in zip(xs, values)
    ]
    out = []
    for s in range(seeds):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=s))
        study.add_trials(frozen)
        trial = study.ask()
        out.append([trial.suggest_float(f"x{i}", lo, hi) for i, (lo, hi) in enumerate(bounds)])
    return np.array(out)


def wick_proposals(bounds, xs, values, seeds):
    payload = json.dumps({"bounds": bounds, "x": xs, "values": values})
    out = subprocess.run(
        ["cargo", "run", "--release", "--quiet", "--example", "tpe_bench", "--", "proposals", str(seeds)],
        input=payload, capture_output=True, text=True, check=True,
    ).stdout
    return np.array(json.loads(out)["proposals"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=1000)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    rows = []
    for name, n in CASES:
        f, _ = PROBLEMS[name]
        bounds, xs, values = history(name, n)
        po = optuna_proposals(bounds, xs, values, a.seeds)
        pw = wick_proposals(bounds, xs, values, a.seeds)
        fo = np.array([f(x) for x in po])
        fw = np.array([f(x) for x in pw])
        ks = [float(stats.ks_2samp(po[:, i], pw[:, i]).pvalue) for i in range(po.shape[1])]
        mw = float(stats.mannwhitneyu(fo, fw).pvalue)
        rows.append({
            "case": f"{name} after {n}", "best_so_far": min(values),
            "optuna_mean": float(fo.mean()), "wick_mean": float(fw.mean()),
            "optuna_median": float(np.median(fo)), "wick_median": float(np.median(fw)),
            "mann_whitney_p": mw, "ks_p_min": min(ks), "ks_p": ks,
        })
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"{a.seeds} proposals per sampler after one fixed history per case (objective at the proposals)")
    print(f"{'case':<18} {'best so far':>11} {'Optuna mean':>12} {'wick mean':>10} {'Optuna med':>11} {'wick med':>9} {'MW p':>6} {'min KS p':>9}")
    for r in rows:
        print(f"{r['case']:<18} {r['best_so_far']:11.4f} {r['optuna_mean']:12.4f} {r['wick_mean']:10.4f} "
              f"{r['optuna_median']:11.4f} {r['wick_median']:9.4f} {r['mann_whitney_p']:6.3f} {r['ks_p_min']:9.3f}")


if __name__ == "__main__":
    main()
