# Source me (bash):  source scripts/cuda-env.sh
# Exports the environment for building wick with `--features cuda` / `cuda,nccl` against the
# PyPI-wheel CUDA toolkit that scripts/fetch-cuda.sh assembles. The prefix is $WICK_CUDA_HOME,
# default ../shared/cuda relative to the repo root. Does not download anything; run
# scripts/fetch-cuda.sh first. CUDA_COMPUTE_CAP keeps a value already set (default 90, H100/H200).

_wick_cuda_src=${BASH_SOURCE[0]}
_wick_cuda_repo=$(cd "$(dirname "$_wick_cuda_src")/.." && pwd)
_wick_cuda_prefix=${WICK_CUDA_HOME:-"$_wick_cuda_repo/../shared/cuda"}

if [ ! -x "$_wick_cuda_prefix/bin/nvcc" ]; then
    echo "cuda-env.sh: no nvcc under $_wick_cuda_prefix; run scripts/fetch-cuda.sh first" >&2
    _wick_cuda_rc=1
else
    _wick_cuda_rc=0
    _wick_cuda_prefix=$(cd "$_wick_cuda_prefix" && pwd)
    if [ ! -f "$_wick_cuda_prefix/.wick-cuda-complete" ]; then
        echo "cuda-env.sh: $_wick_cuda_prefix looks incomplete; rerun scripts/fetch-cuda.sh" >&2
    fi
    # major.minor of the toolkit: recorded by fetch-cuda.sh, else asked of nvcc.
    if [ -f "$_wick_cuda_prefix/.wick-cuda-version" ]; then
        _wick_cuda_mm=$(cat "$_wick_cuda_prefix/.wick-cuda-version")
    else
        _wick_cuda_mm=$("$_wick_cuda_prefix/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\.[0-9]*\),.*/\1/p')
    fi
    export CUDA_HOME="$_wick_cuda_prefix"
    export CUDA_PATH="$_wick_cuda_prefix"
    export CUDA_ROOT="$_wick_cuda_prefix"
    case ":$PATH:" in
        *":$_wick_cuda_prefix/bin:"*) ;;
        *) export PATH="$_wick_cuda_prefix/bin:$PATH" ;;
    esac
    export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
    # cudarc wants <major>0<minor>0, e.g. 13.4 -> 13040 (cudarc 0.19.10 knows 11.4 .. 13.4).
    export CUDARC_CUDA_VERSION="${_wick_cuda_mm%%.*}0${_wick_cuda_mm#*.}0"
    # For running binaries on a GPU machine (driver's libcuda.so.1 comes from the system);
    # lib/stubs (link-only libcuda.so) must never be on this path.
    case ":${LD_LIBRARY_PATH:-}:" in
        *":$_wick_cuda_prefix/lib:"*) ;;
        *) export LD_LIBRARY_PATH="$_wick_cuda_prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
    esac
    unset _wick_cuda_mm
fi
unset _wick_cuda_src _wick_cuda_repo _wick_cuda_prefix
return "$_wick_cuda_rc" 2>/dev/null || true
