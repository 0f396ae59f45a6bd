#!/usr/bin/env bash
# Side-by-side MLP training throughput on this machine, in one run: wick (criterion bench,
# fused kernel and candle-autograd path) and PyTorch (2 threads, then 1).
# PYTHON must have torch, numpy and scikit-learn (benches/compare/requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
echo "== machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p')"
echo "== wick (cargo bench --bench mlp_train)"
cargo bench --bench mlp_train 2>/dev/null | grep -E '^mlp_train/|thrpt'
for t in 2 1; do
    echo "== PyTorch, $t thread(s)"
    "$PYTHON" benches/compare/mlp_train.py --threads "$t"
done
