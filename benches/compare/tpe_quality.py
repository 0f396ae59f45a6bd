#!/usr/bin/env python3
"""wick's TPE against Optuna's TPESampler (default settings), in one run.

1. Quality: Branin (2-D, min 0.397887) and Hartmann6 (6-D, min -3.32237), 100 trials x 20
   seeds each (--seeds, --first-seed); the median over seeds of the best value after 25, 50 and
   100 trials, a bootstrap 95% interval of the difference of the medians, and the Mann-Whitney
   test of the two samples of best values (with scipy). wick runs with its defaults
   (`TpeSampler::new()`: a good group of 20% of the trials weighted by improvement, 64
   candidates) and, for reference,
   with Optuna's (`TpeSampler::optuna()`: 10%, 24 candidates).
2. Overhead: a study of N trials (N = 100, 500, 1000) of a trivial objective x^2 + y^2; the
   mean time per trial (ask, two suggest_float, tell) over the last 50 trials, i.e. the
   sampler's cost at that study size; the median of --repeats (3) interleaved measurements of
   each.

wick runs through its library API (`cargo run --release --example tpe_bench`). Run from the
repository root with a Python that has optuna (benches/compare/requirements.txt):

    python benches/compare/tpe_quality.py [--json] [--seeds N] [--first-seed S]
    python benches/compare/tpe_quality.py --overhead-rounds 5
"""
import argparse
import json
import math
import subprocess
import time

import numpy as np
import optuna

try:  # for the Mann-Whitney test; the medians and bootstrap intervals need only numpy
    from scipy import stats
except ImportError:
    stats = None

optuna.logging.set_verbosity(optuna.logging.WARNING)

A = np.array([[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]])
P = np.array([[0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886], [0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991],
              [0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650], [0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381]])
ALPHA = np.array([1.0, 1.2, 3.0, 3.2])


def branin(x):
    x1, x2 = x
    b, c, t = 5.1 / (4 * math.pi ** 2), 5 / math.pi, 1 / (8 * math.pi)
    return (x2 - b * x1 ** 2 + c * x1 - 6) ** 2 + 10 * (1 - t) * math.cos(x1) + 10


def hartmann6(x):
    x = np.asarray(x)
    return float(-np.sum(ALPHA * np.exp(-np.sum(A * (x - P) ** 2, axis=1))))


PROBLEMS = {"branin": (branin, [(-5, 10), (0, 15)]), "hartmann6": (hartmann6, [(0, 1)] * 6)}


def optuna_curve(f, bounds, seed, n=100):
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(lambda t: f([t.suggest_float(f"x{i}", lo, hi) for i, (lo, hi) in enumerate(bounds)]), n_trials=n)
    return np.minimum.accumulate([t.value for t in study.trials])


def optuna_overhead(n):
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        trial = study.ask()
        x = trial.suggest_float("x", -10, 10)
        y = trial.suggest_float("y", -10, 10)
        study.tell(trial, x * x + y * y)
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.mean(times[-50:]))


def wick(*args):
    out = subprocess.run(["cargo", "run", "--release", "--quiet", "--example", "tpe_bench", "--", *args],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--seeds", type=int, default=20, help="studies per sampler and problem")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3,
                    help="overhead: interleaved measurements per study size and framework (medians reported)")
    ap.add_argument("--overhead-rounds", type=int, default=0,
                    help="only the overhead at 1000 trials: this many interleaved rounds of Optuna, "
                         "wick and wick with Optuna's defaults, and their medians")
    args = ap.parse_args()
    if args.overhead_rounds:
        rows = []
        for r in range(args.overhead_rounds):
            o = optuna_overhead(1000)
            w = wick("overhead", "1000")["ms_per_trial_last50"]
            wo = wick("overhead", "1000", "optuna")["ms_per_trial_last50"]
            rows.append((o, w, wo))
            print(f"round {r + 1}: optuna {o:.3f} ms, wick {w:.3f} ms ({o / w:.1f}x), "
                  f"wick with Optuna's defaults {wo:.3f} ms ({o / wo:.1f}x)", flush=True)
        m = np.median(np.array(rows), axis=0)
        print(f"median: optuna {m[0]:.3f} ms, wick {m[1]:.3f} ms ({m[0] / m[1]:.1f}x), "
              f"wick with Optuna's defaults {m[2]:.3f} ms ({m[0] / m[2]:.1f}x)")
        return
    res = {"optuna_version": optuna.__version__, "seeds": [args.first_seed, args.first_seed + args.seeds],
           "quality": {}, "overhead_ms_per_trial": {}}
    w = wick("quality", str(args.seeds), str(args.first_seed))
    w_opt = wick("quality", str(args.seeds), str(args.first_seed), "optuna")
    rng = np.random.default_rng(0)
    for name, (f, bounds) in PROBLEMS.items():
        curves = np.array([optuna_curve(f, bounds, s) for s in range(args.first_seed, args.first_seed + args.seeds)])
        q = {"optuna": {}, "wick": {}, "wick_optuna_defaults": {}, "diff_ci95": {}, "mann_whitney_p": {}}
        for k in (25, 50, 100):
            o, wk = curves[:, k - 1], np.array(w[name]["per_seed"][str(k)])
            q["optuna"][str(k)] = float(np.median(o))
            q["wick"][str(k)] = float(np.median(wk))
            q["wick_optuna_defaults"][str(k)] = float(np.median(w_opt[name]["per_seed"][str(k)]))
            # Bootstrap of the difference of medians (wick - Optuna; negative = wick better).
            d = [np.median(rng.choice(wk, len(wk))) - np.median(rng.choice(o, len(o))) for _ in range(2000)]
            q["diff_ci95"][str(k)] = [float(np.quantile(d, 0.025)), float(np.quantile(d, 0.975))]
            q["mann_whitney_p"][str(k)] = float(stats.mannwhitneyu(wk, o).pvalue) if stats else None
            q.setdefault("per_seed", {})[str(k)] = {"optuna": o.tolist(), "wick": wk.tolist()}
        res["quality"][name] = q
    for n in (100, 500, 1000):
        # Interleaved repeats, medians reported: one measurement each is at the mercy of a
        # noisy machine (on a shared VM, either side alone has varied by 40% from run to run).
        o_all, w_all = [], []
        for _ in range(args.repeats):
            o_all.append(optuna_overhead(n))
            w_all.append(wick("overhead", str(n))["ms_per_trial_last50"])
        res["overhead_ms_per_trial"][str(n)] = {"optuna": float(np.median(o_all)), "wick": float(np.median(w_all)),
                                                "optuna_all": o_all, "wick_all": w_all}
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(f"optuna {optuna.__version__}, TPESampler defaults; wick TpeSampler::new() (and ::optuna()); "
          f"seeds {args.first_seed}..{args.first_seed + args.seeds - 1}; median best values")
    print(f"{'problem':<10} {'trials':>6} {'optuna':>10} {'wick':>10} {'wick, optuna defaults':>22}"
          f" {'wick - optuna, 95% CI':>24} {'Mann-Whitney p':>15}")
    for name, q in res["quality"].items():
        for k in ("25", "50", "100"):
            lo, hi = q["diff_ci95"][k]
            p = q["mann_whitney_p"][k]
            print(f"{name:<10} {k:>6} {q['optuna'][k]:>10.5f} {q['wick'][k]:>10.5f} {q['wick_optuna_defaults'][k]:>22.5f}"
                  f" {f'[{lo:+.3f}, {hi:+.3f}]':>24} {p if p is None else f'{p:.3f}':>15}")
    if args.seeds > 20:
        # The goal cells (50 and 100 trials) on each block of 20 seeds, as the protocol
        # would see them.
        print("blocks of 20 seeds, median best (optuna / wick); X where wick is worse")
        for b in range(0, args.seeds - 19, 20):
            cells = []
            for name, q in res["quality"].items():
                for k in ("50", "100"):
                    o = np.median(q["per_seed"][k]["optuna"][b:b + 20])
                    wk = np.median(q["per_seed"][k]["wick"][b:b + 20])
                    cells.append(f"{name[:3]}@{k} {o:.4f}/{wk:.4f}{' X' if wk > o else ''}")
            first = args.first_seed + b
            print(f"  seeds {first}-{first + 19}: " + "; ".join(cells))
    print(f"overhead: median of {args.repeats} interleaved measurements (range in brackets)")
    print(f"{'study size':>10} {'optuna ms/trial':>24} {'wick ms/trial':>22} {'ratio':>7}")
    for n, o in res["overhead_ms_per_trial"].items():
        orng = f"[{min(o['optuna_all']):.2f}-{max(o['optuna_all']):.2f}]"
        wrng = f"[{min(o['wick_all']):.3f}-{max(o['wick_all']):.3f}]"
        print(f"{n:>10} {o['optuna']:>9.3f} {orng:>14} {o['wick']:>8.3f} {wrng:>13} {o['optuna'] / o['wick']:>6.1f}x")


if __name__ == "__main__":
    main()
