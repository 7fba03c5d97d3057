"""mlp_ext: the one-hidden-layer MLP with weight decay as one fused PyTorch operator.

    o, s = mlp_ext.fused_mlp(x, w1, w2, b1, b2, activation="relu", weight_decay=1e-4)

computes o = phi(x W1^T + b1) W2^T + b2 and s = weight_decay/2 (||W1||^2 + ||W2||^2)
in one operator call and one autograd node. See README.md.
"""
import torch  # noqa: F401  (first: _C links against libtorch/libc10, which torch loads)

from . import _C  # noqa: F401  (loads the library that registers torch.ops.mlp_ext)
from . import _meta  # noqa: F401  (fake kernels for torch.compile / FakeTensor)
from . import activations, reference
from .activations import ACTIVATIONS, resolve_activation
from .functional import fused_mlp
from .fuse import FuseReport, NotFusable, fuse, fused_block
from .loss import fused_mlp_loss
from .memory import MemoryFootprint, memory_footprint
from .modules import FusedMLP
from .penalty import collect_penalty, forward_with_penalty

__all__ = ["ACTIVATIONS", "FuseReport", "FusedMLP", "MemoryFootprint", "NotFusable", "activations",
           "collect_penalty", "forward_with_penalty", "fuse", "fused_block", "fused_mlp",
           "fused_mlp_loss", "memory_footprint", "reference", "resolve_activation"]
__version__ = "0.1.0"


def __getattr__(name):
    # mlp_ext.parallel (torch.distributed) is imported on first use, so that
    # `import mlp_ext` works on torch builds without distributed support.
    if name == "parallel":
        import importlib

        return importlib.import_module(".parallel", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
