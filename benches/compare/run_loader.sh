#!/usr/bin/env bash
# Side-by-side loader throughput on this machine, in one run: wick (criterion bench over
# memory-mapped shards) and, on the same data, PyTorch's DataLoader (num_workers 0 and 2) and
# a raw numpy fancy-index gather. PYTHON must have torch and numpy.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
echo "== machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p')"
echo "== wick (cargo bench --bench loader)"
cargo bench --bench loader 2>/dev/null | grep -E '^loader/|thrpt' | grep -v '%'
echo "== PyTorch / numpy (benches/compare/loader.py)"
"$PYTHON" benches/compare/loader.py --seconds 5
