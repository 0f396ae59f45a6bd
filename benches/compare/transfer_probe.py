#!/usr/bin/env python3
"""Linear probes of a wick ResNet backbone on MNIST, against a random backbone (docs/RESULTS.md).

The transfer test trains one head recipe (AdamW, raw features) on both backbones; a random
backbone's features are large and badly scaled, so its test accuracy swings between epochs.
This script asks how far apart the two backbones' *features* are once the head is trained well:
it rebuilds the network in PyTorch with torchvision's module names, loads the wick checkpoint,
computes the pooled features of `stages` stages on data/mnist/train_100.csv (1,000 digits) and
data/mnist/test.csv (4,000), and fits on each stage

  - the transfer config's head: AdamW lr 1e-2, weight decay 1e-4, 60 epochs of batch 50, on raw
    features and on standardized ones (final and best epoch's test accuracy);
  - logistic regression on standardized features for C in {0.01, 0.1, 1, 10} (scikit-learn).

The random arm is a torchvision-initialised network of the same width (PyTorch's generator, so
not wick's exact random weights). Needs torch, safetensors, scikit-learn and numpy.

  python benches/compare/transfer_probe.py --backbone RUN_DIR [--width 16] [--stages 3]
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from resnet_step import BasicBlock  # noqa: E402 (torchvision's block and names)


class Backbone(nn.Module):
    """ResNet-18 of `width` channels in stage 1, 1-channel stem, the first `stages` stages."""

    def __init__(self, width, stages):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.stages, cin = stages, width
        for s in range(stages):
            c = width << s
            setattr(self, f"layer{s + 1}", nn.Sequential(BasicBlock(cin, c, 1 if s == 0 else 2), BasicBlock(c, c, 1)))
            cin = c
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        out = []
        for s in range(self.stages):
            x = getattr(self, f"layer{s + 1}")(x)
            out.append(x.mean((2, 3)))
        return out


def load_csv(path):
    a = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float32)
    return torch.tensor(a[:, :784]).reshape(-1, 1, 28, 28), torch.tensor(a[:, 784]).long()


@torch.no_grad()
def features(net, x):
    net.eval()
    parts = [net(x[i : i + 500]) for i in range(0, len(x), 500)]
    return [torch.cat(f) for f in zip(*parts)]


def adamw_head(ftr, ytr, fte, yte, standardize):
    if standardize:
        mu, sd = ftr.mean(0), ftr.std(0) + 1e-6
        ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    head = nn.Linear(ftr.shape[1], 10)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    acc = []
    for _ in range(60):
        perm = torch.randperm(len(ftr), generator=g)
        for i in range(0, len(perm), 50):
            b = perm[i : i + 50]
            opt.zero_grad()
            F.cross_entropy(head(ftr[b]), ytr[b]).backward()
            opt.step()
        with torch.no_grad():
            acc.append((head(fte).argmax(1) == yte).float().mean().item())
    return acc[-1], max(acc)


def logreg(ftr, ytr, fte, yte):
    s = StandardScaler().fit(ftr.numpy())
    a, b = s.transform(ftr.numpy()), s.transform(fte.numpy())
    out = {}
    for c in (0.01, 0.1, 1.0, 10.0):
        m = LogisticRegression(C=c, max_iter=3000).fit(a, ytr.numpy())
        out[c] = m.score(b, yte.numpy())
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", required=True, help="a wick run directory or a .safetensors file")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--data", default="data/mnist")
    args = p.parse_args()
    torch.set_num_threads(2)
    path = args.backbone
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoints", "best", "model.safetensors")
    xtr, ytr = load_csv(os.path.join(args.data, "train_100.csv"))
    xte, yte = load_csv(os.path.join(args.data, "test.csv"))
    for arm in ("pretrained", "random"):
        torch.manual_seed(1)
        net = Backbone(args.width, args.stages)
        if arm == "pretrained":
            weights = load_file(path)
            missing = net.load_state_dict(weights, strict=False).missing_keys
            if missing:
                raise SystemExit(f"{path}: missing {missing[:5]} (check --width and --stages)")
        ftr, fte = features(net, xtr), features(net, xte)
        for s in range(args.stages):
            raw = adamw_head(ftr[s], ytr, fte[s], yte, False)
            std = adamw_head(ftr[s], ytr, fte[s], yte, True)
            lr = logreg(ftr[s], ytr, fte[s], yte)
            print(
                f"{arm:10s} stage {s + 1} ({ftr[s].shape[1]:3d} features): "
                f"AdamW head raw {raw[0]:.4f} (best {raw[1]:.4f}), standardized {std[0]:.4f} "
                f"(best {std[1]:.4f}); logistic regression "
                + ", ".join(f"C={c:g} {v:.4f}" for c, v in lr.items()),
                flush=True,
            )


if __name__ == "__main__":
    main()
