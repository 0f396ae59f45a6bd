#!/usr/bin/env bash
# Data-parallel scaling on this machine: training throughput of 2 MPI ranks × 1 thread against
# 1 rank × 1 thread (same per-rank batch), on the digits MLP and on ResNet-18 at batch 16 ×
# 3×64×64 (synthetic images), then the all-reduce bandwidth of 45 MB of f32 against memcpy.
# Throughput is the trainer's own (samples over time spent in training steps, every rank's
# samples counted), and the share of rank 0's step time spent communicating (gradient
# all-reduce and the per-step stop vote, waiting for the other rank included), a figure the
# machine's drifting speed does not skew. Needs OpenMPI (scripts/fetch-mpi.sh). EPOCHS_MLP / EPOCHS_RESNET shorten it.
# WICK_PREBUILT=DIR takes wick, synthetic_data and allreduce_bw from DIR instead of building
# them (for a machine without Rust). SKIP_RESNET=1 leaves ResNet-18 out. ROUNDS=N repeats each
# comparison N times, alternating its runs, and prints medians (this VM's speed drifts by
# ±20% between runs).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -n "${WICK_PREBUILT:-}" ]; then
    W=$WICK_PREBUILT/wick EX=$WICK_PREBUILT
else
    cargo build --release --features mpi --quiet --bin wick --example synthetic_data --example allreduce_bw
    W=target/release/wick EX=target/release/examples
fi
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
echo "== machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'); runs in $OUT"

IMG=.cache/ddp-bench/images64
"$EX/synthetic_data" "$IMG" 640 12288 10
cat > "$OUT/resnet.toml" <<TOML
[run]
name = "ddp_resnet18"
[data]
path = "$(pwd)/$IMG"
label = "label"
standardize = false
test_fraction = 0.05
[model]
kind = "resnet"
arch = "resnet18"
input_shape = [3, 64, 64]
[optim]
kind = "sgd"
lr = 0.01
momentum = 0.9
[train]
epochs = ${EPOCHS_RESNET:-3}
batch_size = 16
drop_last = true
TOML

# PIN="A B" pins the runs to CPUs A and B (the single run to A, the ranks and the two
# independent runs to one each), on machines with cores to spare.
read -r -a PINS <<< "${PIN:-}"
on() { # CPU-INDEX COMMAND...: the command, pinned to that CPU when PIN is set
    local i=$1; shift
    if [ ${#PINS[@]} -ge 2 ]; then taskset -c "${PINS[$i]}" "$@"; else "$@"; fi
}
LAUNCH=("$W" launch --nproc 2)
if [ ${#PINS[@]} -ge 2 ]; then
    LAUNCH+=(--mpi-arg=--cpu-set --mpi-arg="${PINS[0]},${PINS[1]}" --mpi-arg=--bind-to --mpi-arg=core)
fi

compare() { # NAME CONFIG SETS...: ROUNDS rounds (default 1), alternating the three kinds of run
    local name=$1 cfg=$2; shift 2
    local k
    for k in $(seq "${ROUNDS:-1}"); do
        local d="$OUT/$name-r$k"
        on 0 "$W" train "$cfg" --threads 1 --quiet --run-dir "$d-1" "$@" >/dev/null
        "${LAUNCH[@]}" -- train "$cfg" --threads 1 --quiet --run-dir "$d-2" "$@" >/dev/null
        # The machine's own ceiling: two independent 1-rank runs at once, no communication.
        on 0 "$W" train "$cfg" --threads 1 --quiet --run-dir "$d-a" "$@" >/dev/null &
        on 1 "$W" train "$cfg" --threads 1 --quiet --run-dir "$d-b" "$@" >/dev/null
        wait
    done
    python3 - "$name" "$OUT/$name" "${ROUNDS:-1}" <<'PY'
import json, statistics, sys
name, base, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
j = lambda k, s: json.load(open(f"{base}-r{k}-{s}/summary.json"))
r = lambda k, s: j(k, s)["train_samples_per_s"]
ks = range(1, rounds + 1)
one = [r(k, "1") for k in ks]
two = [r(k, "2") for k in ks]
both = [r(k, "a") + r(k, "b") for k in ks]
comm = [j(k, "2")["comm_time_s"] / j(k, "2")["train_time_s"] for k in ks]
med = statistics.median
def ratio(xs):  # median of the round-by-round ratios to the single rank, and their range
    rs = [x / o for x, o in zip(xs, one)]
    return f"{med(rs):.2f}x" + (f" ({min(rs):.2f}-{max(rs):.2f})" if rounds > 1 else "")
print(f"{name:<28} 1 rank {med(one):9.1f}/s  2 ranks {med(two):9.1f}/s  scaling {ratio(two)}"
      f"  | 2 independent runs {med(both):9.1f}/s = {ratio(both)} (the machine's ceiling)"
      f"  | communication {100*med(comm):.1f}% of rank 0's step time"
      + (f"  [medians of {rounds} rounds]" if rounds > 1 else ""))
PY
}
echo "== throughput, 1 thread per rank"
E=${EPOCHS_MLP:-60}
compare "digits MLP, batch 32/rank" configs/digits_mlp.toml --set train.batch_size=32 --set "train.epochs=$E"
compare "digits MLP, batch 128/rank" configs/digits_mlp.toml --set train.batch_size=128 --set "train.epochs=$E"
# The config as it ships evaluates and checkpoints after every epoch, and an epoch of 1,437
# rows takes 9-15 ms here: rank 0's checkpoint writer (files, fsyncs) then competes with the
# two ranks for the two cores. The same runs with evaluation and checkpoints only at the end
# measure the training steps alone, as DDP benchmarks usually do.
STEADY=(--set "train.eval_every=$E" --set "train.save_every=$E")
compare "MLP b32, eval+save at end" configs/digits_mlp.toml --set train.batch_size=32 --set "train.epochs=$E" "${STEADY[@]}"
compare "MLP b128, eval+save at end" configs/digits_mlp.toml --set train.batch_size=128 --set "train.epochs=$E" "${STEADY[@]}"
[ -n "${SKIP_RESNET:-}" ] || compare "ResNet-18 16x3x64x64/rank" "$OUT/resnet.toml"
echo "== all-reduce, 2 ranks"
mpirun $([ "$(id -u)" = 0 ] && echo --allow-run-as-root) -np 2 --bind-to none "$EX/allreduce_bw" 45
