#!/usr/bin/env python3
"""Python reference for wick's data-loader benchmark (CPU, page-cache warm).

What it measures
----------------
Throughput of delivering shuffled mini-batches of the shard dataset that
wick's criterion bench (`cargo bench --bench loader`) writes to
<dir>/shards/ (default dir: target/loader-bench under the repository root):
manifest.json ({"shards": [{"file": ..., "samples": ...}, ...]}) and
safetensors files shard-00000.safetensors, ... each holding `x` (F32,
[n_i, 784]) and `label` (I64, [n_i]).

Preparation (not timed): all shards' `x` tensors are concatenated, in
manifest order, into one raw C-order float32 file <dir>/x.f32 of shape
[N, 784], and the labels into <dir>/labels.i64 ([N] int64). The files are
(re)written only if missing, of the wrong size, older than manifest.json, or
when --rebuild is given. The safetensors files are read WITHOUT the
safetensors package: the header (8-byte little-endian length, then JSON with
per-tensor dtype, shape and data_offsets relative to the end of the header)
is parsed here and the tensor bytes are mapped with np.memmap. Both files are
then opened with np.memmap(mode='r') and read through once, so every
variant below starts with the data in the page cache.

Variants (each: batches of --batch samples, the whole dataset reshuffled
every epoch, the last partial batch kept, a --warmup-second warm-up on the
same iterator, then --seconds of wall time measured with time.perf_counter;
epochs continue until the time is up and the run stops mid-epoch):

* raw_gather: numpy only -- perm = rng.permutation(N) per epoch (one
  np.random.default_rng(--seed) for the run), then x[idx] and labels[idx]
  (fancy-index gather) for each batch's index array. This is the practical
  limit for a shuffled in-memory loader on this machine.
* torch_w0 / torch_w2: torch.utils.data.DataLoader over a map-style Dataset
  wrapping the memmaps, __getitem__(i) returning
  (torch.from_numpy(np.array(x[i])), int(labels[i])), batch_size=--batch,
  shuffle=True, default collate, generator=torch.Generator().manual_seed(seed);
  num_workers=0, and num_workers=2 with persistent_workers=True (the worker
  start-up falls into the warm-up). --workers changes the worker counts.
* torch_batched_w0: the "batched" variant -- DataLoader(batch_size=None,
  sampler=BatchSampler(RandomSampler(ds, generator=g), --batch,
  drop_last=False), num_workers=0), __getitem__ receives the whole list of
  indices and returns x[idx], labels[idx] as tensors (one fancy-index gather
  per batch instead of --batch single-row copies + collate). Skip with
  --no-batched.

Reported per variant: samples/s and GB/s = samples * 784 * 4 bytes / s / 1e9
(x payload only, decimal GB), plus batches, full epochs and seconds.
torch.set_num_threads(--threads) (default 2) in the main process.

How to run
----------
From the repository root, after `cargo bench --bench loader` has created the
data, with a Python env with torch and numpy
(see benches/compare/requirements.txt):

    python benches/compare/loader.py
    python benches/compare/loader.py --seconds 10 --json

--json prints one JSON object ({"framework": "pytorch", "samples": N,
"features": 784, "batch": ..., "results": {"raw_gather": {...},
"torch_w0": {...}, ...}, ...}) instead of the table.
"""

import argparse
import json
import multiprocessing
import os
import sys
import time

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_DIR = os.path.join(REPO_ROOT, "target", "loader-bench")

# safetensors dtype name -> little-endian numpy dtype (only what we need).
ST_DTYPES = {"F32": np.dtype("<f4"), "I64": np.dtype("<i8")}


# --------------------------------------------------------------------------
# safetensors reading (no safetensors package)
# --------------------------------------------------------------------------

def read_safetensors_header(path):
    """Return (header dict, absolute byte offset of the data section)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: too short for a safetensors file")
        n = int.from_bytes(head, "little")
        size = os.fstat(f.fileno()).st_size
        if n > size - 8:
            raise ValueError(f"{path}: header length {n} exceeds file size {size}")
        header = json.loads(f.read(n).decode("utf-8"))
    return header, 8 + n, size


def map_tensor(path, name, want_dtype):
    """np.memmap (read-only) of tensor `name` in safetensors file `path`."""
    header, data_start, size = read_safetensors_header(path)
    if name not in header:
        raise KeyError(f"{path}: no tensor {name!r} (has {sorted(k for k in header if k != '__metadata__')})")
    info = header[name]
    dtype = ST_DTYPES.get(info["dtype"])
    if dtype is None or info["dtype"] != want_dtype:
        raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, expected {want_dtype}")
    shape = tuple(int(d) for d in info["shape"])
    begin, end = (int(o) for o in info["data_offsets"])
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if end - begin != nbytes:
        raise ValueError(f"{path}: tensor {name!r} spans {end - begin} bytes, shape {shape} needs {nbytes}")
    if data_start + end > size:
        raise ValueError(f"{path}: tensor {name!r} runs past the end of the file")
    if nbytes == 0:  # np.memmap refuses empty maps
        return np.empty(shape, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=data_start + begin, shape=shape)


# --------------------------------------------------------------------------
# contiguous cache files
# --------------------------------------------------------------------------

def load_manifest(shard_dir):
    path = os.path.join(shard_dir, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    shards = manifest["shards"]
    if not shards:
        raise ValueError(f"{path}: no shards")
    return path, [(os.path.join(shard_dir, s["file"]), int(s["samples"])) for s in shards]


def shard_features(path):
    header, _, _ = read_safetensors_header(path)
    shape = header["x"]["shape"]
    if len(shape) != 2:
        raise ValueError(f"{path}: x has shape {shape}, expected [n, features]")
    return int(shape[1])


def stale(path, nbytes, manifest_path):
    if not os.path.exists(path):
        return "missing"
    if os.path.getsize(path) != nbytes:
        return f"size {os.path.getsize(path)} != {nbytes}"
    if os.path.getmtime(path) < os.path.getmtime(manifest_path):
        return "older than manifest.json"
    return None


def build_cache(shards, features, x_path, y_path, log):
    total = sum(n for _, n in shards)
    t0 = time.perf_counter()
    x_tmp, y_tmp = x_path + ".tmp", y_path + ".tmp"
    x_out = np.memmap(x_tmp, dtype="<f4", mode="w+", shape=(total, features))
    y_out = np.memmap(y_tmp, dtype="<i8", mode="w+", shape=(total,))
    row = 0
    for path, n in shards:
        xs = map_tensor(path, "x", "F32")
        ys = map_tensor(path, "label", "I64")
        if xs.shape != (n, features):
            raise ValueError(f"{path}: x shape {xs.shape}, manifest says ({n}, {features})")
        if ys.shape != (n,):
            raise ValueError(f"{path}: label shape {ys.shape}, manifest says ({n},)")
        x_out[row:row + n] = xs
        y_out[row:row + n] = ys
        row += n
        del xs, ys
    x_out.flush()
    y_out.flush()
    del x_out, y_out
    os.replace(x_tmp, x_path)
    os.replace(y_tmp, y_path)
    log(f"wrote {x_path} and {y_path} ({total} x {features}) in {time.perf_counter() - t0:.2f} s")


def spot_check(shards, x, y):
    """First and last row of every shard must match the cache."""
    row = 0
    for path, n in shards:
        if n:
            xs = map_tensor(path, "x", "F32")
            ys = map_tensor(path, "label", "I64")
            for r in (0, n - 1):
                if not (np.array_equal(xs[r], x[row + r]) and ys[r] == y[row + r]):
                    raise ValueError(f"cache mismatch at {path} row {r}; rerun with --rebuild")
        row += n


def prepare(data_dir, rebuild, log):
    shard_dir = os.path.join(data_dir, "shards")
    manifest_path, shards = load_manifest(shard_dir)
    features = shard_features(shards[0][0])
    total = sum(n for _, n in shards)
    x_path = os.path.join(data_dir, "x.f32")
    y_path = os.path.join(data_dir, "labels.i64")
    why = "--rebuild" if rebuild else (
        stale(x_path, total * features * 4, manifest_path)
        or stale(y_path, total * 8, manifest_path))
    if why:
        log(f"building cache ({why})")
        build_cache(shards, features, x_path, y_path, log)
    x = np.memmap(x_path, dtype="<f4", mode="r", shape=(total, features))
    y = np.memmap(y_path, dtype="<i8", mode="r", shape=(total,))
    spot_check(shards, x, y)
    # Read everything once so all variants start page-cache warm.
    chunk = 8192
    for i in range(0, total, chunk):
        np.add.reduce(x[i:i + chunk], axis=None)
    np.add.reduce(y)
    return x_path, y_path, x, y, len(shards)


# --------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------

class _MemmapDataset(Dataset):
    """Holds the memmaps; pickles as paths (a pickled np.memmap would copy
    the whole array into every worker under spawn/forkserver)."""

    def __init__(self, x_path, y_path, n, features):
        self.x_path, self.y_path, self.n, self.features = x_path, y_path, n, features
        self._open()

    def _open(self):
        self.x = np.memmap(self.x_path, dtype="<f4", mode="r", shape=(self.n, self.features))
        self.y = np.memmap(self.y_path, dtype="<i8", mode="r", shape=(self.n,))

    def __getstate__(self):
        s = self.__dict__.copy()
        del s["x"], s["y"]
        return s

    def __setstate__(self, s):
        self.__dict__.update(s)
        self._open()

    def __len__(self):
        return self.n


class SampleDataset(_MemmapDataset):
    def __getitem__(self, i):
        return torch.from_numpy(np.array(self.x[i])), int(self.y[i])


class BatchDataset(_MemmapDataset):
    """Indexed with a list of indices (from a BatchSampler)."""

    def __getitem__(self, idx):
        idx = np.asarray(idx, dtype=np.int64)
        return torch.from_numpy(self.x[idx]), torch.from_numpy(self.y[idx])


# --------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------

def raw_gather_batches(x, y, batch, seed, state):
    rng = np.random.default_rng(seed)
    n = len(x)
    while True:
        perm = rng.permutation(n)
        for s in range(0, n, batch):
            idx = perm[s:s + batch]
            xb = x[idx]
            yb = y[idx]
            yield xb, yb
        state["epochs"] += 1


def loader_batches(loader, state):
    while True:
        for xb, yb in loader:
            yield xb, yb
        state["epochs"] += 1


def measure(make_iter, warmup, seconds, features):
    """Pull batches for `warmup` s, then count what arrives in `seconds` s."""
    state = {"epochs": 0}
    it = make_iter(state)
    t_end = time.perf_counter() + warmup
    warm_batches = 0
    while True:
        next(it)
        warm_batches += 1
        if warm_batches >= 2 and time.perf_counter() >= t_end:
            break
    epochs0 = state["epochs"]
    samples = batches = 0
    t0 = time.perf_counter()
    t_end = t0 + seconds
    while True:
        xb, yb = next(it)
        samples += len(xb)
        batches += 1
        now = time.perf_counter()
        if now >= t_end:
            break
    elapsed = now - t0
    if len(xb) != len(yb) or xb.shape[1] != features:
        raise RuntimeError(f"bad batch shapes {tuple(xb.shape)}, {tuple(yb.shape)}")
    it.close()
    sps = samples / elapsed
    return {
        "samples": samples,
        "batches": batches,
        "epochs": state["epochs"] - epochs0,
        "seconds": elapsed,
        "samples_per_s": sps,
        "gb_per_s": sps * features * 4 / 1e9,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=DEFAULT_DIR,
                   help="dir with shards/ (default: <repo>/target/loader-bench)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured wall time per variant")
    p.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per variant")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--workers", default="0,2", help="comma-separated num_workers for the per-sample DataLoader")
    p.add_argument("--no-batched", action="store_true", help="skip the batched-sampler DataLoader variant")
    p.add_argument("--rebuild", action="store_true", help="rewrite x.f32 / labels.i64 even if they look current")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args()

    def log(msg):
        print(msg, file=sys.stderr if args.json else sys.stdout, flush=True)

    torch.set_num_threads(args.threads)
    x_path, y_path, x, y, n_shards = prepare(args.dir, args.rebuild, log)
    n, features = x.shape
    workers = [int(w) for w in args.workers.split(",") if w.strip()]

    variants = [("raw_gather", "numpy x[idx] gather (limit)", 0,
                 lambda st: raw_gather_batches(x, y, args.batch, args.seed, st))]

    loaders = []  # kept alive so persistent workers can be shut down at the end

    def per_sample(w):
        def make(st):
            ds = SampleDataset(x_path, y_path, n, features)
            g = torch.Generator().manual_seed(args.seed)
            kw = dict(persistent_workers=True) if w > 0 else {}
            dl = DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=w, generator=g, **kw)
            loaders.append(dl)
            return loader_batches(dl, st)
        return make

    def batched(st):
        ds = BatchDataset(x_path, y_path, n, features)
        g = torch.Generator().manual_seed(args.seed)
        sampler = BatchSampler(RandomSampler(ds, generator=g), args.batch, drop_last=False)
        dl = DataLoader(ds, batch_size=None, sampler=sampler, num_workers=0)
        loaders.append(dl)
        return loader_batches(dl, st)

    for w in workers:
        variants.append((f"torch_w{w}", f"DataLoader per-sample, workers={w}", w, per_sample(w)))
    if not args.no_batched:
        variants.append(("torch_batched_w0", "DataLoader batched (BatchSampler), workers=0", 0, batched))

    results = {}
    for key, label, w, make in variants:
        r = measure(make, args.warmup, args.seconds, features)
        r.update(label=label, num_workers=w)
        results[key] = r
        log(f"  {label}: {r['samples_per_s']:,.0f} samples/s")
    loaders.clear()

    out = {
        "framework": "pytorch",
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": sys.version.split()[0],
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "mp_start_method": multiprocessing.get_start_method(),
        "dir": os.path.abspath(args.dir),
        "shards": n_shards,
        "samples": int(n),
        "features": int(features),
        "dataset_bytes": int(n) * int(features) * 4,
        "batch": args.batch,
        "seed": args.seed,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "results": results,
    }
    if args.json:
        print(json.dumps(out))
        return

    print(f"\ndataset: {n} x {features} f32 ({out['dataset_bytes'] / 1e6:.1f} MB) in {n_shards} shards, "
          f"batch {args.batch}, {args.seconds:g} s per variant, torch {torch.__version__}, "
          f"{args.threads} threads, {os.cpu_count()} cpus")
    hdr = f"{'variant':<18} {'description':<46} {'samples/s':>12} {'GB/s':>7} {'batches':>8} {'epochs':>6}"
    print(hdr)
    print("-" * len(hdr))
    for key, r in results.items():
        print(f"{key:<18} {r['label']:<46} {r['samples_per_s']:>12,.0f} {r['gb_per_s']:>7.3f} "
              f"{r['batches']:>8} {r['epochs']:>6}")


if __name__ == "__main__":
    main()
