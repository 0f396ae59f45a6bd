#!/usr/bin/env bash
# Side-by-side ResNet-18 training-step throughput (batch 16 x 3x64x64, SGD momentum 0.9) on
# this machine, in one run: wick (criterion bench benches/resnet_step.rs) and PyTorch
# (benches/compare/resnet_step.py, 2 threads), full training and frozen backbone.
# PYTHON must have torch (benches/compare/requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
echo "== machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p')"
echo "== wick (cargo bench --bench resnet_step)"
cargo bench --bench resnet_step 2>/dev/null | grep -E '^resnet18_train_step/|thrpt'
echo "== PyTorch, 2 threads"
"$PYTHON" benches/compare/resnet_step.py --threads 2
