"""Pure-PyTorch references for fused_mlp, used by the tests.

* ``fused_mlp``: the same function as ``mlp_ext.fused_mlp``, built from torch
  ops; autograd differentiates it.
* ``fused_mlp_backward``: the backward equations of the textbook section
  applied by hand (no autograd), returning every gradient.
"""
import math
from typing import NamedTuple, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

_PHI = {
    "identity": lambda z: z,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "gelu": lambda z: F.gelu(z, approximate="none"),
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "quick_gelu": lambda z: z * torch.sigmoid(1.702 * z),
}


def _gelu_tanh_derivative(z: Tensor) -> Tensor:
    beta, kappa = math.sqrt(2 / math.pi), 0.044715
    t = torch.tanh(beta * (z + kappa * z**3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t**2) * beta * (1 + 3 * kappa * z**2)


# phi'(z), written out by hand.
_PHI_DERIVATIVE = {
    "identity": lambda z: torch.ones_like(z),
    "relu": lambda z: (~(z <= 0)).to(z.dtype),  # torch's convention: 1 at NaN
    "sigmoid": lambda z: torch.sigmoid(z) * (1 - torch.sigmoid(z)),
    "tanh": lambda z: 1 - torch.tanh(z) ** 2,
    "gelu": lambda z: 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    + z * torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi),
    "gelu_tanh": _gelu_tanh_derivative,
    "silu": lambda z: torch.sigmoid(z) * (1 + z * (1 - torch.sigmoid(z))),
    "quick_gelu": lambda z: torch.sigmoid(1.702 * z) * (1 + 1.702 * z * (1 - torch.sigmoid(1.702 * z))),
}


def phi(name: str):
    """The activation phi called `name`, as a torch function."""
    if name not in _PHI:
        raise ValueError(f"unknown activation {name!r}; expected one of {tuple(_PHI)}")
    return _PHI[name]


def fused_mlp(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    *,
    activation: str = "relu",
    weight_decay: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """o = phi(x w1^T + b1) w2^T + b2 and s = weight_decay/2 (||w1||^2 + ||w2||^2)."""
    z = x @ w1.T
    if b1 is not None:
        z = z + b1
    o = phi(activation)(z) @ w2.T
    if b2 is not None:
        o = o + b2
    s = weight_decay / 2 * (w1.square().sum() + w2.square().sum())
    return o, s


class Gradients(NamedTuple):
    x: Tensor
    w1: Tensor
    w2: Tensor
    b1: Tensor
    b2: Tensor


def fused_mlp_backward(
    grad_o: Tensor,
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Optional[Tensor] = None,
    *,
    activation: str = "relu",
    weight_decay: float = 0.0,
    grad_s: Union[float, Tensor] = 1.0,
) -> Gradients:
    """Every gradient of J = <grad_o, o> + grad_s * s, from the section's equations.

        Z = X W1^T + b1,  H = phi(Z)
        dW2 = G_O^T H + g_s lambda W2      db2 = sum_rows G_O
        G_H = G_O W2,     G_Z = G_H (.) phi'(Z)
        dW1 = G_Z^T X + g_s lambda W1      db1 = sum_rows G_Z
        dX  = G_Z W1
    """
    d, q = w1.shape[1], w2.shape[0]
    X = x.reshape(-1, d)
    G_O = grad_o.reshape(-1, q)
    Z = X @ w1.T
    if b1 is not None:
        Z = Z + b1
    H = phi(activation)(Z)
    dW2 = G_O.T @ H + grad_s * weight_decay * w2
    db2 = G_O.sum(0)
    G_H = G_O @ w2
    G_Z = G_H * _PHI_DERIVATIVE[activation](Z)
    dW1 = G_Z.T @ X + grad_s * weight_decay * w1
    db1 = G_Z.sum(0)
    dX = (G_Z @ w1).reshape(x.shape)
    return Gradients(dX, dW1, dW2, db1, db2)
