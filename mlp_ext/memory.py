"""The memory footprint of one fused_mlp call, for training and for prediction.

The textbook section's exercise: training needs more memory than prediction
because backward needs values of the forward. For fused_mlp they are

* the inputs and parameters x, W1, W2 (and b1, read only by second
  derivatives): autograd keeps references to them, which cost no memory of
  their own (they are counted under ``inputs`` and ``parameters``);
* the intermediates Z and H (n x hidden_features each), which the op
  allocates and autograd keeps alive until backward: the ``saved_activations``.
  With ``save_hidden=False`` only Z is kept and backward recomputes H = phi(Z).
* with hidden-layer dropout, its mask (n x hidden bool, one byte per element;
  H is saved with the mask applied).
"""
import math
from typing import NamedTuple, Sequence, Tuple, Union

import torch

from .functional import check_dropout


class SavedTensor(NamedTuple):
    name: str    # the section's symbol: "x", "W1", "W2", "b1", "z", "h", ...
    kind: str    # "input", "parameter" (references) or "activation" (allocated by the op)


def saved_for_backward(*, bias: bool = True, save_hidden: bool = True,
                       loss: bool = False, dropout: bool = False) -> Tuple[SavedTensor, ...]:
    """What the autograd node of fused_mlp (or with ``loss=True`` of
    fused_mlp_loss) saves, in the order it saves them; ``dropout``: whether the
    call drops hidden units (dropout > 0 in training), which adds the mask.

    fused_mlp_loss keeps dL/do (n x q, formed in the forward) instead of o, and
    references to y and b2 for second derivatives.
    """
    saved = [SavedTensor("dL/do", "activation")] if loss else []
    saved += [SavedTensor("x", "input"), SavedTensor("W1", "parameter"),
              SavedTensor("W2", "parameter")]
    if bias:
        saved.append(SavedTensor("b1", "parameter"))  # read by second derivatives only
    saved.append(SavedTensor("z", "activation"))
    if save_hidden:
        saved.append(SavedTensor("h", "activation"))
    if loss:
        saved.append(SavedTensor("y", "input"))
        if bias:
            saved.append(SavedTensor("b2", "parameter"))
    if dropout:
        saved.append(SavedTensor("mask", "activation"))
    return tuple(saved)


class MemoryFootprint(NamedTuple):
    """Bytes of one fused_mlp call (see ``memory_footprint``); ``total`` sums them."""
    parameters: int          # W1, W2 (and b1, b2)
    gradients: int           # .grad of every parameter (training only)
    inputs: int              # x
    saved_activations: int   # Z and H kept by autograd until backward (training only)
    outputs: int             # o and the 0-dim s

    @property
    def total(self) -> int:
        return sum(self)

    def __str__(self) -> str:
        rows = [(name, getattr(self, name)) for name in self._fields] + [("total", self.total)]
        return "\n".join(f"{name:>17}: {_human(size)}" for name, size in rows)


def memory_footprint(
    batch: Union[int, Sequence[int]],
    in_features: int,
    hidden_features: int,
    out_features: int,
    *,
    dtype: torch.dtype = torch.float32,
    bias: bool = True,
    training: bool = True,
    save_hidden: bool = True,
    dropout: float = 0.0,
) -> MemoryFootprint:
    """Bytes that ``fused_mlp`` (or ``FusedMLP``) holds for one batch.

    Args:
        batch: the number of rows n, or the leading shape of x (n is its product).
        in_features, hidden_features, out_features: d, h and q of the section.
        dtype: the dtype of x and of the parameters.
        bias: whether the layers carry biases b1, b2.
        training: True for a training step (every parameter requires grad, the
            autograd node keeps Z and H until backward, gradients are
            allocated); False for prediction (under ``torch.no_grad()``:
            nothing saved, no gradients).
        save_hidden: the ``save_hidden`` argument of ``fused_mlp``; False saves
            Z only (n*h elements fewer), and backward recomputes H.
        dropout: the ``dropout`` of ``fused_mlp``; > 0 (in training) adds the
            mask, n*h bytes.

    Backward additionally allocates, for its duration only, an n x h buffer
    for dJ/dH = dJ/dZ (and another for H when ``save_hidden=False``).
    """
    def is_int(value):
        return isinstance(value, int) and not isinstance(value, bool)

    if not (is_int(batch) or (isinstance(batch, (tuple, list, torch.Size))
                              and all(is_int(b) for b in batch))):
        raise TypeError(f"memory_footprint: expected batch to be an int or a sequence of ints, "
                        f"got {batch!r}")
    n = batch if is_int(batch) else math.prod(batch)
    for name, value in (("in_features", in_features), ("hidden_features", hidden_features),
                        ("out_features", out_features)):
        if not is_int(value):
            raise TypeError(f"memory_footprint: expected {name} to be an int, got {value!r}")
    for name, value in (("batch", batch), ("in_features", in_features),
                        ("hidden_features", hidden_features), ("out_features", out_features)):
        if any(v < 0 for v in (value if isinstance(value, (tuple, list, torch.Size)) else [value])):
            raise ValueError(f"memory_footprint: expected {name} >= 0, got {value!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"memory_footprint: expected a floating torch.dtype, got {dtype!r}")
    for name, value in (("bias", bias), ("training", training), ("save_hidden", save_hidden)):
        if not isinstance(value, bool):
            raise TypeError(f"memory_footprint: expected {name} to be a bool, got {value!r}")
    check_dropout("memory_footprint", dropout)
    size = dtype.itemsize
    d, h, q = in_features, hidden_features, out_features
    parameters = (h * d + q * h + ((h + q) if bias else 0)) * size
    saved = saved_for_backward(bias=bias, save_hidden=save_hidden, dropout=dropout > 0)
    # z and h in dtype; the mask one byte per element (bool).
    activations = sum(n * h * (1 if t.name == "mask" else size) for t in saved
                      if t.kind == "activation")
    return MemoryFootprint(
        parameters=parameters,
        gradients=parameters if training else 0,
        inputs=n * d * size,
        saved_activations=activations if training else 0,
        outputs=(n * q + 1) * size,
    )


def _human(size: int) -> str:
    """1,234,567 B (1.2 MiB)."""
    if size < 1024:
        return f"{size:,} B"
    scaled, unit = (size / 2**20, "MiB") if size >= 2**20 else (size / 2**10, "KiB")
    return f"{size:,} B ({scaled:.1f} {unit})"
