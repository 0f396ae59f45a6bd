#!/usr/bin/env bash
# Peak anonymous memory (RssAnon) while iterating one shuffled epoch of a 1 GB and a 4 GB
# shard set with wick's prefetching loader. The datasets are generated under target/loader-mem/.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --example loader_memory --quiet
for gb in 1 4; do
    target/release/examples/loader_memory prepare "$gb"
done
for gb in 1 4; do
    target/release/examples/loader_memory "$gb"
done
