#!/usr/bin/env bash
# CI's sanitizer stage: the CPU operator built with AddressSanitizer and
# UndefinedBehaviorSanitizer (scripts/sanitize_build.py, into build/asan/, never
# over mlp_ext/_C*.so), then the bad-input tests (test_errors.py), the shape and
# layout tests (test_shapes.py) and the property tests (test_properties.py, when
# present, with hypothesis's "ci" profile) against that build. Any ASan report
# (out-of-bounds access, use after free, ...) or UBSan report fails the stage.
# Extra arguments go to pytest. MLP_EXT_ASAN_DIR chooses the build directory.
#
# Two passes. First on ATen's DEFAULT instruction set: the AVX2 and AVX-512
# Vectorized types of torch read and write a row's last partial vector with
# masked load/store intrinsics, which GCC's ASan does not instrument (a read
# past the end there goes unseen), while the DEFAULT type uses memcpy, which
# ASan checks byte by byte. Then on the CPU's own instruction set (full-width
# vector accesses are instrumented), with test_properties.py's runs of every
# GEMM path and instruction set in fresh interpreters, which the first pass
# leaves out (under ATEN_CPU_CAPABILITY=default they would skip AVX2/AVX-512).
#
# Environment of the tests, and why:
#   LD_PRELOAD   libasan, then libstdc++. Python is not instrumented, so the
#                ASan runtime must be preloaded (it must come first among the
#                libraries). libstdc++: ASan's __cxa_throw interceptor looks the
#                real one up when the runtime starts, before anything loads
#                libstdc++; without it the first C++ exception (TORCH_CHECK ->
#                Python exception) aborts: `CHECK failed ... real___cxa_throw`.
#   ASAN_OPTIONS detect_leaks=0: CPython and torch keep allocations until exit.
#                log_path: reports go to files, one per process (pytest
#                captures the tests' stderr, and a process that ASan stops never
#                prints what pytest captured); printed below.
#   UBSAN_OPTIONS print_stacktrace=1, halt_on_error=1 (the build also has
#                -fno-sanitize-recover=undefined), log_path as above.
#   PYTHONPATH   build/asan/lib first, so that `import mlp_ext` loads this build
#                (checked below, in the process that runs pytest).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"  # .venv, torch, tools; cd to the repository
OUT=${MLP_EXT_ASAN_DIR:-$ROOT/build/asan}
mkdir -p "$OUT"

start=$SECONDS
if ! "$PY" scripts/sanitize_build.py "$OUT" >"$OUT/build.log" 2>&1; then
  tail -n 60 "$OUT/build.log"
  echo "sanitize: the ASan/UBSan build failed (log: $OUT/build.log)" >&2
  exit 1
fi
grep '^sanitize_build:' "$OUT/build.log" || true
echo "sanitize: build $((SECONDS - start)) s"

CXX=${CXX:-c++}
runtime() {  # the compiler's copy of a runtime library, resolved, or fail
  local f
  f=$("$CXX" -print-file-name="$1")
  [ -f "$f" ] || { echo "sanitize: $CXX has no $1 (got '$f')" >&2; exit 1; }
  readlink -f "$f"
}
REPORTS=$OUT/reports
rm -rf "$REPORTS" && mkdir -p "$REPORTS"
export LD_PRELOAD="$(runtime libasan.so) $(runtime libstdc++.so.6)${LD_PRELOAD:+ $LD_PRELOAD}"
export ASAN_OPTIONS=detect_leaks=0:log_path=$REPORTS/asan${ASAN_OPTIONS:+:$ASAN_OPTIONS}
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$REPORTS/ubsan${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}
export PYTHONPATH="$OUT/lib${PYTHONPATH:+:$PYTHONPATH}"
echo "sanitize: LD_PRELOAD=$LD_PRELOAD"
echo "sanitize: ASAN_OPTIONS=$ASAN_OPTIONS"
echo "sanitize: UBSAN_OPTIONS=$UBSAN_OPTIONS"

tests=(tests/test_errors.py tests/test_shapes.py)
if [ -f tests/test_properties.py ]; then
  tests+=(tests/test_properties.py --hypothesis-profile=ci)
fi
# (a --deselect that matches nothing is no error)
SUBPROCESS_RUNS=tests/test_properties.py::test_every_gemm_path_and_instruction_set

# One pytest run. The working directory (which holds the normal mlp_ext) is
# taken off sys.path; mlp_ext is imported before pytest, in the same process,
# and refused unless it is the sanitized build. (test_properties.py's
# subprocesses run in the directory above the imported mlp_ext: $OUT/lib.)
run_pytest() {
  rm -f "$OUT/current-test"
  "$PY" - "$OUT/lib" "$OUT/current-test" "$@" <<'EOF'
import os, sys
if sys.path and sys.path[0] in ("", os.getcwd()):
    del sys.path[0]
lib, current = os.path.realpath(sys.argv[1]), sys.argv[2]
import mlp_ext
so = os.path.realpath(mlp_ext._C.__file__)
print(f"sanitize: mlp_ext._C = {so}", flush=True)
if not so.startswith(lib + os.sep):
    sys.exit(f"sanitize: mlp_ext was not imported from the sanitized build in {lib}")
import pytest


class LastTest:  # names the test a sanitizer stopped the process in
    def pytest_runtest_logstart(self, nodeid, location):
        with open(current, "w") as f:
            f.write(nodeid + "\n")


sys.exit(pytest.main(sys.argv[3:], plugins=[LastTest()]))
EOF
}

# Prints the sanitizer logs (each report's top, where the memory was, its
# summary); fails when one holds a report.
check_reports() {
  local logs f
  shopt -s nullglob
  logs=("$REPORTS"/*)
  shopt -u nullglob
  for f in "${logs[@]:0:5}"; do
    echo "---- $f"
    awk 'NR <= 20 || /is located/ { print; next } /SUMMARY:/ { print; n = 0; next }
         /(allocated|freed) by thread/ { print; n = 6; next } n > 0 { print; n-- }' "$f"
  done
  [ ${#logs[@]} -le 5 ] || echo "sanitize: ${#logs[@]} sanitizer logs in $REPORTS, 5 shown"
  if grep -q -E "ERROR: AddressSanitizer|runtime error:" "${logs[@]}" /dev/null; then
    [ -f "$OUT/current-test" ] && echo "sanitize: last test started in the pytest process: $(cat "$OUT/current-test")"
    echo "sanitize: FAILED: AddressSanitizer / UBSan reported an error (logs above and in $REPORTS)" >&2
    exit 1
  fi
}

# pass NAME CAPABILITY PYTEST-ARGS...: CAPABILITY empty = the CPU's own.
pass() {
  local name=$1 capability=$2 rc=0 t0=$SECONDS
  shift 2
  echo "sanitize: pass '$name' (ATEN_CPU_CAPABILITY=${capability:-unset})"
  if [ -n "$capability" ]; then
    ATEN_CPU_CAPABILITY=$capability run_pytest "$@" || rc=$?
  else
    (unset ATEN_CPU_CAPABILITY; run_pytest "$@") || rc=$?
  fi
  echo "sanitize: pass '$name': $((SECONDS - t0)) s, pytest status $rc"
  check_reports
  [ "$rc" -eq 0 ] || { echo "sanitize: FAILED in pass '$name'" >&2; exit "$rc"; }
}

start=$SECONDS
pass default default "${tests[@]}" --deselect "$SUBPROCESS_RUNS" "$@"
pass native "" "${tests[@]}" "$@"
echo "sanitize: tests $((SECONDS - start)) s; passed, no sanitizer report"
