#!/usr/bin/env bash
# Installs Fashion-MNIST (Debian package dataset-fashion-mnist) if missing and packs it into
# shards under data/fashion-mnist/{train,test} (git-ignored). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=/usr/share/datasets/fashion-mnist
if [ ! -f "$SRC/train-images-idx3-ubyte.gz" ]; then
    echo "installing dataset-fashion-mnist (apt)" >&2
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
WICK=${WICK:-target/release/wick}
if [ ! -x "$WICK" ]; then cargo build --release --quiet; fi
CLASSES="T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot"
for split in train t10k; do
    out=data/fashion-mnist/$([ $split = t10k ] && echo test || echo train)
    if [ ! -f "$out/manifest.json" ]; then
        "$WICK" data pack idx --images "$SRC/$split-images-idx3-ubyte.gz" \
            --labels "$SRC/$split-labels-idx1-ubyte.gz" --class-names "$CLASSES" \
            --shard-size 16MiB --out "$out" >/dev/null
    fi
done
echo "data/fashion-mnist/train and data/fashion-mnist/test are ready" >&2
