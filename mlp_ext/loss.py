"""fused_mlp_loss: the section's objective J = L + s in one forward op and one backward op.

The forward op forms the gradient dL/do of the loss along with L (for
cross-entropy softmax(o) - onehot(y)) and keeps it for backward in place of o;
the backward op starts from it. The C++ side is csrc/loss.cpp (the two ops) and
csrc/autograd.cpp (the autograd node); the fake kernels are in _meta.py.
"""
from typing import Optional, Tuple, Union

import torch
from torch import Tensor
from torch.nn import Parameter

from .functional import check_dropout, check_options, check_tensor, op_options, register_dtensor_rules

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
    activation="relu",
    weight_decay: float = 0.0,
    loss: str = "cross_entropy",
    reduction: str = "mean",
    return_output: bool = False,
    save_hidden: bool = True,
    dropout: float = 0.0,
    training: bool = True,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """J = L(o, target) + s for o, s = fused_mlp(x, w1, w2, b1, b2), as one fused operator.

    Args:
        x, w1, w2, b1, b2, activation, weight_decay, save_hidden, dropout,
            training: as for ``mlp_ext.fused_mlp``.
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
    for name, value in (("x", x), ("target", target), ("w1", w1), ("w2", w2)):
        check_tensor("fused_mlp_loss", name, value)
    check_tensor("fused_mlp_loss", "b1", b1, optional=True)
    check_tensor("fused_mlp_loss", "b2", b2, optional=True)
    activation = check_options("fused_mlp_loss", activation, weight_decay, save_hidden,
                               unknown_names_to_op=True)
    check_dropout("fused_mlp_loss", dropout, training)
    for name, value in (("loss", loss), ("reduction", reduction)):
        if not isinstance(value, str):
            raise TypeError(f"fused_mlp_loss: expected {name} to be a str, but got "
                            f"{type(value).__name__}")
    if not isinstance(return_output, bool):
        raise TypeError("fused_mlp_loss: expected return_output to be a bool, but got "
                        f"{type(return_output).__name__}")
    if type(w1) is not Tensor and type(w1) is not Parameter:
        register_dtensor_rules(w1)
    # Only the options that differ from the op's schema defaults (csrc/ops.cpp; the
    # same as fused_mlp's for the four op_options knows): each keyword costs the
    # boxed call ~4-7K instructions (benchmarks/instructions.py).
    options = op_options(activation, float(weight_decay), save_hidden,
                         float(dropout) if training else 0.0)
    if loss != "cross_entropy":
        options["loss"] = loss
    if reduction != "mean":
        options["reduction"] = reduction
    objective, o = _fused_mlp_loss(x, target, w1, w2, b1, b2, **options)
    return (objective, o) if return_output else objective
