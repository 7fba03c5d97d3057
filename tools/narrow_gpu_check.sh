#!/usr/bin/env bash
# GPU verification of the fully fused narrow-MLP kernels, in one command, on a
# machine with a CUDA GPU (sm_80+; built for sm_90 unless NARROW_ARCH says otherwise):
#
#   tools/narrow_gpu_check.sh [build] [kernels] [sanitize] [tests] [bench]
#                                               (default: kernels sanitize tests bench)
#
#   build     only build the self-test (build/narrow_selftest; needs nvcc, no GPU)
#   kernels   build tools/narrow_selftest.cu with csrc/cuda/narrow_mlp.cu (no torch) and run
#             it: every dtype, activation, bias on/off, tails, multi-tile blocks, against a
#             float64 host reference; guard bytes; determinism; partial output masks
#   sanitize  the self-test (--quick) under compute-sanitizer memcheck, racecheck,
#             synccheck and initcheck; any report fails the step. racecheck looks only
#             at the project's kernels (namespace mlp_ext), not at the test's scaffolding
#   tests     pytest tests/test_narrow_cuda.py, then the whole suite with
#             MLP_EXT_NARROW=on (needs mlp_ext built with CUDA, importable by $PY)
#   bench     benchmarks/narrow.py $NARROW_BENCH_ARGS (JSON into benchmarks/results/)
#
# The toolkit: $CUDA_HOME, else $CUDA_PATH, else the one nvcc on PATH belongs to
# (through symlinks and wrapper scripts), else /usr/local/cuda; compute-sanitizer:
# $COMPUTE_SANITIZER, PATH, $CUDA_HOME/bin, $CUDA_HOME/compute-sanitizer.
# scripts/gpu_run.sh uses the same lookup and calls the build, kernels and sanitize steps.
#
# Exits non-zero at the first failing step. Logs go to $NARROW_LOGS (default build/narrow).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-${PYTHON:-python3}}
ARCH=${NARROW_ARCH:-sm_90}
LOGS=${NARROW_LOGS:-build/narrow}
mkdir -p "$LOGS"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(kernels sanitize tests bench)
selftest=build/narrow_selftest

source scripts/cuda_toolkit.sh  # cuda_home, find_sanitizer

need_toolkit() {
  if [ -z "${CUDA_HOME:-}" ] || [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    CUDA_HOME=$(cuda_home) || { echo "no CUDA toolkit found (set CUDA_HOME: the directory with bin/nvcc)" >&2; exit 1; }
  fi
  export CUDA_HOME
}

build_selftest() {
  need_toolkit
  # Rebuilt when a source is newer than the binary (narrow_mlp.cu, .cuh, narrow_path.h).
  if [ ! -x "$selftest" ] || [ -n "$(find csrc/activation.h csrc/cuda/narrow_* tools/narrow_selftest.cu -newer "$selftest" -print -quit)" ]; then
    echo "== building $selftest ($ARCH, $CUDA_HOME/bin/nvcc)"
    mkdir -p "$(dirname "$selftest")"
    "$CUDA_HOME/bin/nvcc" -std=c++17 -arch="$ARCH" -O3 -lineinfo -Icsrc -o "$selftest" \
      tools/narrow_selftest.cu csrc/cuda/narrow_mlp.cu
  fi
}

for step in "${steps[@]}"; do
  case "$step" in
    build)
      build_selftest
      ;;
    kernels)
      build_selftest
      echo "== self-test"
      "$selftest" | tee "$LOGS/selftest.log"
      ;;
    sanitize)
      build_selftest
      sanitizer=$(find_sanitizer) || { echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, \$CUDA_HOME/compute-sanitizer)" >&2; exit 1; }
      for tool in memcheck racecheck synccheck initcheck; do
        filter=()
        # Only our kernels (all in namespace mlp_ext, so in their mangled names).
        [ "$tool" = racecheck ] && filter=(--kernel-name kns=mlp_ext)
        echo "== compute-sanitizer --tool $tool ${filter[*]}"
        "$sanitizer" --tool "$tool" "${filter[@]}" --error-exitcode 1 --print-limit 20 "$selftest" --quick \
          > "$LOGS/sanitize-$tool.log" 2>&1 || { tail -n 40 "$LOGS/sanitize-$tool.log"; exit 1; }
        tail -n 2 "$LOGS/sanitize-$tool.log"
      done
      ;;
    tests)
      echo "== pytest tests/test_narrow_cuda.py"
      "$PY" -m pytest -q tests/test_narrow_cuda.py 2>&1 | tee "$LOGS/pytest-narrow.log"
      echo "== pytest tests (MLP_EXT_NARROW=on)"
      MLP_EXT_NARROW=on "$PY" -m pytest -q tests 2>&1 | tee "$LOGS/pytest-all-on.log"
      ;;
    bench)
      echo "== benchmarks/narrow.py ${NARROW_BENCH_ARGS:-}"
      # shellcheck disable=SC2086
      "$PY" benchmarks/narrow.py ${NARROW_BENCH_ARGS:-} 2>&1 | tee "$LOGS/bench.log"
      ;;
    *)
      echo "unknown step '$step' (build, kernels, sanitize, tests, bench)" >&2
      exit 2
      ;;
  esac
done
