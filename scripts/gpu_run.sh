#!/usr/bin/env bash
# The GPU verification in one command, for a machine with an H100/H200 and a
# CUDA build of torch (no network needed):
#
#   OUT=/path/for/results bash scripts/gpu_run.sh            # every stage
#   OUT=... bash scripts/gpu_run.sh test bench               # only some stages
#
# Stages, in order (each logs to $OUT/<stage>.log):
#   build     the CUDA operator in place (TORCH_CUDA_ARCH_LIST=9.0, MLP_EXT_CUDA=1)
#   test      the whole pytest suite (CPU and CUDA), junit XML in $OUT/pytest.xml
#   sanitize  compute-sanitizer memcheck and racecheck on scripts/cuda_sanitize_case.py
#   bench     benchmarks/benchmark.py --device cuda on the issue's target shapes
# then a summary, also in $OUT/summary.txt. Everything fits in GPU_RUN_SECONDS
# (default 570): each stage gets at most what is left. Exit status: 0 when every
# stage that ran passed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/gpu_results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}
# The toolkit for the build: torch takes CUDA_HOME from `which nvcc`, which is
# wrong when nvcc on PATH is a wrapper script outside the toolkit.
if [ -z "${CUDA_HOME:-}" ]; then
  nvcc_path=$(command -v nvcc || true)
  for candidate in "${CUDA_PATH:-}" "${nvcc_path:+$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")}" \
                   /usr/local/cuda; do
    if [ -n "$candidate" ] && [ -f "$candidate/include/cuda_runtime.h" ] && [ -x "$candidate/bin/nvcc" ]; then
      export CUDA_HOME=$candidate
      break
    fi
  done
fi
START=$SECONDS
DEADLINE=$((START + ${GPU_RUN_SECONDS:-570}))
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build test sanitize bench)
SUMMARY=()

want() { local s; for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }
# Seconds a stage may use: its cap, or what is left before the deadline (minus
# `reserve` for the stages after it).
budget() {
  local cap=$1 reserve=${2:-0} left=$((DEADLINE - SECONDS - ${2:-0}))
  [ "$left" -lt "$cap" ] && cap=$left
  [ "$cap" -lt 10 ] && cap=10
  echo "$cap"
}
# run_stage NAME SECONDS CMD...: runs CMD with a time limit, output to $OUT/NAME.log.
run_stage() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  echo "== $name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  local status="passed"
  [ "$rc" -ne 0 ] && status="FAILED (exit $rc)"
  [ "$rc" -eq 124 ] && status="TIMED OUT after ${limit}s"
  SUMMARY+=("$(printf '%-10s %-28s %4ss' "$name" "$status" $((SECONDS - t0)))")
  return "$rc"
}
skip() { SUMMARY+=("$(printf '%-10s %s' "$1" "SKIPPED: $2")"); echo "== $1 skipped: $2"; }

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda); print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")'
  echo "CUDA_HOME=${CUDA_HOME:-unset}"
  [ -n "${CUDA_HOME:-}" ] && "$CUDA_HOME/bin/nvcc" --version | tail -n 2
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null
} 2>&1 | tee "$OUT/environment.txt"

failed=0
if want build; then
  export TORCH_CUDA_ARCH_LIST=9.0 MLP_EXT_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
  run_stage build "$(budget 240 300)" "$PY" setup.py build_ext --inplace || failed=1
  run_stage has_cuda_kernels 60 "$PY" -c '
import torch, mlp_ext
for op in ("fused_mlp_forward", "fused_mlp_backward"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"mlp_ext::{op}", "CUDA"), op
assert torch._C._dispatch_has_kernel_for_dispatch_key("mlp_ext::fused_mlp", "AutocastCUDA")
print("CUDA and AutocastCUDA kernels registered")' || failed=1
fi

if want test; then
  run_stage test "$(budget 330 150)" "$PY" -m pytest tests -q -rfEs --durations=15 \
    --junitxml="$OUT/pytest.xml" || failed=1
fi

if want sanitize; then
  sanitizer=$(command -v compute-sanitizer || true)
  for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
                   "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
    if [ -z "$sanitizer" ] && [ -x "$candidate" ]; then
      sanitizer=$candidate
    fi
  done
  if [ -z "$sanitizer" ]; then
    skip sanitize "compute-sanitizer not found (PATH, \$CUDA_HOME)"; failed=1
  else
    # One cudaMalloc per tensor, so that an access past a tensor's end is caught.
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    for tool in memcheck racecheck; do
      run_stage "$tool" "$(budget 120 90)" "$sanitizer" --tool "$tool" --error-exitcode 1 \
        "$PY" scripts/cuda_sanitize_case.py || failed=1
    done
    unset PYTORCH_NO_CUDA_MEMORY_CACHING
  fi
fi

if want bench; then
  if [ ! -f benchmarks/benchmark.py ]; then
    skip bench "benchmarks/benchmark.py is not in this checkout"; failed=1
  else
    # The issue's targets: small float32 shapes, then (8192,1024,1024,1024) and
    # (65536,4096,4096,4096) in bfloat16.
    run_stage bench_small "$(budget 150 60)" "$PY" benchmarks/benchmark.py --device cuda \
      --out "$OUT/benchmark_small" --dtype float32 --activation relu \
      --shapes 1x16x16x16,64x64x64x64,32x784x256x10,256x784x256x10,4096x256x256x256 || failed=1
    run_stage bench_large "$(budget 150 10)" "$PY" benchmarks/benchmark.py --device cuda \
      --out "$OUT/benchmark_large" --dtype bfloat16 --activation relu \
      --shapes 8192x1024x1024x1024,65536x4096x4096x4096 || failed=1
  fi
fi

{
  echo
  echo "================ gpu_run summary ($((SECONDS - START))s, results in $OUT)"
  grep -E '^(torch|device|commit)' "$OUT/environment.txt"
  printf '%s\n' "${SUMMARY[@]}"
  [ -f "$OUT/test.log" ] && { echo "pytest:"; grep -E '^(FAILED|ERROR)|[0-9]+ (passed|failed)' "$OUT/test.log" | tail -n 25; }
  for tool in memcheck racecheck; do
    [ -f "$OUT/$tool.log" ] && echo "$tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/$tool.log" | tail -n 1)"
  done
  for table in "$OUT"/benchmark_*/*.md; do
    [ -f "$table" ] && { echo "benchmark ($table):"; cat "$table"; }
  done
} 2>&1 | tee "$OUT/summary.txt"
exit "$failed"
