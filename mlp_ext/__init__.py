"""mlp_ext: the one-hidden-layer MLP with weight decay as one fused PyTorch operator.

    o, s = mlp_ext.fused_mlp(x, w1, w2, b1, b2, activation="relu", weight_decay=1e-4)

computes o = phi(x W1^T + b1) W2^T + b2 and s = weight_decay/2 (||W1||^2 + ||W2||^2)
in one operator call and one autograd node. See README.md.
"""
import os as _os

import torch  # noqa: F401  (first: _C links against libtorch/libc10, which torch loads)

from . import _build_check

# The torch this build was compiled for, checked before _C is loaded: under another
# torch, an ImportError naming both and the fix instead of "undefined symbol".
build_info = _build_check.check(_os.path.dirname(_os.path.abspath(__file__)))
__version__ = build_info["version"]  # e.g. "0.2.0+torch2.13cpu", as torch's "2.13.0+cpu"

from . import _C  # noqa: F401  (loads the library that registers torch.ops.mlp_ext)
from . import _meta  # noqa: F401  (fake kernels for torch.compile / FakeTensor)
from . import activations, reference
from .activations import ACTIVATIONS, resolve_activation
from .functional import fused_mlp
from .fuse import FuseReport, NotFusable, fuse, fused_block
from .gated import GatedFusedMLP, gated_mlp
from .loss import fused_mlp_loss
from .memory import MemoryFootprint, memory_footprint
from .modules import FusedMLP
from .penalty import collect_penalty, forward_with_penalty

__all__ = ["ACTIVATIONS", "FuseReport", "FusedMLP", "GatedFusedMLP", "MemoryFootprint", "NotFusable", "activations",
           "build_info", "collect_penalty", "forward_with_penalty", "fuse", "fused_block", "fused_mlp",
           "fused_mlp_loss", "gated_mlp", "memory_footprint", "reference", "resolve_activation"]


def __getattr__(name):
    # mlp_ext.parallel (torch.distributed) is imported on first use, so that
    # `import mlp_ext` works on torch builds without distributed support.
    if name == "parallel":
        import importlib

        return importlib.import_module(".parallel", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
