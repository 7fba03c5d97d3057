"""Pure-PyTorch references for fused_mlp, used by the tests.

* ``fused_mlp``: the same function as ``mlp_ext.fused_mlp``, built from torch
  ops; autograd differentiates it.
* ``fused_mlp_backward``: the backward equations of the textbook section
  applied by hand (no autograd), returning every gradient.

Both take the hidden-layer dropout as its mask (``dropout_mask``, n x hidden
bool, True = kept) and probability: D = mask / (1 - dropout), H~ = phi(Z) (.) D
replaces H. Without a mask and with dropout > 0, the mask is drawn as the CPU
operator draws it (``bernoulli_(1 - dropout)`` of an n x hidden bool tensor from
the default generator), so that the same seed gives the same mask on CPU.
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


def dropout_factor(mask: Tensor, dropout: float, dtype: torch.dtype) -> Tensor:
    """D = mask / (1 - dropout) in dtype; 0 everywhere for dropout = 1 (all dropped)."""
    scale = 1.0 / (1.0 - dropout) if dropout < 1 else 0.0
    return mask.to(dtype) * scale


def _dropout_d(z: Tensor, dropout_mask: Optional[Tensor], dropout: float) -> Optional[Tensor]:
    """D for the n x hidden hidden layer of z (None: no dropout)."""
    if dropout_mask is None:
        if dropout == 0:
            return None
        n = z.numel() // z.shape[-1] if z.shape[-1] else 0
        dropout_mask = torch.empty(n, z.shape[-1], dtype=torch.bool,
                                   device=z.device).bernoulli_(1 - dropout)
    return dropout_factor(dropout_mask, dropout, z.dtype).reshape(z.shape)


def fused_mlp(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    *,
    activation: str = "relu",
    weight_decay: float = 0.0,
    dropout: float = 0.0,
    dropout_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """o = (phi(x w1^T + b1) (.) D) w2^T + b2 and s = weight_decay/2 (||w1||^2 + ||w2||^2),
    D = dropout_mask / (1 - dropout) (no D without dropout)."""
    z = x @ w1.T
    if b1 is not None:
        z = z + b1
    h = phi(activation)(z)
    d = _dropout_d(z, dropout_mask, dropout)
    if d is not None:
        h = h * d
    o = h @ w2.T
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
    dropout: float = 0.0,
    dropout_mask: Optional[Tensor] = None,
) -> Gradients:
    """Every gradient of J = <grad_o, o> + grad_s * s, from the section's equations
    (with dropout, H~ = H (.) D in place of H, and D applied to G_H):

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
    D = _dropout_d(Z, dropout_mask, dropout)
    if D is not None:
        H = H * D
    dW2 = G_O.T @ H + grad_s * weight_decay * w2
    db2 = G_O.sum(0)
    G_H = G_O @ w2
    if D is not None:
        G_H = G_H * D
    G_Z = G_H * _PHI_DERIVATIVE[activation](Z)
    dW1 = G_Z.T @ X + grad_s * weight_decay * w1
    db1 = G_Z.sum(0)
    dX = (G_Z @ w1).reshape(x.shape)
    return Gradients(dX, dW1, dW2, db1, db2)


# The gated feed-forward block (mlp_ext.gated_mlp).
def gated_mlp(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_gate: Optional[Tensor] = None,
    b_up: Optional[Tensor] = None,
    b_down: Optional[Tensor] = None,
    *,
    activation: str = "silu",
    weight_decay: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """o = (phi(x w_gate^T + b_gate) (.) (x w_up^T + b_up)) w_down^T + b_down and
    s = weight_decay/2 (||w_gate||^2 + ||w_up||^2 + ||w_down||^2), from torch ops."""
    z_gate, z_up = x @ w_gate.T, x @ w_up.T
    if b_gate is not None:
        z_gate = z_gate + b_gate
    if b_up is not None:
        z_up = z_up + b_up
    o = (phi(activation)(z_gate) * z_up) @ w_down.T
    if b_down is not None:
        o = o + b_down
    s = weight_decay / 2 * (w_gate.square().sum() + w_up.square().sum() + w_down.square().sum())
    return o, s


class GatedGradients(NamedTuple):
    x: Tensor
    w_gate: Tensor
    w_up: Tensor
    w_down: Tensor
    b_gate: Tensor
    b_up: Tensor
    b_down: Tensor


def gated_mlp_backward(
    grad_o: Tensor,
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_gate: Optional[Tensor] = None,
    b_up: Optional[Tensor] = None,
    *,
    activation: str = "silu",
    weight_decay: float = 0.0,
    grad_s: Union[float, Tensor] = 1.0,
) -> GatedGradients:
    """Every gradient of J = <grad_o, o> + grad_s * s, by the gated block's equations:

        Z_g = X W_g^T + b_g,  Z_u = X W_u^T + b_u,  H = phi(Z_g) (.) Z_u
        G_H  = G_O W_2
        G_Zg = G_H (.) Z_u (.) phi'(Z_g)      G_Zu = G_H (.) phi(Z_g)
        dW_g = G_Zg^T X + g_s lambda W_g      dW_u = G_Zu^T X + g_s lambda W_u
        dW_2 = G_O^T H + g_s lambda W_2       dX   = G_Zg W_g + G_Zu W_u
        db_g = sum_rows G_Zg, db_u = sum_rows G_Zu, db_2 = sum_rows G_O
    """
    d, q = w_gate.shape[1], w_down.shape[0]
    X = x.reshape(-1, d)
    G_O = grad_o.reshape(-1, q)
    Z_g, Z_u = X @ w_gate.T, X @ w_up.T
    if b_gate is not None:
        Z_g = Z_g + b_gate
    if b_up is not None:
        Z_u = Z_u + b_up
    phi_g = phi(activation)(Z_g)
    H = phi_g * Z_u
    G_H = G_O @ w_down
    G_Zg = G_H * Z_u * _PHI_DERIVATIVE[activation](Z_g)
    G_Zu = G_H * phi_g
    return GatedGradients(
        x=(G_Zg @ w_gate + G_Zu @ w_up).reshape(x.shape),
        w_gate=G_Zg.T @ X + grad_s * weight_decay * w_gate,
        w_up=G_Zu.T @ X + grad_s * weight_decay * w_up,
        w_down=G_O.T @ H + grad_s * weight_decay * w_down,
        b_gate=G_Zg.sum(0),
        b_up=G_Zu.sum(0),
        b_down=G_O.sum(0),
    )
