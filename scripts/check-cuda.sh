#!/usr/bin/env bash
# Compiles wick's CUDA and NCCL code (features cuda, nccl, mpi) on a machine with no GPU: the
# toolkit comes from NVIDIA's PyPI wheels (scripts/fetch-cuda.sh, into ../shared/cuda), and
# candle's kernels are compiled for sm_90 (H100/H200). CI runs it. Extra arguments go to
# `cargo clippy` (it checks and lints; warnings are errors). The first run takes ~6 minutes on
# 2 cores: candle-kernels compiles ~30 CUDA files. The GPU tests (tests/gpu.rs) are built with
# `cargo test --release --features cuda,nccl --test gpu --no-run` and run on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-cuda.sh >/dev/null
# shellcheck source=scripts/cuda-env.sh
source scripts/cuda-env.sh
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
exec cargo clippy --release --features cuda,nccl,mpi --lib --bins --tests --examples "$@" -- -D warnings
