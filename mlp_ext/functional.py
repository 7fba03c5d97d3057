"""The functional entry point, fused_mlp."""
from typing import Optional, Tuple

import torch
from torch import Tensor

# The names the operator takes, from its one list (csrc/activation.h).
ACTIVATIONS = tuple(torch.ops.mlp_ext._activation_names())

_fused_mlp = torch.ops.mlp_ext.fused_mlp.default


def fused_mlp(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    *,
    activation: str = "relu",
    weight_decay: float = 0.0,
    save_hidden: bool = True,
) -> Tuple[Tensor, Tensor]:
    """One-hidden-layer MLP with weight decay, fused into one operator.

    Args:
        x: input of shape (*, in_features).
        w1: (hidden_features, in_features);  w2: (out_features, hidden_features).
        b1: (hidden_features,) or None;  b2: (out_features,) or None.
        activation: one of ``mlp_ext.ACTIVATIONS``.
        weight_decay: lambda >= 0 of the L2 term s.
        save_hidden: keep the hidden activations h = phi(z) for backward (the
            default); False keeps z only and recomputes h in backward, saving
            n * hidden_features elements at the cost of one elementwise pass.

    Returns:
        (o, s): o = phi(x w1^T + b1) w2^T + b2 of shape (*, out_features), contiguous,
        and the 0-dim s = weight_decay / 2 * (||w1||^2 + ||w2||^2). Both are
        differentiable; add s to the loss to train with weight decay.
    """
    return _fused_mlp(x, w1, w2, b1, b2, activation=activation, weight_decay=weight_decay,
                      save_hidden=save_hidden)
