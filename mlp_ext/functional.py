"""The functional entry point, fused_mlp, and the argument-type checks of the
Python entry points (the values are checked by the operator itself)."""
import math
import numbers
import sys
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.nn import Parameter

from .activations import ACTIVATIONS, resolve_activation  # noqa: F401  (ACTIVATIONS re-exported)

_fused_mlp = torch.ops.mlp_ext.fused_mlp.default


def op_options(activation: str, weight_decay: float, save_hidden: bool, dropout: float = 0.0,
               default_activation: str = "relu") -> dict:
    """The keyword arguments of a fused_mlp (or gated_mlp: default_activation "silu",
    no dropout) op call: only those that differ from the schema's defaults
    (csrc/ops.cpp). Each keyword the op's Python binding parses against the schema
    costs ~4-7K instructions, a tenth of a small call (benchmarks/instructions.py
    --calls), so the usual call passes none."""
    options = {}
    if activation != default_activation:
        options["activation"] = activation
    if weight_decay != 0.0:
        options["weight_decay"] = weight_decay
    if not save_hidden:
        options["save_hidden"] = False
    if dropout != 0.0:
        options["dropout"] = dropout
    return options


def is_dtensor(t) -> bool:
    """Whether t is a DTensor, without importing torch.distributed (slow to
    import, absent on some builds): a DTensor exists only once it is imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def register_dtensor_rules(t) -> None:
    """Registers the ops' DTensor sharding rules (mlp_ext/_dtensor.py) the first
    time a DTensor reaches an entry point: cheap after the first call."""
    if is_dtensor(t):
        from ._dtensor import register
        register()


def _type_name(value) -> str:
    return type(value).__name__


def check_tensor(op: str, name: str, value, optional: bool = False) -> None:
    """TypeError unless value is a Tensor (or None, where optional)."""
    if not (isinstance(value, Tensor) or (optional and value is None)):
        expected = "a Tensor or None" if optional else "a Tensor"
        raise TypeError(f"{op}: expected {name} to be {expected}, but got {_type_name(value)}")


def check_options(op: str, activation, weight_decay, save_hidden, *,
                  unknown_names_to_op: bool = False) -> str:
    """TypeError for options of the wrong type (the op's schema would otherwise coerce
    True or a one-element tensor to a float silently); returns the canonical name of
    the activation (mlp_ext.activations resolves names, aliases, modules, functions;
    with unknown_names_to_op an unknown name goes to the operator, which rejects it)."""
    activation = resolve_activation(activation, where=op, unknown_names_to_op=unknown_names_to_op)
    if not (type(weight_decay) in (float, int) or (
            isinstance(weight_decay, numbers.Real) and not isinstance(weight_decay, bool))):
        raise TypeError(f"{op}: expected weight_decay to be a real number, but got "
                        f"{_type_name(weight_decay)}")
    if not isinstance(save_hidden, bool):
        raise TypeError(f"{op}: expected save_hidden to be a bool, but got {_type_name(save_hidden)}")
    return activation


def check_module_options(where: str, activation, weight_decay, save_hidden) -> str:
    """check_options, and the operator's ValueError for a weight_decay that is negative or
    not finite: for options stored now and passed to the op later (modules, fuse), so that
    a bad value fails where it is given. Returns the canonical name of the activation."""
    activation = check_options(where, activation, weight_decay, save_hidden)
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"{where}: expected weight_decay to be a finite number >= 0, but got "
                         f"{weight_decay}")
    return activation


def _is_real(value) -> bool:
    return type(value) in (float, int) or (
        isinstance(value, numbers.Real) and not isinstance(value, bool))


def dropout_message(op: str, dropout) -> str:
    """The operator's message for a dropout outside [0, 1] (csrc/mlp.cpp check_dropout)."""
    return f"{op}: expected dropout to be a probability in [0, 1], but got {float(dropout):g}"


def check_dropout(op: str, dropout, training=True) -> None:
    """TypeError for a dropout (or training) of the wrong type, and the operator's own
    ValueError for one outside [0, 1]: checked here too because with training=False the
    operator is called with dropout 0 (F.dropout, likewise, checks p in eval mode)."""
    if not _is_real(dropout):
        raise TypeError(f"{op}: expected dropout to be a real number, but got {_type_name(dropout)}")
    if not isinstance(training, bool):
        raise TypeError(f"{op}: expected training to be a bool, but got {_type_name(training)}")
    if not (0 <= dropout <= 1):  # NaN fails too
        raise ValueError(dropout_message(op, dropout))


def fused_mlp(
    x: Tensor,
    w1: Tensor,
    w2: Tensor,
    b1: Optional[Tensor] = None,
    b2: Optional[Tensor] = None,
    *,
    activation="relu",
    weight_decay: float = 0.0,
    save_hidden: bool = True,
    dropout: float = 0.0,
    training: bool = True,
) -> Tuple[Tensor, Tensor]:
    """One-hidden-layer MLP with weight decay, fused into one operator.

    Args:
        x: input of shape (*, in_features).
        w1: (hidden_features, in_features);  w2: (out_features, hidden_features).
        b1: (hidden_features,) or None;  b2: (out_features,) or None.
        activation: one of ``mlp_ext.ACTIVATIONS``, an alias (torch's, transformers',
            timm's names), or an activation module or function computing one of them
            (``mlp_ext.activations``).
        weight_decay: lambda >= 0 of the L2 term s.
        save_hidden: keep the hidden activations h = phi(z) for backward (the
            default); False keeps z only and recomputes h in backward, saving
            n * hidden_features elements at the cost of one elementwise pass.
        dropout: probability p of zeroing each hidden unit h (inverted dropout
            between phi and the second product, as ``F.dropout(phi(z), p,
            training)``): the kept units are scaled by 1 / (1 - p). The mask is
            drawn from torch's default generator of the device
            (``torch.manual_seed`` reproduces it) and kept for backward as one
            byte per hidden unit.
        training: apply dropout (the default, as ``F.dropout``); False skips it.

    Returns:
        (o, s): o = phi(x w1^T + b1) w2^T + b2 of shape (*, out_features), contiguous,
        and the 0-dim s = weight_decay / 2 * (||w1||^2 + ||w2||^2). Both are
        differentiable; add s to the loss to train with weight decay.
    """
    check_tensor("fused_mlp", "x", x)
    check_tensor("fused_mlp", "w1", w1)
    check_tensor("fused_mlp", "w2", w2)
    check_tensor("fused_mlp", "b1", b1, optional=True)
    check_tensor("fused_mlp", "b2", b2, optional=True)
    activation = check_options("fused_mlp", activation, weight_decay, save_hidden,
                               unknown_names_to_op=True)
    check_dropout("fused_mlp", dropout, training)
    if type(w1) is not Tensor and type(w1) is not Parameter:
        register_dtensor_rules(w1)
    return _fused_mlp(x, w1, w2, b1, b2, **op_options(
        activation, float(weight_decay), save_hidden, float(dropout) if training else 0.0))
