"""fused_mlp_loss: the section's objective J = L + s in one forward op and one backward op.

The forward op forms the gradient dL/do of the loss along with L (for
cross-entropy softmax(o) - onehot(y)) and keeps it for backward in place of o;
the backward op starts from it. The C++ side is csrc/mlp_loss.cpp; the fake
kernels below let torch.compile and FakeTensor trace the two ops.
"""
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

LOSSES = ("cross_entropy", "mse")
REDUCTIONS = ("mean", "sum")

_fused_mlp_loss = torch.ops.mlp_ext.fused_mlp_loss.default


def fused_mlp_loss(
    x: Tensor,
    target: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    *,
    activation: str = "relu",
    weight_decay: float = 0.0,
    loss: str = "cross_entropy",
    reduction: str = "mean",
    return_output: bool = False,
    save_hidden: bool = True,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """J = L(o, target) + s for o, s = fused_mlp(x, w1, w2, b1, b2), as one fused operator.

    Args:
        x, w1, w2, b1, b2, activation, weight_decay, save_hidden: as for
            ``mlp_ext.fused_mlp``.
        target: for ``loss="cross_entropy"`` class indices (int64, of shape
            ``x.shape[:-1]``) or class probabilities (x's dtype, of o's shape
            ``(*x.shape[:-1], out_features)``); the classes are o's last
            dimension. For ``loss="mse"`` values of o's shape and dtype.
            target gets no gradient.
        loss: ``"cross_entropy"`` (``F.cross_entropy`` on the rows of o) or
            ``"mse"`` (``F.mse_loss``).
        reduction: ``"mean"`` (over the rows for cross-entropy, over all
            elements for mse, as torch does) or ``"sum"``.
        return_output: also return o (for metrics such as accuracy); o stays
            differentiable.

    Returns:
        The 0-dim J = L + s, or (J, o) with ``return_output=True``.
    """
    objective, o = _fused_mlp_loss(
        x, target, w1, w2, b1, b2, activation=activation, weight_decay=weight_decay,
        loss=loss, reduction=reduction, save_hidden=save_hidden)
    return (objective, o) if return_output else objective


@torch.library.register_fake("mlp_ext::fused_mlp_loss_forward")
def _fused_mlp_loss_forward_fake(x, target, w1, w2, b1, b2, activation, weight_decay, loss,
                                 reduction, keep_gradient):
    torch._check(x.dim() >= 1, lambda: "fused_mlp_loss: expected x with at least 1 dimension")
    torch._check(w1.dim() == 2 and w2.dim() == 2, lambda: "fused_mlp_loss: w1 and w2 must be 2-D")
    torch._check(x.shape[-1] == w1.shape[1], lambda: "fused_mlp_loss: x.shape[-1] != w1.shape[1]")
    torch._check(w2.shape[1] == w1.shape[0], lambda: "fused_mlp_loss: w2.shape[1] != w1.shape[0]")
    torch._check(target.device == x.device,
                 lambda: f"fused_mlp_loss: expected target on the device of x ({x.device}), "
                         f"but got target on {target.device}")
    o_shape = (*x.shape[:-1], w2.shape[0])
    expected = x.shape[:-1] if not target.dtype.is_floating_point else o_shape
    torch._check(tuple(target.shape) == tuple(expected),
                 lambda: f"fused_mlp_loss: expected target of shape {tuple(expected)}, "
                         f"got {tuple(target.shape)}")
    n = 1
    for size in x.shape[:-1]:
        n *= size
    hidden = (n, w1.shape[0])
    dloss_do = x.new_empty((n, w2.shape[0]) if keep_gradient else (0,))
    return (x.new_empty(()), x.new_empty(o_shape), dloss_do,
            x.new_empty(hidden), x.new_empty(hidden))


@torch.library.register_fake("mlp_ext::fused_mlp_loss_backward")
def _fused_mlp_loss_backward_fake(grad_J, grad_o, dloss_do, x, w1, w2, z, h, activation,
                                  weight_decay, output_mask):
    need_dx, need_dw1, need_dw2, need_db1, need_db2 = output_mask
    return (
        x.new_empty(x.shape) if need_dx else None,
        w1.new_empty(w1.shape) if need_dw1 else None,
        w2.new_empty(w2.shape) if need_dw2 else None,
        w1.new_empty((w1.shape[0],)) if need_db1 else None,
        w2.new_empty((w2.shape[0],)) if need_db2 else None,
    )
