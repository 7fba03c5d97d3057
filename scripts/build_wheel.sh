#!/usr/bin/env bash
# Builds mlp_ext's source distribution and, from it, a wheel for the torch of
# .venv (scripts/env.sh: an importable torch, else torch 2.13.0+cpu):
#
#   bash scripts/build_wheel.sh [OUTDIR]      # default dist/
#
# gives OUTDIR/mlp_ext-0.2.0.tar.gz and OUTDIR/mlp_ext-0.2.0+torch2.13cpu-cp310-abi3-linux_x86_64.whl
# (the version of mlp_ext/_version.py, the torch the wheel is for as the local label,
# CPython's stable ABI from torch's minimum Python on). The wheel is built from the
# sdist (python -m build), so a wheel that builds proves the sdist complete. With a
# CUDA torch and a CUDA toolkit the wheel has the CUDA operator too (setup.py:
# MLP_EXT_CUDA; without a visible GPU set TORCH_CUDA_ARCH_LIST, e.g. "8.0;9.0").
# MAX_JOBS: parallel compiles (default: the number of CPUs).
set -euo pipefail
MLP_EXT_SKIP_BUILD=1 source "$(dirname "${BASH_SOURCE[0]}")/env.sh"  # .venv, torch, setuptools
OUTDIR=${1:-$ROOT/dist}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
# From / : in the tree, its build/ directory would be imported as the package `build`.
cd /
"$PY" -c "import build.__main__" 2>/dev/null || pip_install build
rm -f "$OUTDIR"/mlp_ext-*.whl "$OUTDIR"/mlp_ext-*.tar.gz  # one build's files, no older ones
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
start=$SECONDS
# --no-isolation: compile against the torch installed here, not one pip would fetch.
egg_info_existed=$([ -e "$ROOT/mlp_ext.egg-info" ] && echo 1 || true)
"$PY" -m build --no-isolation --skip-dependency-check --outdir "$OUTDIR" "$ROOT"
# The sdist step writes mlp_ext.egg-info (the sdist's plain version) into the tree,
# where importlib.metadata would find it before the installed package's.
[ -n "$egg_info_existed" ] || rm -rf "$ROOT/mlp_ext.egg-info"
echo "build_wheel: $((SECONDS - start)) s, torch $("$PY" -c 'import torch; print(torch.__version__)')"
ls -l "$OUTDIR"/mlp_ext-*
