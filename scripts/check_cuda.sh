#!/usr/bin/env bash
# CI's compile check of the CUDA operator on a machine without a GPU: every
# csrc/cuda/*.cu with nvcc for sm_90 and every csrc/cuda/*.cpp with the host
# compiler, with the flags of torch's CUDAExtension, as C++17 and as C++20, then
# a check that the .cpp objects find every kernel they call in the .cu objects
# (details in scripts/check_cuda.py). Fails on any compile error.
# Needs nvcc (CUDA_HOME or PATH) and torch: the set-up of env.sh, which is
# idempotent, provides torch in .venv.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PY" scripts/check_cuda.py "$@"
