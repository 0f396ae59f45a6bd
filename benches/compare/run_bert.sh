#!/usr/bin/env bash
# Side-by-side all-MiniLM-L6-v2 forward speed on this machine, in one run: wick (criterion
# bench benches/bert_infer.rs, then examples/bert_infer.rs interleaved with PyTorch by
# benches/compare/bert_infer.py) and PyTorch + transformers, 2 threads, batch 1 × 128 tokens
# (latency) and batch 32 × 128 tokens (throughput), f32 and int8 (wick quantize, PyTorch
# quantize_dynamic).
# PYTHON must have torch and transformers (benches/compare/requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
scripts/fetch-minilm.sh
echo "== machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p')"
echo "== wick (cargo bench --bench bert_infer)"
cargo bench --bench bert_infer 2>/dev/null | grep -E '^minilm_|time:|thrpt:'
echo "== wick and PyTorch, alternating rounds (benches/compare/bert_infer.py)"
"$PYTHON" benches/compare/bert_infer.py --threads 2 --rounds 3 "$@"
