#!/usr/bin/env bash
# The test command. Fetches any missing test assets, then runs every test (unit, integration,
# doc) in release mode. Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/fetch-test-assets.sh
exec cargo test --release "$@"
