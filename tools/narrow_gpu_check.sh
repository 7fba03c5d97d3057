#!/usr/bin/env bash
# GPU verification of the fully fused narrow-MLP kernels, in one command, on a
# machine with a CUDA GPU (sm_80+; built for sm_90 unless NARROW_ARCH says otherwise):
#
#   tools/narrow_gpu_check.sh [kernels] [sanitize] [tests] [bench]   (default: all four)
#
#   kernels   build tools/narrow_selftest.cu with csrc/cuda/narrow_mlp.cu (no torch) and run
#             it: every dtype, activation, bias on/off, tails, multi-tile blocks, against a
#             float64 host reference; guard bytes; determinism; partial output masks
#   sanitize  the self-test (--quick) under compute-sanitizer memcheck, racecheck,
#             synccheck and initcheck; any report fails the step
#   tests     pytest tests/test_narrow_cuda.py, then the whole suite with
#             MLP_EXT_NARROW=on (needs mlp_ext built with CUDA, importable by $PY)
#   bench     benchmarks/narrow.py $NARROW_BENCH_ARGS (JSON into benchmarks/results/)
#
# Exits non-zero at the first failing step. Logs go to $NARROW_LOGS (default build/narrow).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-python3}
ARCH=${NARROW_ARCH:-sm_90}
LOGS=${NARROW_LOGS:-build/narrow}
mkdir -p "$LOGS"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(kernels sanitize tests bench)
selftest=build/narrow_selftest

build_selftest() {
  if [ ! -x "$selftest" ] || [ -n "$(find csrc/activation.h csrc/cuda/narrow_mlp.c* tools/narrow_selftest.cu -newer "$selftest" -print -quit)" ]; then
    echo "== building $selftest ($ARCH)"
    nvcc -std=c++17 -arch="$ARCH" -O3 -lineinfo -Icsrc -o "$selftest" \
      tools/narrow_selftest.cu csrc/cuda/narrow_mlp.cu
  fi
}

for step in "${steps[@]}"; do
  case "$step" in
    kernels)
      build_selftest
      echo "== self-test"
      "$selftest" | tee "$LOGS/selftest.log"
      ;;
    sanitize)
      build_selftest
      for tool in memcheck racecheck synccheck initcheck; do
        echo "== compute-sanitizer --tool $tool"
        compute-sanitizer --tool "$tool" --error-exitcode 1 "$selftest" --quick \
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
      echo "unknown step '$step' (kernels, sanitize, tests, bench)" >&2
      exit 2
      ;;
  esac
done
