"""MiniLM (all-MiniLM-L6-v2) forward speed, side by side on this machine: PyTorch + transformers
(f32, and torch.ao.quantization.quantize_dynamic qint8 unless --no-int8) against wick f32 and
int8 (examples/bert_infer.rs, run as a subprocess unless --no-wick), at batch 1 x 128 tokens
(latency) and batch 32 x 128 tokens (throughput). Both read the same token ids: real text,
truncated to exactly 128 tokens. Threads: 2 (--threads).

    PYTHON=/path/to/venv/bin/python benches/compare/run_bert.sh
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "checkpoints/pretrained/all-MiniLM-L6-v2")
TEXT = (
    "The quick brown fox jumps over the lazy dog while the committee reviews the quarterly "
    "report on renewable energy, supply chains, interest rates and the weather in Lisbon. "
)


def inputs(tokenizer, batch, tokens):
    texts = [(TEXT * 20)[i * 7:] for i in range(batch)]
    enc = tokenizer(texts, truncation=True, max_length=tokens, padding="longest", return_tensors="pt")
    assert enc["input_ids"].shape == (batch, tokens), enc["input_ids"].shape
    return enc


def timeit(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class TorchSide:
    """The model loaded once; `time()` measures one round."""

    def __init__(self, args, int8):
        import torch
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(args.threads)
        self.torch = torch
        self.args = args
        tok = AutoTokenizer.from_pretrained(MODEL)
        model = AutoModel.from_pretrained(MODEL).eval()
        if int8:
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model = model
        self.inputs = {b: inputs(tok, b, args.tokens) for b in (1, 32)}

    def time(self):
        out = {}
        for batch, iters in ((1, self.args.iters * 5), (32, self.args.iters)):
            enc = self.inputs[batch]
            with self.torch.inference_mode():
                out[batch] = timeit(lambda: self.model(**enc), 2, iters)
        return out


def torch_int8_cosine(sides):
    """Mean cosine between PyTorch's f32 and quantize_dynamic sentence embeddings (mean pooling,
    as sentence-transformers) over the 50 sentences wick's int8 test uses."""
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    with open(os.path.join(ROOT, "tests/fixtures/sentences.txt")) as f:
        texts = [l.strip() for l in f if l.strip()]
    enc = tok(texts, truncation=True, max_length=128, padding="longest", return_tensors="pt")
    embs = []
    for side in (sides["PyTorch f32"], sides["PyTorch int8 (dynamic)"]):
        with torch.inference_mode():
            h = side.model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        e = (h * m).sum(1) / m.sum(1)
        embs.append(torch.nn.functional.normalize(e, dim=-1))
    return float((embs[0] * embs[1]).sum(-1).mean())


def wick_side(args):
    # WICK_BERT_INFER: a prebuilt examples/bert_infer binary (on a machine without Rust).
    prebuilt = os.environ.get("WICK_BERT_INFER")
    cmd = [prebuilt] if prebuilt else ["cargo", "run", "--release", "--quiet", "--example", "bert_infer", "--"]
    cmd += ["--threads", str(args.threads), "--tokens", str(args.tokens), "--iters", str(args.iters)]
    res = json.loads(subprocess.check_output(cmd, cwd=ROOT))
    return {f"wick {name}": {1: r["batch1_s"], 32: r["batch32_s"]} for name, r in res.items()}


def report(name, r):
    print(f"{name:<28} batch 1: {r[1] * 1e3:8.1f} ms   batch 32: {32 / r[32]:7.1f} seq/s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="alternating wick/PyTorch rounds")
    ap.add_argument("--no-int8", action="store_true", help="skip PyTorch quantize_dynamic(qint8)")
    ap.add_argument("--int8", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no-wick", action="store_true")
    args = ap.parse_args()
    sides = {"PyTorch f32": TorchSide(args, False)}
    if not args.no_int8:
        sides["PyTorch int8 (dynamic)"] = TorchSide(args, True)
        print(f"PyTorch int8 against f32 sentence embeddings (tests/fixtures/sentences.txt): "
              f"mean cosine {torch_int8_cosine(sides):.4f}")
    rounds = {}
    for _ in range(args.rounds):
        if not args.no_wick:
            for name, r in wick_side(args).items():
                rounds.setdefault(name, []).append(r)
        for name, side in sides.items():
            rounds.setdefault(name, []).append(side.time())
    # Per configuration, the median over rounds of each round's median.
    rows = [(name, {b: statistics.median(r[b] for r in rs) for b in (1, 32)}) for name, rs in rounds.items()]
    print(f"== MiniLM-L6 forward, {args.tokens} tokens, {args.threads} threads, "
          f"median of {args.rounds} alternating rounds")
    for name, r in rows:
        report(name, r)
    byname = dict(rows)
    base = byname["PyTorch f32"]
    for name, r in rows:
        if name.startswith("wick"):
            print(f"{name} vs PyTorch f32: latency {base[1] / r[1]:.2f}x, throughput {base[32] / r[32]:.2f}x")
    # The same ratios taken round by round (each wick run against the PyTorch run right after
    # it), which the machine's drifting speed moves less than the ratio of the two medians.
    for name in rounds:
        if name.startswith("wick") and len(rounds[name]) == len(rounds["PyTorch f32"]) > 1:
            per = {b: sorted(t[b] / w[b] for w, t in zip(rounds[name], rounds["PyTorch f32"])) for b in (1, 32)}
            print(f"{name} vs PyTorch f32, round by round: latency {statistics.median(per[1]):.2f}x "
                  f"({per[1][0]:.2f}-{per[1][-1]:.2f}), throughput {statistics.median(per[32]):.2f}x "
                  f"({per[32][0]:.2f}-{per[32][-1]:.2f})")
    pairs = [("wick int8", "PyTorch int8 (dynamic)"), ("wick int8", "wick f32"),
             ("PyTorch int8 (dynamic)", "PyTorch f32")]
    for a, b in pairs:
        if a in byname and b in byname:
            x, y = byname[a], byname[b]
            print(f"{a} vs {b}: latency {y[1] / x[1]:.2f}x, throughput {y[32] / x[32]:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
