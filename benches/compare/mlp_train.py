#!/usr/bin/env python3
"""PyTorch reference for wick's MLP training benchmark (CPU).

What it measures
----------------
Training throughput (training samples per second) of a small MLP on the
scikit-learn digits table, data/sklearn/digits.csv (1797 rows, 64 pixel
features 0..16, target digit 0..9):

* model: Linear(64, 256) -> ReLU -> Linear(256, 256) -> ReLU -> Linear(256, 10),
  float32, PyTorch's default initialisation (seeded with --seed);
* loss: cross-entropy (mean over the batch);
* optimiser: AdamW(lr=1e-3, weight_decay=0.01), other settings PyTorch's
  defaults (betas=(0.9, 0.999), eps=1e-8);
* data: rows permuted with numpy.random.default_rng(42).permutation; the
  first floor(0.8 * 1797) = 1437 rows are the training split, the remaining
  360 the test split. Features are standardised with the training split's
  per-column mean and population standard deviation (ddof=0, computed in
  float64), the standard deviation clamped to >= 1e-6;
* batches of 64, the training split reshuffled every epoch, the last partial
  batch kept (drop_last=False: 22 full batches + one of 29 per epoch).

Two warm-up epochs run first. Then the timed region -- --epochs epochs of
training only (shuffle, batch gather, forward, loss, backward, optimiser
step; no evaluation) timed with time.perf_counter -- is run --repeat times in
a row on the same model, and the median and the maximum samples/s over the
repeats are reported (samples/s = epochs * 1437 / seconds). After the last
repeat the test accuracy of the trained model is computed (outside timing).

torch.set_num_threads(--threads) sets the intra-op thread count.

How to run
----------
From the repository root, with a Python env with torch and numpy
(see benches/compare/requirements.txt):

    python benches/compare/mlp_train.py --threads 2
    python benches/compare/mlp_train.py --threads 1 --json

--json prints a single JSON object instead of the human-readable line:
{"framework": "pytorch", "torch_version": ..., "threads": N, "batch": 64,
 "samples_per_s": <median>, "test_accuracy": ..., ...} (plus the extra keys
samples_per_s_max, samples_per_s_all, epochs, repeat, warmup_epochs,
train_samples, test_samples, seed).
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_DATA = os.path.join(REPO_ROOT, "data", "sklearn", "digits.csv")

BATCH = 64
WARMUP_EPOCHS = 2
SPLIT_SEED = 42
TRAIN_FRACTION = 0.8
STD_MIN = 1e-6


def load_digits_csv(path):
    with open(path, "r", encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split(",")
    if header[-1] != "target":
        raise ValueError("%s: last column must be 'target', got %r" % (path, header[-1]))
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    x = table[:, :-1]
    y = table[:, -1].astype(np.int64)
    return x, y


def split_and_standardize(x, y):
    n = x.shape[0]
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_train = int(n * TRAIN_FRACTION)
    tr, te = perm[:n_train], perm[n_train:]
    x_tr, x_te = x[tr], x[te]
    mean = x_tr.mean(axis=0)
    std = np.maximum(x_tr.std(axis=0), STD_MIN)  # population std (ddof=0)
    x_tr = ((x_tr - mean) / std).astype(np.float32)
    x_te = ((x_te - mean) / std).astype(np.float32)
    return x_tr, y[tr], x_te, y[te]


def make_model(n_in, n_classes):
    return nn.Sequential(
        nn.Linear(n_in, 256),
        nn.ReLU(),
        nn.Linear(256, 256),
        nn.ReLU(),
        nn.Linear(256, n_classes),
    )


def train_epoch(model, opt, loss_fn, x, y, gen):
    n = x.shape[0]
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, BATCH):  # drop_last=False
        idx = order[start:start + BATCH]
        xb = x.index_select(0, idx)
        yb = y.index_select(0, idx)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
    return loss.item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--epochs", type=int, default=30, help="epochs per timed repeat (default 30)")
    ap.add_argument("--repeat", type=int, default=3, help="timed repeats (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="torch seed for init and shuffling (default 0)")
    ap.add_argument("--data", default=DEFAULT_DATA, help="path to digits.csv")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.epochs < 1 or args.repeat < 1:
        ap.error("--threads, --epochs and --repeat must be >= 1")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    x, y = load_digits_csv(args.data)
    x_tr, y_tr, x_te, y_te = split_and_standardize(x, y)
    x_tr, y_tr = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    x_te, y_te = torch.from_numpy(x_te), torch.from_numpy(y_te)
    n_classes = int(max(y_tr.max().item(), y_te.max().item())) + 1

    model = make_model(x_tr.shape[1], n_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    for _ in range(WARMUP_EPOCHS):
        train_epoch(model, opt, loss_fn, x_tr, y_tr, gen)

    n_train = x_tr.shape[0]
    rates = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        for _ in range(args.epochs):
            last_loss = train_epoch(model, opt, loss_fn, x_tr, y_tr, gen)
        dt = time.perf_counter() - t0
        rates.append(args.epochs * n_train / dt)

    model.eval()
    with torch.inference_mode():
        pred = model(x_te).argmax(dim=1)
        acc = (pred == y_te).double().mean().item()

    median, best = statistics.median(rates), max(rates)
    if args.json:
        print(json.dumps({
            "framework": "pytorch",
            "torch_version": torch.__version__,
            "threads": args.threads,
            "batch": BATCH,
            "samples_per_s": median,
            "test_accuracy": acc,
            "samples_per_s_max": best,
            "samples_per_s_all": rates,
            "epochs": args.epochs,
            "repeat": args.repeat,
            "warmup_epochs": WARMUP_EPOCHS,
            "train_samples": int(n_train),
            "test_samples": int(x_te.shape[0]),
            "seed": args.seed,
        }))
    else:
        print("pytorch %s mlp 64-256-256-10 digits: threads=%d batch=%d epochs=%dx%d "
              "samples/s median=%.0f max=%.0f  final_train_batch_loss=%.4f  test_acc=%.4f (%d/%d)"
              % (torch.__version__, args.threads, BATCH, args.repeat, args.epochs,
                 median, best, last_loss, acc, int(round(acc * x_te.shape[0])), x_te.shape[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
