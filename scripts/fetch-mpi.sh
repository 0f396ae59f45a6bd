#!/usr/bin/env bash
# Installs OpenMPI and libclang (Debian: libopenmpi-dev openmpi-bin libclang-dev) if missing:
# the `mpi` feature's build (bindgen over mpi.h) and `mpirun` for data-parallel runs and tests.
# Idempotent.
set -euo pipefail
if command -v mpirun >/dev/null && command -v mpicc >/dev/null \
    && ls /usr/lib/*/libclang*.so* /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1; then
    exit 0
fi
echo "installing OpenMPI and libclang (apt: libopenmpi-dev openmpi-bin libclang-dev)" >&2
if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libopenmpi-dev openmpi-bin libclang-dev >/dev/null
