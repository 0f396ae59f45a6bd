#!/usr/bin/env bash
# Assembles a CUDA 13.x toolkit (nvcc, cicc/nvvm, headers, cudart, cuBLAS, cuRAND, NVRTC, NCCL)
# from NVIDIA's PyPI wheels into one prefix, so that `cargo check --features cuda,nccl` (candle's
# cudarc + candle-kernels build scripts) works on a machine with no GPU and no system CUDA.
#
#   prefix:  $WICK_CUDA_HOME, default ../shared/cuda relative to the repo root
#   version: $WICK_CUDA_VERSION, 13.0 (default: runs on the r580 drivers of the GPU machines) or 13.4
#   then:    source scripts/cuda-env.sh      (or export what this script prints at the end)
#
# Pins are the sets the `cuda-toolkit==13.4.3` / `==13.0.2` meta-wheels require. 13.4 is the newest
# minor cudarc 0.19.10 (candle 0.11's) knows (CUDARC_CUDA_VERSION=13040); PyPI also has 13.5, which
# cudarc's build script rejects. Use 13.0 when the GPU machine's driver is CUDA 13.0-era (r580):
# candle JIT-loads PTX, and a driver older than the nvcc that wrote the PTX refuses it.
# (CUDA 12.x is not possible this way: the -cu12 nvcc wheel ships ptxas but no nvcc/cicc.)
# NCCL 2.30 matches cudarc's `nccl` feature (nccl-02030).
#
# The wheels have no libcuda.so (it comes with the driver), so a link-only stub libcuda.so
# (SONAME libcuda.so.1, no-op functions) is built into $PREFIX/lib/stubs for `cargo build`'s final
# link; never put lib/stubs on LD_LIBRARY_PATH. Idempotent: a complete prefix is left alone
# (WICK_CUDA_FORCE=1 reinstalls). WICK_CUDA_KEEP_WHEELS=1 keeps the downloaded wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

CUDA_MM=${WICK_CUDA_VERSION:-13.0}   # toolkit major.minor (13.0 runs on r580 drivers)
case "$CUDA_MM" in
    13.4) PKGS=(
            nvidia-cuda-nvcc==13.4.92
            nvidia-nvvm==13.4.92
            nvidia-cuda-crt==13.4.92
            nvidia-cuda-runtime==13.4.92
            nvidia-cuda-nvrtc==13.4.92
            nvidia-cuda-cccl==13.3.4.3.1
            nvidia-cublas==13.8.0.4
            nvidia-curand==10.4.4.72
            nvidia-nccl-cu13==2.30.7
        ) ;;
    13.0) PKGS=(
            nvidia-cuda-nvcc==13.0.88
            nvidia-nvvm==13.0.88
            nvidia-cuda-crt==13.0.88
            nvidia-cuda-runtime==13.0.96
            nvidia-cuda-nvrtc==13.0.88
            nvidia-cuda-cccl==13.0.85
            nvidia-cublas==13.1.0.3
            nvidia-curand==10.4.0.35
            nvidia-nccl-cu13==2.30.7
        ) ;;
    *) echo "WICK_CUDA_VERSION must be 13.4 or 13.0 (got $CUDA_MM)" >&2; exit 2 ;;
esac
CUDARC_VERSION="${CUDA_MM%%.*}0${CUDA_MM#*.}0"   # 13.4 -> 13040, as cudarc's build.rs spells it
SPEC="${PKGS[*]}"

PREFIX=${WICK_CUDA_HOME:-"$REPO/../shared/cuda"}
mkdir -p "$PREFIX"
PREFIX=$(cd "$PREFIX" && pwd)
MARKER="$PREFIX/.wick-cuda-complete"

print_env() {
    cat <<EOF
# CUDA $CUDA_MM toolkit (PyPI wheels) at $PREFIX; export (or: source scripts/cuda-env.sh):
export CUDA_HOME="$PREFIX"
export CUDA_PATH="$PREFIX"
export CUDA_ROOT="$PREFIX"
export PATH="$PREFIX/bin:\$PATH"
export CUDA_COMPUTE_CAP=90
export CUDARC_CUDA_VERSION=$CUDARC_VERSION
# only to run binaries (real GPU + driver needed), never lib/stubs:
export LD_LIBRARY_PATH="$PREFIX/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
EOF
}

# Serialise concurrent runs (the prefix is shared between checkouts).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$PREFIX/.lock"
    flock 9
fi

if [ "${WICK_CUDA_FORCE:-0}" != 1 ] && [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$SPEC" ] \
    && "$PREFIX/bin/nvcc" --version >/dev/null 2>&1; then
    echo "CUDA $CUDA_MM toolkit at $PREFIX is ready" >&2
    print_env
    exit 0
fi
# A prefix this script made before (other version, or interrupted): clear it, keep the wheel cache.
if [ -f "$MARKER" ] || [ -f "$PREFIX/.wick-cuda-version" ]; then
    rm -rf "$PREFIX/bin" "$PREFIX/include" "$PREFIX/lib" "$PREFIX/lib64" "$PREFIX/nvvm" \
        "$PREFIX/cccl" "$PREFIX/.metadata"
    rm -f "$MARKER" "$PREFIX/.wick-cuda-version"
fi
echo "$CUDA_MM" >"$PREFIX/.wick-cuda-version"

# 1. Download the Linux x86_64 wheels (whatever the host is).
WHEELS="$PREFIX/.wheels"
mkdir -p "$WHEELS"
echo "downloading CUDA $CUDA_MM wheels (PyPI) into $WHEELS" >&2
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.11 --implementation py \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_18_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 \
    --platform manylinux2010_x86_64 \
    --dest "$WHEELS" "${PKGS[@]}"

# 2. Unpack nvidia/cu13/* and nvidia/nccl/* into one tree (bin include lib nvvm), keeping modes.
#    The nvcc wheel's bin/nvcc.profile already points at $(TOP)/nvvm/bin, $(TOP)/include(/cccl)
#    and $(TOP)/lib, so the merged tree is the layout nvcc expects without edits.
echo "unpacking into $PREFIX" >&2
python3 - "$PREFIX" "$WHEELS" "${PKGS[@]}" <<'PY'
import glob, os, re, shutil, sys, zipfile
prefix, wheels, pkgs = sys.argv[1], sys.argv[2], sys.argv[3:]
for spec in pkgs:
    name, ver = spec.split("==")
    pat = os.path.join(wheels, f"{name.replace('-', '_')}-{ver}-*.whl")
    found = glob.glob(pat)
    if len(found) != 1:
        sys.exit(f"expected one wheel for {spec} ({pat}), found {found}")
    with zipfile.ZipFile(found[0]) as z:
        for info in z.infolist():
            m = re.match(r"nvidia/[^/]+/(.+)", info.filename)  # nvidia/cu13/..., nvidia/nccl/...
            if not m or info.is_dir() or m.group(1).endswith("__init__.py"):
                continue
            dest = os.path.join(prefix, m.group(1))
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            tmp = dest + ".part"
            with z.open(info) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = (info.external_attr >> 16) & 0o777
            os.chmod(tmp, 0o755 if mode & 0o111 else 0o644)
            os.replace(tmp, dest)
PY

# 3. Linker names (libfoo.so -> libfoo.so.N) and lib64 -> lib, as in a system toolkit.
cd "$PREFIX/lib"
for so in lib*.so.[0-9]*; do
    case "$so" in libnvrtc-builtins*) continue ;; esac
    ln -sfn "$so" "${so%.so.*}.so"
done
cd "$PREFIX"
[ -e lib64 ] || ln -s lib lib64

# 4. Link-only stub libcuda.so (the driver library is not on PyPI): one no-op per driver-API name
#    (cuFoo, cuFoo_v2, ...) in the cuda*.h headers; PFN_cuFoo_v4000 typedefs give cuFoo.
mkdir -p lib/stubs
STUB_SRC=$(mktemp --suffix=.c)
trap 'rm -f "$STUB_SRC"' EXIT
grep -ohE 'cu[A-Z][A-Za-z0-9_]*' include/cuda*.h | sed -E 's/_v[0-9]{4,}$//' | sort -u \
    | awk '{ printf "void %s(void) {}\n", $1 }' >"$STUB_SRC"
${CC:-cc} -shared -fPIC -o lib/stubs/libcuda.so -Wl,-soname,libcuda.so.1 "$STUB_SRC"

# 5. Check: nvcc runs, compiles a kernel with fp16/bf16/runtime headers to PTX and to an sm_90
#    object (cicc, ptxas, fatbinary, host g++), archives it like candle-kernels' build does, and a
#    host program links against the stub driver + cuBLAS/cuRAND/NVRTC/NCCL/cudart.
echo "checking nvcc" >&2
T=$(mktemp -d)
trap 'rm -f "$STUB_SRC"; rm -rf "$T"' EXIT
bin/nvcc --version | tee "$T/version" >&2
grep -q "release $CUDA_MM," "$T/version" || { echo "nvcc is not CUDA $CUDA_MM" >&2; exit 1; }
cat >"$T/k.cu" <<'CU'
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
extern "C" __global__ void axpy_f16(const __half *x, __half *y, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __float2half(a * __half2float(x[i]) + __half2float(y[i]));
}
extern "C" __global__ void scale_bf16(__nv_bfloat16 *y, float a, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = __float2bfloat16(a * __bfloat162float(y[i]));
}
CU
bin/nvcc -arch=sm_90 -ptx -std=c++17 -O3 --expt-relaxed-constexpr -o "$T/k.ptx" "$T/k.cu"
grep -q '\.target sm_90' "$T/k.ptx" && grep -q 'axpy_f16' "$T/k.ptx"
bin/nvcc -gencode=arch=compute_90,code=sm_90 -c -std=c++17 -Xcompiler -fPIC -o "$T/k.o" "$T/k.cu"
bin/nvcc --lib -o "$T/libk.a" "$T/k.o"
cat >"$T/host.c" <<'C'
#include <cuda.h>
#include <cublas_v2.h>
#include <curand.h>
#include <nvrtc.h>
#include <nccl.h>
#include <cuda_runtime_api.h>
int main(void) {
    cublasHandle_t h; curandGenerator_t g; ncclUniqueId id; int v;
    return (int)cuInit(0) + (int)cublasCreate(&h) + (int)curandCreateGenerator(&g, CURAND_RNG_PSEUDO_DEFAULT)
        + (int)nvrtcVersion(&v, &v) + (int)ncclGetUniqueId(&id) + (int)cudaGetDeviceCount(&v);
}
C
${CC:-cc} -Iinclude -o "$T/host" "$T/host.c" -Llib/stubs -Llib \
    -lcuda -lcublas -lcublasLt -lcurand -lnvrtc -lnccl -lcudart
echo "nvcc OK: PTX + sm_90 object for a fp16/bf16 kernel; host link OK" >&2

echo "$SPEC" >"$MARKER"
if [ "${WICK_CUDA_KEEP_WHEELS:-0}" != 1 ]; then
    rm -rf "$WHEELS"
fi
print_env
