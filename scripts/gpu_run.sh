#!/usr/bin/env bash
# The GPU verification in one command, for a fresh machine with one H100/H200, a
# CUDA build of torch and nvcc, and no network (nothing is installed):
#
#   OUT=/path/for/results bash scripts/gpu_run.sh            # every stage
#   OUT=... bash scripts/gpu_run.sh tests bench              # only some stages
#
# Stages; a step that fails does not stop the later ones:
#   build     python setup.py build_ext --inplace (TORCH_CUDA_ARCH_LIST=9.0, MLP_EXT_CUDA=1,
#             MAX_JOBS=nproc), then a check that the CUDA and AutocastCUDA kernels are
#             registered; the narrow self-test (tools/narrow_selftest.cu, nvcc, no torch)
#             builds beside it. Without a CUDA device, the rehearsal: scripts/check_cuda.py
#             (nvcc compile check of every csrc/cuda/*.cu for sm_90, and the kernels on its
#             CPU emulation; 3-4 minutes on 2 cores) and the self-test build (GPU_RUN_NVCC=0
#             skips both).
#   tests     tests/test_cuda.py first (the fast signal), then the CUDA cases of the rest of
#             the suite (pytest -k cuda; test_narrow_cuda.py is the narrow stage's)
#   narrow    the self-test (tools/narrow_gpu_check.sh kernels), then
#             MLP_EXT_NARROW=on pytest tests/test_narrow_cuda.py
#   sanitize  compute-sanitizer: memcheck on scripts/cuda_sanitize_case.py (GEMM path and
#             narrow path), racecheck on it restricted to the project's kernels
#             (kns=mlp_ext: not cuBLAS, not ATen), and memcheck, racecheck, synccheck,
#             initcheck on the self-test --quick. These run in the background, niced, from
#             the end of the build while tests and narrow run (the GPU is nearly idle under
#             a sanitizer, and 8 minutes do not hold them one after the other); the bench
#             waits for them, so that it has the GPU to itself.
#   bench     benchmarks/benchmark.py --device cuda: the default shapes in float32 and
#             bfloat16, relu, against nn.Linear eager and (two of the shapes) torch.compile;
#             benchmarks/narrow.py: 262144x64x64x64 on the narrow path, the GEMM path and
#             nn.Linear, merged into the same files: benchmarks/results/cuda-<gpu>.{json,md,png}
#   wheel     the CUDA wheel: pip wheel --no-build-isolation in the tree (ninja finds the
#             build stage's objects up to date: a link and the packing), scripts/inspect_dist.py
#             on it (one _C.abi3.so, no tests, no path of the tree), installed with pip
#             --target outside the tree, tests/smoke_installed.py --device cuda from an empty
#             directory. Runs on the time the other stages leave (skipped when too little);
#             `bash scripts/gpu_run.sh build wheel` runs it alone.
#   summary   environment, every step passed/FAILED/skipped with its seconds, pytest counts
#             and failures, sanitizer summaries, the benchmark tables
#
# What comes back in $OUT (flat, few files): summary.txt, gpu_run.log (everything printed,
# written as it goes), junit.xml (every pytest run), cuda-<gpu>.json/.md/.png.
#
# Time: everything fits in GPU_RUN_SECONDS (default 480). Each step runs under
# `timeout` (SIGINT first: pytest and the benchmarks still write what they have) with
# a cap, cut further so that the later stages keep a reserve; caps and reserves are
# seconds of the default budget, scaled to GPU_RUN_SECONDS. A step with less than
# 15 s left is reported as not run. Exit status 0 when no step failed (skips for
# want of a CUDA device do not count as failures).
#
# Settings: OUT, GPU_RUN_SECONDS, GPU_RUN_NVCC (0: no nvcc rehearsal without a GPU),
# GPU_RUN_WORK (per-step logs, emptied first; default build/gpu_run), GPU_RUN_COMMIT (the
# commit to report where the tree has no .git), PYTHON, MAX_JOBS, CUDA_HOME (found from
# nvcc or /usr/local/cuda when unset).
set -uo pipefail  # no -e: a failing step must not stop the later ones
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
ROOT=$PWD
OUT=${OUT:-$ROOT/gpu_results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Per-step logs and junit files stay here (not in $OUT, which keeps a few files).
WORK=${GPU_RUN_WORK:-$ROOT/build/gpu_run}
rm -rf "$WORK"
mkdir -p "$WORK"
START=$SECONDS
BUDGET=${GPU_RUN_SECONDS:-480}
DEADLINE=$((START + BUDGET))

# Everything printed also goes to $OUT/gpu_run.log, so that a run cut short still
# leaves its log.
: > "$OUT/gpu_run.log"
exec 3>&1 4>&2
exec > >(tee -a "$OUT/gpu_run.log") 2>&1
TEE_PID=$!

STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(build tests narrow sanitize bench wheel)
for s in "${STAGES[@]}"; do
  case "$s" in build|tests|narrow|sanitize|bench|wheel) ;;
    *) echo "gpu_run: unknown stage '$s' (build, tests, narrow, sanitize, bench, wheel)"; exit 2 ;;
  esac
done
want() { local s; for s in "${STAGES[@]}"; do [ "$s" = "$1" ] && return 0; done; return 1; }

# Python: $PYTHON, else scripts/env.sh's .venv where there is one (this checkout's
# CI machine), else python3 (the GPU machine's, with its CUDA torch).
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then
  PY=$ROOT/.venv/bin/python
else
  PY=$(command -v python3 || command -v python)
fi
# The in-place build is importable from every script and test, installed or not.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

source scripts/cuda_toolkit.sh  # cuda_home, find_sanitizer
if CUDA_HOME=$(cuda_home); then
  export CUDA_HOME
  export PATH="$CUDA_HOME/bin:$PATH"
else
  unset CUDA_HOME
fi
COMPUTE_SANITIZER=$(find_sanitizer || true)
export COMPUTE_SANITIZER NARROW_LOGS=$WORK/narrow PY  # for tools/narrow_gpu_check.sh
SELFTEST=build/narrow_selftest

# ---------------------------------------------------------------- environment
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  # GPU_RUN_COMMIT: for a copy of the tree without its .git.
  if [ -n "${GPU_RUN_COMMIT:-}" ]; then
    commit="$GPU_RUN_COMMIT (given)"
  elif commit=$(git rev-parse --short=12 HEAD 2>/dev/null); then
    git diff --quiet HEAD 2>/dev/null || commit+=" (with uncommitted changes)"
  else
    commit="unknown (not a git checkout)"
  fi
  echo "commit: $commit"
  echo "host: $(uname -n), $(nproc) CPUs"
  echo "python: $PY"
  "$PY" -c '
import sys
print("python version:", sys.version.split()[0])
try:
    import torch
except Exception as e:
    print("torch: NOT IMPORTABLE:", e)
    sys.exit(0)
print("torch:", torch.__version__, "| CUDA (torch):", torch.version.cuda)
if torch.cuda.is_available() and torch.cuda.device_count() > 0:
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}")
    print(f"device details: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s)")
else:
    print("device: none")'
  echo "CUDA_HOME: ${CUDA_HOME:-not found}"
  [ -n "${CUDA_HOME:-}" ] && echo "nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -n 2 | head -n 1)"
  echo "compute-sanitizer: ${COMPUTE_SANITIZER:-not found}"
  command -v nvidia-smi >/dev/null &&
    echo "nvidia-smi: $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | head -n 1)"
  echo "budget: ${BUDGET}s (GPU_RUN_SECONDS); stages: ${STAGES[*]}"
} > "$WORK/environment.txt" 2>&1
cat "$WORK/environment.txt"
DEVICE=$(sed -n 's/^device: //p' "$WORK/environment.txt")
HAS_GPU=0
[ -n "$DEVICE" ] && [ "$DEVICE" != none ] && HAS_GPU=1
# cuda-<slug of the GPU's name>, as benchmarks/benchmark.py names its files.
STEM=cuda-$(printf '%s' "$DEVICE" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')

# ---------------------------------------------------------------- step helpers
# One line per step in $WORK/steps.tsv: stage, step, status, seconds.
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$WORK/steps.tsv"; }
status_of() {  # exit code, limit -> status text
  case "$1" in
    0) echo passed ;;
    124|137) echo "FAILED: timed out after ${2}s" ;;
    *) echo "FAILED (exit $1)" ;;
  esac
}
skip() { record "$1" "$2" "skipped: $3" 0; echo "== $1/$2 skipped: $3"; }
not_run() { record "$1" "$2" "FAILED: $3" 0; echo "== $1/$2 NOT RUN: $3"; }

# Seconds a step may use: CAP, or what is left before the deadline less RESERVE
# (kept for the stages after it); both in seconds of the default 480 s budget,
# scaled to GPU_RUN_SECONDS. Fails when not even 15 s would be left.
budget() {
  local cap=$(($1 * BUDGET / 480)) left=$((DEADLINE - SECONDS - $2 * BUDGET / 480))
  [ "$left" -lt "$cap" ] && cap=$left
  [ "$cap" -ge 15 ] && echo "$cap"
}
# What the later stages keep (default-budget seconds): the bench, narrow, tests.
R_BENCH=110 R_NARROW=45 R_TESTS=60

# step STAGE NAME CAP RESERVE CMD...: runs CMD under timeout; output to the console
# and $WORK/STAGE-NAME.log. Returns CMD's exit code.
step() {
  local stage=$1 name=$2 limit t0=$SECONDS rc
  if ! limit=$(budget "$3" "$4"); then
    not_run "$stage" "$name" "not run, out of time (GPU_RUN_SECONDS=$BUDGET)"
    return 1
  fi
  shift 4
  echo "== $stage/$name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee "$WORK/$stage-$name.log"
  rc=${PIPESTATUS[0]}
  record "$stage" "$name" "$(status_of "$rc" "$limit")" $((SECONDS - t0))
  echo "== $stage/$name: $(status_of "$rc" "$limit") in $((SECONDS - t0))s"
  return "$rc"
}

# Background steps (the sanitizers): start_job STAGE NAME LIMIT CMD... runs CMD
# niced under timeout, output to $WORK/STAGE-NAME.log; finish_jobs waits for every
# job, prints the end of its log and records it.
JOBS=()
start_job() {
  local stage=$1 name=$2 limit=$3; shift 3
  echo "== $stage/$name started in the background (limit ${limit}s): $*"
  (
    t0=$SECONDS
    # TERM: a background job of a non-interactive shell ignores SIGINT.
    nice -n 5 timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$WORK/$stage-$name.log" 2>&1
    echo "$? $((SECONDS - t0)) $limit" > "$WORK/$stage-$name.rc"
  ) &
  JOBS+=("$stage/$name:$!")
}
finish_jobs() {
  local job stage name pid rc seconds limit
  for job in "${JOBS[@]}"; do
    stage=${job%%/*}; name=${job#*/}; name=${name%%:*}; pid=${job##*:}
    wait "$pid"
    rc=1 seconds='?' limit='?'
    [ -f "$WORK/$stage-$name.rc" ] && read -r rc seconds limit < "$WORK/$stage-$name.rc"
    echo "== $stage/$name: $(status_of "$rc" "$limit") in ${seconds}s; the end of its log:"
    tail -n 12 "$WORK/$stage-$name.log"
    record "$stage" "$name" "$(status_of "$rc" "$limit")" "$seconds"
  done
  JOBS=()
}

# pytest as every run here calls it (a junit XML per run: --junitxml=$WORK/junit-<run>.xml).
PYTEST=("$PY" -m pytest -q -rfE --tb=short -p no:cacheprovider --durations=5)

# ---------------------------------------------------------------- build
if want build; then
  if [ "$HAS_GPU" = 1 ]; then
    # The self-test compiles beside the extension: its nvcc runs while ninja waits
    # on the longest .cu. Checked (and rebuilt if that failed) below.
    if [ -n "${CUDA_HOME:-}" ]; then
      bash tools/narrow_gpu_check.sh build > "$WORK/narrow-selftest-build-background.log" 2>&1 &
      SELFTEST_BUILD_PID=$!
    fi
    step build extension 240 $((R_TESTS + R_NARROW + R_BENCH)) env TORCH_CUDA_ARCH_LIST=9.0 \
      MLP_EXT_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py build_ext --inplace
    step build kernels-registered 60 $((R_TESTS + R_NARROW + R_BENCH)) "$PY" -c '
import torch, mlp_ext
has = torch._C._dispatch_has_kernel_for_dispatch_key
for op in ("fused_mlp_forward", "fused_mlp_inference", "fused_mlp_backward"):
    assert has(f"mlp_ext::{op}", "CUDA"), f"no CUDA kernel for mlp_ext::{op}"
assert has("mlp_ext::fused_mlp", "AutocastCUDA"), "no AutocastCUDA kernel for mlp_ext::fused_mlp"
print("CUDA and AutocastCUDA kernels registered")'
  else
    skip build extension "no CUDA device (the CPU build is scripts/test.sh's)"
    if [ -z "${CUDA_HOME:-}" ]; then
      skip build nvcc-check "no CUDA toolkit (nvcc) found"
    elif [ "${GPU_RUN_NVCC:-1}" = 0 ]; then
      skip build nvcc-check "GPU_RUN_NVCC=0"
    else
      # The rehearsal of the build: every .cu through nvcc for sm_90 with the
      # extension's flags (scripts/check_cuda.sh without its set-up step).
      step build nvcc-check 480 30 "$PY" scripts/check_cuda.py
    fi
  fi
fi

# The self-test binary, for narrow and sanitize: built in the background above, or
# now; when it is up to date this step costs nothing.
if want narrow || want sanitize; then
  [ -n "${SELFTEST_BUILD_PID:-}" ] && wait "$SELFTEST_BUILD_PID"
  if [ -z "${CUDA_HOME:-}" ]; then
    skip narrow selftest-build "no CUDA toolkit (nvcc) found"
  elif [ "$HAS_GPU" != 1 ] && [ "${GPU_RUN_NVCC:-1}" = 0 ]; then
    skip narrow selftest-build "GPU_RUN_NVCC=0"
  else
    [ -f "$WORK/narrow-selftest-build-background.log" ] && cat "$WORK/narrow-selftest-build-background.log"
    step narrow selftest-build 120 $((R_TESTS + R_NARROW + R_BENCH)) bash tools/narrow_gpu_check.sh build
  fi
fi

# ---------------------------------------------------------------- sanitize (background)
SANITIZE_STEPS=(memcheck-case racecheck-case memcheck-selftest racecheck-selftest
                synccheck-selftest initcheck-selftest)
if want sanitize; then
  if [ "$HAS_GPU" != 1 ]; then
    for name in "${SANITIZE_STEPS[@]}"; do skip sanitize "$name" "no CUDA device"; done
  elif [ -z "$COMPUTE_SANITIZER" ]; then
    for name in "${SANITIZE_STEPS[@]}"; do
      not_run sanitize "$name" "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, \$CUDA_HOME/compute-sanitizer)"
    done
  elif ! limit=$(budget 200 "$R_BENCH"); then
    for name in "${SANITIZE_STEPS[@]}"; do not_run sanitize "$name" "not run, out of time"; done
  else
    cs=("$COMPUTE_SANITIZER" --error-exitcode 1 --print-limit 20)
    # Our kernels are all in namespace mlp_ext, so the substring is in their names;
    # racecheck over cuBLAS and ATen would be slow and not ours to fix.
    ours=(--kernel-name kns=mlp_ext)
    # memcheck: one cudaMalloc per tensor, so that an access past a tensor's end is caught.
    start_job sanitize memcheck-case "$limit" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "${cs[@]}" --tool memcheck "$PY" scripts/cuda_sanitize_case.py
    start_job sanitize racecheck-case "$limit" "${cs[@]}" --tool racecheck "${ours[@]}" \
      "$PY" scripts/cuda_sanitize_case.py
    for tool in memcheck racecheck synccheck initcheck; do
      if [ ! -x "$SELFTEST" ]; then
        not_run sanitize "$tool-selftest" "no self-test binary (see narrow/selftest-build)"
        continue
      fi
      filter=()
      [ "$tool" = racecheck ] && filter=("${ours[@]}")
      start_job sanitize "$tool-selftest" "$limit" "${cs[@]}" --tool "$tool" "${filter[@]}" \
        "$SELFTEST" --quick
    done
  fi
fi

# ---------------------------------------------------------------- tests
if want tests; then
  if [ "$HAS_GPU" = 1 ]; then
    step tests test_cuda 120 $((30 + R_NARROW + R_BENCH)) "${PYTEST[@]}" \
      --junitxml="$WORK/junit-test_cuda.xml" tests/test_cuda.py
    step tests cuda-cases 200 $((R_NARROW + R_BENCH)) "${PYTEST[@]}" \
      --junitxml="$WORK/junit-cuda-cases.xml" tests -k cuda \
      --ignore=tests/test_cuda.py --ignore=tests/test_narrow_cuda.py
  else
    skip tests test_cuda "no CUDA device"
    skip tests cuda-cases "no CUDA device"
  fi
fi

# ---------------------------------------------------------------- narrow
if want narrow; then
  if [ "$HAS_GPU" = 1 ]; then
    step narrow selftest 60 $((25 + R_BENCH)) bash tools/narrow_gpu_check.sh kernels
    step narrow pytest 90 "$R_BENCH" env MLP_EXT_NARROW=on "${PYTEST[@]}" \
      --junitxml="$WORK/junit-narrow.xml" tests/test_narrow_cuda.py
  else
    skip narrow selftest "no CUDA device"
    skip narrow pytest "no CUDA device"
  fi
fi

# The sanitizers end (or are cut at their limit) before the bench takes the GPU.
if [ ${#JOBS[@]} -gt 0 ]; then
  echo "== sanitize: waiting for ${#JOBS[@]} background checks"
  finish_jobs
fi

# ---------------------------------------------------------------- bench
if want bench; then
  if [ "$HAS_GPU" = 1 ]; then
    # No mix of two runs in the files: what a failed step would not overwrite goes first.
    rm -f "benchmarks/results/$STEM.json" "benchmarks/results/$STEM.md" "benchmarks/results/$STEM.png"
    # Compilation is the slow part (two graphs per compiled case): torch.compile on the
    # smallest launch-bound shape and the largest, in both dtypes (8 graphs).
    step bench benchmark 200 30 "$PY" benchmarks/benchmark.py --device cuda \
      --dtype float32,bfloat16 --activation relu \
      --compile-shapes 64x64x64x64,4096x1024x1024x1024 \
      --rounds 7 --block-seconds 0.02 --stem "$STEM" --out benchmarks/results
    # Width 64 at batch 2^18 through the narrow path, the GEMM path and nn.Linear
    # (torch.compile off: it is timed above).
    step bench narrow 60 5 "$PY" benchmarks/narrow.py --dtypes float16 bfloat16 float32 \
      --widths 64 --batches 18 --no-compile --rounds 10 --out "$WORK/narrow-bench.json" \
      --merge-into "benchmarks/results/$STEM.json"
    for ext in json md png; do
      [ -f "benchmarks/results/$STEM.$ext" ] && cp "benchmarks/results/$STEM.$ext" "$OUT/"
    done
  else
    skip bench benchmark "no CUDA device"
    skip bench narrow "no CUDA device"
  fi
fi

# ---------------------------------------------------------------- wheel
if want wheel; then
  if [ "$HAS_GPU" != 1 ]; then
    skip wheel build "no CUDA device (CI's scripts/check_wheel.sh builds and checks the CPU wheel)"
    skip wheel smoke "no CUDA device"
  elif ! budget 60 0 >/dev/null; then
    skip wheel build "out of time (it runs on what the other stages leave; stages 'build wheel' run it)"
    skip wheel smoke "out of time"
  else
    rm -rf "$WORK/wheel" && mkdir -p "$WORK/wheel"
    # The build stage's settings, so that ninja's commands are the same and nothing recompiles.
    if step wheel build 150 0 env TORCH_CUDA_ARCH_LIST=9.0 MLP_EXT_CUDA=1 \
        MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip wheel --no-build-isolation --no-deps \
        --no-index --disable-pip-version-check -w "$WORK/wheel" .; then
      # Installed into a directory of its own (the machine's torch stays; nothing else is
      # installed), imported from an empty directory with the tree off sys.path.
      step wheel smoke 120 0 env -u PYTHONPATH PY="$PY" ROOT="$ROOT" W="$WORK/wheel" bash -c '
        set -e
        wheel=$(ls "$W"/mlp_ext-*.whl)
        echo "wheel: $(basename "$wheel"), $(du -h "$wheel" | cut -f1)"
        "$PY" scripts/inspect_dist.py "$W" --wheel-only --forbid "$ROOT"
        T=$(mktemp -d -t mlp_ext_wheel.XXXXXX) && trap "rm -rf $T" EXIT  # outside the tree
        "$PY" -m pip install --no-deps --no-index --disable-pip-version-check -q --target "$T/site" "$wheel"
        cp tests/smoke_installed.py "$T/" && cd "$T"
        PYTHONPATH="$T/site" "$PY" smoke_installed.py --source-root "$ROOT" --device cuda'
    else
      skip wheel smoke "no wheel (see wheel/build)"
    fi
  fi
fi

# ---------------------------------------------------------------- summary
"$PY" - "$WORK" "$OUT" "$STEM" "$((SECONDS - START))" "$BUDGET" <<'EOF' | tee "$OUT/summary.txt"
"""The summary: environment, steps, pytest counts and failures (from the junit
files, merged into OUT/junit.xml), sanitizer summaries, the benchmark tables."""
import glob
import os
import re
import sys
import xml.etree.ElementTree as ET

work, out, stem, elapsed, budget = sys.argv[1:6]
print(f"================ gpu_run summary: {elapsed}s of {budget}s; results in {out}")
with open(os.path.join(work, "environment.txt")) as f:
    print(f.read().rstrip())

steps = []
if os.path.exists(os.path.join(work, "steps.tsv")):
    with open(os.path.join(work, "steps.tsv")) as f:
        steps = [line.rstrip("\n").split("\t") for line in f if line.strip()]
# In stage order (the sanitizers run in the background and are recorded last).
order = ["build", "tests", "narrow", "sanitize", "bench", "wheel"]
steps.sort(key=lambda s: order.index(s[0]) if s[0] in order else len(order))
print("\nsteps:")
for stage, name, status, seconds in steps:
    print(f"  {stage + '/' + name:30} {status:48} {seconds:>4}s")
failed = [s for s in steps if s[2].startswith("FAILED")]
skipped = [s for s in steps if s[2].startswith("skipped")]
print(f"  => {len(steps) - len(failed) - len(skipped)} passed, {len(failed)} failed, "
      f"{len(skipped)} skipped")

merged = ET.Element("testsuites")
junits = sorted(glob.glob(os.path.join(work, "junit-*.xml")), key=os.path.getmtime)  # run order
if junits:
    print("\npytest:")
for path in junits:
    run = os.path.basename(path)[len("junit-"):-len(".xml")]
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        print(f"  {run}: junit XML unreadable ({e})")
        continue
    for suite in ([root] if root.tag == "testsuite" else root.findall("testsuite")):
        suite.set("name", run)
        merged.append(suite)
        n = int(suite.get("tests", 0))
        fail, err, skip = (int(suite.get(k, 0)) for k in ("failures", "errors", "skipped"))
        print(f"  {run:12} {n:4} tests: {n - fail - err - skip} passed, {fail} failed, "
              f"{err} errors, {skip} skipped in {float(suite.get('time', 0)):.0f}s")
        bad = []
        for case in suite.iter("testcase"):
            problem = case.find("failure") if case.find("failure") is not None else case.find("error")
            if problem is not None:
                message = (problem.get("message") or "").strip().splitlines()
                bad.append((f"{case.get('classname')}::{case.get('name')}",
                            message[0][:140] if message else ""))
        for name, message in bad[:12]:
            print(f"    FAILED {name}: {message}")
        if len(bad) > 12:
            # Many failures mostly share a cause: the commonest messages.
            counts = {}
            for _, message in bad:
                counts[message] = counts.get(message, 0) + 1
            print(f"    ... and {len(bad) - 12} more (junit.xml); commonest messages:")
            for message, count in sorted(counts.items(), key=lambda kv: -kv[1])[:4]:
                print(f"      {count:4}x {message}")
if junits:
    ET.ElementTree(merged).write(os.path.join(out, "junit.xml"), encoding="utf-8",
                                 xml_declaration=True)

# In the order of the steps table: the case first, then the self-test, tool by tool.
sanitizer_logs = [os.path.join(work, f"sanitize-{tool}-{target}.log")
                  for target in ("case", "selftest")
                  for tool in ("memcheck", "racecheck", "synccheck", "initcheck")]
sanitizer_logs = [p for p in sanitizer_logs if os.path.exists(p)]
if sanitizer_logs:
    print("\ncompute-sanitizer:")
for path in sanitizer_logs:
    with open(path, errors="replace") as f:
        text = f.read()
    lines = re.findall(r"(?:ERROR|RACECHECK) SUMMARY:.*", text)
    name = os.path.basename(path)[len("sanitize-"):-len(".log")]
    print(f"  {name:20} {lines[-1] if lines else 'no summary line (see gpu_run.log)'}")

table = os.path.join(out, f"{stem}.md")
if os.path.exists(table):
    print(f"\nbenchmark ({stem}.md):\n")
    with open(table) as f:
        print(f.read().rstrip())
print(f"\ngpu_run: {'FAILED' if failed else 'passed'} "
      f"({', '.join(s[0] + '/' + s[1] for s in failed) if failed else 'every step that ran'})")
EOF

failed=0
grep -q $'\tFAILED' "$WORK/steps.tsv" 2>/dev/null && failed=1
# Let tee finish writing the log before exiting.
exec 1>&3 2>&4 3>&- 4>&-
wait "$TEE_PID" 2>/dev/null
exit "$failed"
