# Set-up shared by the README's two commands (sourced by test.sh and benchmark.sh).
# Idempotent: a local virtual environment (.venv), torch in it (an importable
# torch is reused; otherwise the CPU build of torch 2.13.0, never a CUDA
# download), the project's tools, and the build of the operator.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${MLP_EXT_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}
TORCH_CPU="torch==2.13.0+cpu"

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    # The venv sees the interpreter's packages, so its torch (CUDA or not) is kept.
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "mlp_ext: installing the CPU build of torch 2.13.0 into $VENV" >&2
  # A local wheel or mirror first; then PyTorch's CPU index beside the default
  # one (PyPI's Linux torch is the multi-GB CUDA build).
  pip_install "$TORCH_CPU" 2>/dev/null ||
    pip_install "$TORCH_CPU" --extra-index-url https://download.pytorch.org/whl/cpu
fi

# Tools; none of them depends on torch, so none can replace the one above.
"$PY" -c "import ninja, pytest, hypothesis, numpy, matplotlib, tqdm, sklearn, graphviz" 2>/dev/null ||
  pip_install ninja pytest hypothesis numpy matplotlib tqdm scikit-learn graphviz setuptools wheel

# Hugging Face transformers for tests/test_fuse_libraries.py (mlp_ext.fuse on CLIP, SigLIP, OPT).
# It does not depend on torch, so it cannot replace the one above. (timm is not installed:
# it needs torchvision, whose PyPI Linux wheel for torch 2.13 is a CUDA build that does not
# import next to the CPU torch; see that test file.)
"$PY" -c "import transformers" 2>/dev/null || pip_install transformers

# Graphviz's `dot` draws `python -m mlp_ext.graph` (tests/test_graph.py); installed only when missing.
if ! command -v dot >/dev/null 2>&1; then
  echo "mlp_ext: installing graphviz (dot)" >&2
  SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
  $SUDO apt-get install -y -q --no-install-recommends graphviz >/dev/null 2>&1 ||
    { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends graphviz >/dev/null; }
fi

# (Re)build when a source is newer than the built library (or the import fails:
# no build, or one for another torch). MLP_EXT_SKIP_BUILD=1: set-up only
# (scripts/build_wheel.sh builds its own).
so=$(ls "$ROOT"/mlp_ext/_C*.so 2>/dev/null | head -n 1 || true)
if [ "${MLP_EXT_SKIP_BUILD:-0}" = 1 ]; then
  :
elif [ -z "$so" ] || [ -n "$(find "$ROOT/csrc" "$ROOT/setup.py" "$ROOT/mlp_ext/_version.py" -newer "$so" -print -quit)" ] ||
  ! (cd "$ROOT" && "$PY" -c "import mlp_ext" 2>/dev/null); then
  echo "mlp_ext: building the operator" >&2
  (cd "$ROOT" && pip_install --no-build-isolation -e .)
fi
cd "$ROOT"
