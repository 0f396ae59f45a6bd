#!/usr/bin/env bash
# The test command. Installs OpenMPI (for the data-parallel tests), builds wick with MPI, fetches
# any missing test assets, then runs every test (unit, integration, doc) in release mode with the
# `mpi` feature. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-mpi.sh
cargo build --release --features mpi --quiet
scripts/fetch-test-assets.sh
exec cargo test --release --features mpi "$@"
