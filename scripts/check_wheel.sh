#!/usr/bin/env bash
# CI's wheel stage: what a user without a compiler gets from `pip install <wheel>`.
#
#   bash scripts/check_wheel.sh
#
# 1. scripts/build_wheel.sh: the sdist, and the wheel built from it, into
#    build/wheel-check/dist/.
# 2. scripts/inspect_dist.py: the wheel holds the package and one _C.abi3.so, no
#    tests, no sources, no path of this machine (the tree, the venv, the sdist's
#    build directory); its version, metadata and build record agree; no torch
#    requirement. The sdist holds every file of csrc/.
# 3. A fresh virtual environment with only torch 2.13.0+cpu (a local wheel or
#    mirror first, PyTorch's CPU index as the fallback, as scripts/env.sh does), then
#    `pip install <wheel>`.
# 4. tests/smoke_installed.py from an empty directory outside the tree, with a bare
#    environment (env -i) and PATH = the venv's bin only: no compiler can be found,
#    nothing of the tree is on sys.path. torch.compile uses the aot_eager backend
#    there (inductor itself needs a C++ compiler on CPU); a second run with the
#    system's PATH compiles with inductor.
# 5. The guard: the venv's torch relabelled as another release (2.12.0+cu126 in
#    torch/version.py), `import mlp_ext` must raise the guard's ImportError naming
#    both torches and the command that fixes it, not an undefined symbol.
# The venv (in a temporary directory) is removed at the end; the dist files stay in
# build/wheel-check/dist (CHECK_WHEEL_DIR moves them).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${CHECK_WHEEL_DIR:-$ROOT/build/wheel-check}
PYTHON=${PYTHON:-python3}
rm -rf "$WORK"
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
# The venv and the smoke test's directory lie outside the tree (the smoke test
# refuses an mlp_ext imported from under it).
SCRATCH=$(mktemp -d -t mlp_ext_check_wheel.XXXXXX)
trap 'rm -rf "$SCRATCH"' EXIT
DIST=$WORK/dist VENV=$SCRATCH/venv RUN=$SCRATCH/run EMPTY=$SCRATCH/no-compilers
t0=$SECONDS

echo "== check_wheel: build (log: $WORK/build.log)"
if ! bash "$ROOT/scripts/build_wheel.sh" "$DIST" > "$WORK/build.log" 2>&1; then
  tail -n 60 "$WORK/build.log"
  echo "check_wheel: FAILED: scripts/build_wheel.sh (log: $WORK/build.log)" >&2
  exit 1
fi
tail -n 3 "$WORK/build.log"
WHEEL=$(ls "$DIST"/mlp_ext-*.whl)
BUILD_PY=${MLP_EXT_VENV:-$ROOT/.venv}/bin/python

echo "== check_wheel: inspect"
# Paths a careless build would leave in the library (__FILE__, debug information):
# the tree, its venv, the torch and Python it compiled with, python -m build's
# temporary copy of the sdist.
forbid=(--forbid "$ROOT" --forbid "build-via-sdist"
        --forbid "$("$BUILD_PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
        --forbid "$("$BUILD_PY" -c 'import sys; print(sys.prefix)')")
"$BUILD_PY" "$ROOT/scripts/inspect_dist.py" "$DIST" --source "$ROOT" "${forbid[@]}"

echo "== check_wheel: a fresh venv with torch only"
"$PYTHON" -m venv "$VENV"
VPY=$VENV/bin/python
pip_install() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }
pip_install "torch==2.13.0+cpu" 2>/dev/null ||
  pip_install "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
echo "check_wheel: pip install $(basename "$WHEEL")"
"$VPY" -m pip install --disable-pip-version-check "$WHEEL"
"$VPY" -m pip list --disable-pip-version-check 2>/dev/null | grep -E "^(torch|mlp_ext) "

echo "== check_wheel: smoke test outside the tree, no compiler on PATH"
mkdir -p "$RUN" "$EMPTY" "$SCRATCH/home"
cp "$ROOT/tests/smoke_installed.py" "$RUN/"
bare=(env -i HOME="$SCRATCH/home" TMPDIR="$RUN" TORCHINDUCTOR_CACHE_DIR="$RUN/inductor")
(cd "$RUN" && "${bare[@]}" PATH="$VENV/bin:$EMPTY" "$VPY" -I smoke_installed.py \
  --source-root "$ROOT" --no-compiler --backend aot_eager)
echo "== check_wheel: torch.compile with inductor (the system's compiler on PATH)"
(cd "$RUN" && "${bare[@]}" PATH="$VENV/bin:/usr/local/bin:/usr/bin:/bin" "$VPY" -I smoke_installed.py \
  --source-root "$ROOT" --backend inductor --activations gelu)

echo "== check_wheel: the same wheel under another torch"
version_py=$("$VPY" -c 'import torch.version as v; print(v.__file__)')
sed -i -e "s/^__version__ = .*/__version__ = '2.12.0+cu126'/" -e "s/^cuda: .*/cuda: Optional[str] = '12.6'/" "$version_py"
set +e
out=$(cd "$RUN" && "${bare[@]}" PATH="$VENV/bin:$EMPTY" "$VPY" -I -c 'import mlp_ext' 2>&1)
rc=$?
set -e
echo "$out" | tail -n 3
expect() {
  case "$out" in *"$1"*) ;; *) echo "check_wheel: FAILED: the import under torch 2.12.0+cu126 did not say '$1' (exit $rc)" >&2; exit 1 ;; esac
}
[ "$rc" -ne 0 ] || { echo "check_wheel: FAILED: mlp_ext imported under a torch it was not built for" >&2; exit 1; }
expect "ImportError: mlp_ext"
expect "built for torch 2.13.0+cpu (CPU)"
expect "torch 2.12.0+cu126 (CUDA 12.6) is installed"
expect "pip install --force-reinstall --no-deps mlp_ext-"
expect "+torch2.12cu126-"
case "$out" in *"undefined symbol:"*|*OSError*) echo "check_wheel: FAILED: the loader's error, not the guard's" >&2; exit 1 ;; esac
echo "check_wheel: passed in $((SECONDS - t0)) s ($(basename "$WHEEL"))"
