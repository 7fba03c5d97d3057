"""Fake (meta) kernels of every registered op with tensors, for torch.compile,
torch.export and FakeTensor: fused_mlp_forward / _inference / _backward and
fused_mlp_loss_forward / _backward (the composite fused_mlp and fused_mlp_loss
trace through these).

Each checks its arguments by the rules of the real kernel (csrc/mlp.cpp
check_forward_inputs / check_backward_inputs, csrc/loss.cpp), raising the same
exception type with the same message, so that a bad call fails where it is made,
traced or not (tests/test_errors.py checks that the two agree). They also run
for real tensors mixed with meta tensors (the meta key wins the dispatch): the
device checks make that an error instead of a silently wrong result.
"""
import math

import torch

ACTIVATIONS = tuple(torch.ops.mlp_ext._activation_names())
LOSSES = ("cross_entropy", "mse")
REDUCTIONS = ("mean", "sum")

# How c10 prints a ScalarType, so that the messages match the C++ ones.
_SCALAR_TYPE_NAMES = {
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
    torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
    torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool",
    torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}
_FLOATING = (torch.float32, torch.float64)
_REDUCED = (torch.float16, torch.bfloat16)


def _name(dtype):
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype))


def _sizes(t):
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _quoted(names):
    return ", ".join(f'"{n}"' for n in names)


def _number(value):
    return f"{value:g}"  # as C++ streams a double


def _check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f'fused_mlp: unknown activation "{activation}"; expected one of '
                         f"{_quoted(ACTIVATIONS)}")


def _check_like(op, name, t, reference, reference_name):
    if t.dtype != reference.dtype:
        raise TypeError(f"{op}: expected {name} to have the dtype of {reference_name} "
                        f"({_name(reference.dtype)}), but got {_name(t.dtype)}")
    if t.device != reference.device:
        raise RuntimeError(f"{op}: expected {name} on the device of {reference_name} "
                           f"({reference.device}), but got {name} on {t.device}")


def _check_dropout(op, dropout):
    if not (0 <= dropout <= 1):  # NaN fails too
        raise ValueError(f"{op}: expected dropout to be a probability in [0, 1], but got "
                         f"{_number(dropout)}")


def _check_weight_decay(op, weight_decay):
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"{op}: expected weight_decay to be a finite number >= 0, but got "
                         f"{_number(weight_decay)}")


def _check_x(op, x):
    if x.dim() < 1:
        raise RuntimeError(f"{op}: expected x of shape (*, in_features) with at least 1 "
                           "dimension, but got a 0-dim tensor")
    # Every device's kernels take float32, float64 and the half types.
    if x.dtype not in _FLOATING + _REDUCED:
        raise TypeError(f"{op}: expected x of a floating dtype (float32, float64, float16 or "
                        f"bfloat16), but got {_name(x.dtype)}")


def _check_biases(op, x, biases):
    """biases: (name, bias or None, expected size, what the size is)."""
    for name, b, size, what in biases:
        if b is None:
            continue
        if b.dim() != 1 or b.shape[0] != size:
            raise RuntimeError(f"{op}: expected {name} of shape ({what},) = [{size}], but got "
                               f"{name}.shape = {_sizes(b)}")
        _check_like(op, name, b, x, "x")


def _check_backward_rows(op, grad_o, grad_s, x, n, d, q):
    """x, grad_o and grad_s against the n rows of the saved z."""
    if not (x.dim() >= 1 and x.shape[-1] == d and x.numel() == n * d):
        raise RuntimeError(f"{op}: expected x of {n} rows of in_features = {d}, but got x.shape = "
                           f"{_sizes(x)}")
    if grad_o.numel() != n * q:
        raise RuntimeError(f"{op}: expected grad_o with {n} x {q} elements, but got grad_o.shape = "
                           f"{_sizes(grad_o)}")
    if grad_s is not None and grad_s.numel() != 1:
        raise RuntimeError(f"{op}: expected grad_s with one element, but got grad_s.shape = "
                           f"{_sizes(grad_s)}")


def check_forward_inputs(x, w1, w2, b1, b2, activation, weight_decay, dropout=0.0):
    """csrc/mlp.cpp: parse_activation, then check_forward_inputs."""
    _check_activation(activation)
    _check_weight_decay("fused_mlp", weight_decay)
    _check_dropout("fused_mlp", dropout)
    _check_x("fused_mlp", x)
    if w1.dim() != 2:
        raise RuntimeError("fused_mlp: expected w1 of shape (hidden_features, in_features), but "
                           f"got w1.shape = {_sizes(w1)}")
    if w2.dim() != 2:
        raise RuntimeError("fused_mlp: expected w2 of shape (out_features, hidden_features), but "
                           f"got w2.shape = {_sizes(w2)}")
    if x.shape[-1] != w1.shape[1]:
        raise RuntimeError(f"fused_mlp: x.shape[-1] = {x.shape[-1]} does not match in_features = "
                           f"w1.shape[1] = {w1.shape[1]} (x.shape = {_sizes(x)}, w1.shape = "
                           f"{_sizes(w1)})")
    if w2.shape[1] != w1.shape[0]:
        raise RuntimeError(f"fused_mlp: w2.shape[1] = {w2.shape[1]} does not match "
                           f"hidden_features = w1.shape[0] = {w1.shape[0]} (w1.shape = "
                           f"{_sizes(w1)}, w2.shape = {_sizes(w2)})")
    _check_like("fused_mlp", "w1", w1, x, "x")
    _check_like("fused_mlp", "w2", w2, x, "x")
    _check_biases("fused_mlp", x, (("b1", b1, w1.shape[0], "hidden_features"),
                                   ("b2", b2, w2.shape[0], "out_features")))


def check_backward_inputs(grad_o, grad_s, x, w1, w2, z, h, activation, dropout_mask=None,
                          dropout=0.0):
    """csrc/mlp.cpp: parse_activation, then check_backward_inputs."""
    _check_activation(activation)
    op = "fused_mlp_backward"
    _check_dropout(op, dropout)
    if not (w1.dim() == 2 and w2.dim() == 2 and w2.shape[1] == w1.shape[0]):
        raise RuntimeError(f"{op}: expected w1 of shape (hidden_features, in_features) and w2 of "
                           f"shape (out_features, hidden_features), but got w1.shape = "
                           f"{_sizes(w1)}, w2.shape = {_sizes(w2)}")
    d, hidden, q = w1.shape[1], w1.shape[0], w2.shape[0]
    if not (z.dim() == 2 and z.shape[1] == hidden):
        raise RuntimeError(f"{op}: expected z of shape (batch, hidden_features = {hidden}), but got "
                           f"z.shape = {_sizes(z)}")
    n = z.shape[0]
    if h is not None and h.shape != z.shape:
        raise RuntimeError(f"{op}: expected h of shape {_sizes(z)} (the shape of z), but got "
                           f"h.shape = {_sizes(h)}")
    _check_backward_rows(op, grad_o, grad_s, x, n, d, q)
    if dropout_mask is None and dropout != 0:
        raise RuntimeError(f"{op}: expected dropout_mask (the forward's mask) with dropout = "
                           f"{_number(dropout)}, but got None")
    if dropout_mask is not None:
        if dropout_mask.shape != z.shape:
            raise RuntimeError(f"{op}: expected dropout_mask of shape {_sizes(z)} (the shape of z), "
                               f"but got dropout_mask.shape = {_sizes(dropout_mask)}")
        if dropout_mask.dtype != torch.bool:
            raise TypeError(f"{op}: expected dropout_mask of dtype Bool, but got "
                            f"{_name(dropout_mask.dtype)}")
        if dropout_mask.device != z.device:
            raise RuntimeError(f"{op}: expected dropout_mask on the device of z ({z.device}), but "
                               f"got dropout_mask on {dropout_mask.device}")
    for name, t in (("grad_o", grad_o), ("x", x), ("w1", w1), ("w2", w2), ("h", h)):
        if t is not None:
            _check_like(op, name, t, z, "z")


def check_loss_inputs(x, target, w1, w2, b1, b2, activation, weight_decay, loss, reduction,
                      dropout=0.0):
    """csrc/loss.cpp fused_mlp_loss_forward: the loss's names, the forward's checks, the target."""
    op = "fused_mlp_loss"
    if loss not in LOSSES:
        raise ValueError(f'{op}: unknown loss "{loss}"; expected one of {_quoted(LOSSES)}')
    if reduction not in REDUCTIONS:
        raise ValueError(f'{op}: unknown reduction "{reduction}"; expected one of '
                         f"{_quoted(REDUCTIONS)}")
    check_forward_inputs(x, w1, w2, b1, b2, activation, weight_decay, dropout)
    if target.device != x.device:
        raise RuntimeError(f"{op}: expected target on the device of x ({x.device}), but got "
                           f"target on {target.device}")
    o_shape = [*x.shape[:-1], w2.shape[0]]
    if loss == "cross_entropy" and not target.dtype.is_floating_point:
        if target.dtype != torch.int64:
            raise TypeError(f"{op}: expected target of dtype int64 (class indices) or "
                            f"{_name(x.dtype)} (class probabilities, the dtype of x), but got "
                            f"{_name(target.dtype)}")
        expected = o_shape[:-1]
        if list(target.shape) != expected:
            raise RuntimeError(f"{op}: expected class-index target of shape "
                               f"[{', '.join(map(str, expected))}] (the output's shape without "
                               f"the class dimension), but got target.shape = {_sizes(target)}")
        return
    if target.dtype != x.dtype:
        also = "; or int64 class indices" if loss == "cross_entropy" else ""
        raise TypeError(f"{op}: expected target of dtype {_name(x.dtype)} (the dtype of x{also}), "
                        f"but got {_name(target.dtype)}")
    if list(target.shape) != o_shape:
        what = "class-probability target" if loss == "cross_entropy" else "target"
        raise RuntimeError(f"{op}: expected {what} of shape [{', '.join(map(str, o_shape))}] (the "
                           f"output's shape), but got target.shape = {_sizes(target)}")


def _backward_outputs(x, w1, w2, output_mask):
    need_dx, need_dw1, need_dw2, need_db1, need_db2 = output_mask
    return (
        x.new_empty(x.shape) if need_dx else None,
        w1.new_empty(w1.shape) if need_dw1 else None,
        w2.new_empty(w2.shape) if need_dw2 else None,
        w1.new_empty((w1.shape[0],)) if need_db1 else None,
        w2.new_empty((w2.shape[0],)) if need_db2 else None,
    )


def _dropout_mask(x, n, hidden, dropout):
    """The forward's mask: n x hidden bool with dropout > 0, 0 elements otherwise."""
    return x.new_empty((n, hidden) if dropout > 0 else (0,), dtype=torch.bool)


@torch.library.register_fake("mlp_ext::fused_mlp_forward")
def _fused_mlp_forward_fake(x, w1, w2, b1, b2, activation, weight_decay, dropout=0.0):
    check_forward_inputs(x, w1, w2, b1, b2, activation, weight_decay, dropout)
    n = _prod(x.shape[:-1])
    # new_empty: contiguous whatever the strides of x (empty_like would keep them).
    o = x.new_empty((*x.shape[:-1], w2.shape[0]))
    s = x.new_empty(())
    z = x.new_empty((n, w1.shape[0]))
    h = x.new_empty((n, w1.shape[0]))
    return o, s, z, h, _dropout_mask(x, n, w1.shape[0], dropout)


@torch.library.register_fake("mlp_ext::fused_mlp_inference")
def _fused_mlp_inference_fake(x, w1, w2, b1, b2, activation, weight_decay, dropout=0.0):
    o, s, _, _, _ = _fused_mlp_forward_fake(x, w1, w2, b1, b2, activation, weight_decay, dropout)
    return o, s


@torch.library.register_fake("mlp_ext::fused_mlp_backward")
def _fused_mlp_backward_fake(grad_o, grad_s, x, w1, w2, z, h, activation, weight_decay, output_mask,
                             dropout_mask=None, dropout=0.0):
    check_backward_inputs(grad_o, grad_s, x, w1, w2, z, h, activation, dropout_mask, dropout)
    return _backward_outputs(x, w1, w2, output_mask)


@torch.library.register_fake("mlp_ext::fused_mlp_loss_forward")
def _fused_mlp_loss_forward_fake(x, target, w1, w2, b1, b2, activation, weight_decay, loss,
                                 reduction, keep_gradient, dropout=0.0):
    check_loss_inputs(x, target, w1, w2, b1, b2, activation, weight_decay, loss, reduction,
                      dropout)
    o_shape = (*x.shape[:-1], w2.shape[0])
    n = _prod(x.shape[:-1])
    hidden = (n, w1.shape[0])
    dloss_do = x.new_empty((n, w2.shape[0]) if keep_gradient else (0,))
    return (x.new_empty(()), x.new_empty(o_shape), dloss_do,
            x.new_empty(hidden), x.new_empty(hidden), _dropout_mask(x, n, w1.shape[0], dropout))


@torch.library.register_fake("mlp_ext::fused_mlp_loss_backward")
def _fused_mlp_loss_backward_fake(grad_J, grad_o, dloss_do, x, w1, w2, z, h, activation,
                                  weight_decay, output_mask, dropout_mask=None, dropout=0.0):
    if grad_J is None and grad_o is None:
        raise RuntimeError("fused_mlp_loss_backward: expected grad_J or grad_o, got neither")
    check_backward_inputs(dloss_do, grad_J, x, w1, w2, z, h, activation, dropout_mask, dropout)
    return _backward_outputs(x, w1, w2, output_mask)


def _prod(sizes):
    n = 1
    for size in sizes:
        n *= size
    return n


# The gated ops (csrc/gated.cpp).
def check_gated_forward_inputs(x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation,
                               weight_decay):
    """csrc/gated.cpp: parse_activation, then check_gated_forward_inputs."""
    _check_activation(activation)
    op = "gated_mlp"
    _check_weight_decay(op, weight_decay)
    _check_x(op, x)
    if w_gate.dim() != 2:
        raise RuntimeError(f"{op}: expected w_gate of shape (hidden_features, in_features), but "
                           f"got w_gate.shape = {_sizes(w_gate)}")
    if w_up.shape != w_gate.shape:
        raise RuntimeError(f"{op}: expected w_up of the shape of w_gate {_sizes(w_gate)} "
                           f"(hidden_features, in_features), but got w_up.shape = {_sizes(w_up)}")
    if w_down.dim() != 2:
        raise RuntimeError(f"{op}: expected w_down of shape (out_features, hidden_features), but "
                           f"got w_down.shape = {_sizes(w_down)}")
    if x.shape[-1] != w_gate.shape[1]:
        raise RuntimeError(f"{op}: x.shape[-1] = {x.shape[-1]} does not match in_features = "
                           f"w_gate.shape[1] = {w_gate.shape[1]} (x.shape = {_sizes(x)}, "
                           f"w_gate.shape = {_sizes(w_gate)})")
    if w_down.shape[1] != w_gate.shape[0]:
        raise RuntimeError(f"{op}: w_down.shape[1] = {w_down.shape[1]} does not match "
                           f"hidden_features = w_gate.shape[0] = {w_gate.shape[0]} (w_gate.shape = "
                           f"{_sizes(w_gate)}, w_down.shape = {_sizes(w_down)})")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        _check_like(op, name, w, x, "x")
    _check_biases(op, x, (("b_gate", b_gate, w_gate.shape[0], "hidden_features"),
                          ("b_up", b_up, w_gate.shape[0], "hidden_features"),
                          ("b_down", b_down, w_down.shape[0], "out_features")))


def check_gated_backward_inputs(grad_o, grad_s, x, w_gate, w_up, w_down, z, h, activation):
    """csrc/gated.cpp: parse_activation, then check_gated_backward_inputs."""
    _check_activation(activation)
    op = "gated_mlp_backward"
    if not (w_gate.dim() == 2 and w_up.shape == w_gate.shape and w_down.dim() == 2
            and w_down.shape[1] == w_gate.shape[0]):
        raise RuntimeError(f"{op}: expected w_gate and w_up of shape (hidden_features, in_features) "
                           f"and w_down of shape (out_features, hidden_features), but got "
                           f"w_gate.shape = {_sizes(w_gate)}, w_up.shape = {_sizes(w_up)}, "
                           f"w_down.shape = {_sizes(w_down)}")
    d, hidden, q = w_gate.shape[1], w_gate.shape[0], w_down.shape[0]
    if not (z.dim() == 2 and z.shape[1] == 2 * hidden):
        raise RuntimeError(f"{op}: expected z of shape (batch, 2 * hidden_features = "
                           f"{2 * hidden}), but got z.shape = {_sizes(z)}")
    n = z.shape[0]
    if h is not None and not (h.dim() == 2 and h.shape[0] == n and h.shape[1] == hidden):
        raise RuntimeError(f"{op}: expected h of shape [{n}, {hidden}], but got h.shape = "
                           f"{_sizes(h)}")
    _check_backward_rows(op, grad_o, grad_s, x, n, d, q)
    for name, t in (("grad_o", grad_o), ("x", x), ("w_gate", w_gate), ("w_up", w_up),
                    ("w_down", w_down), ("h", h)):
        if t is not None:
            _check_like(op, name, t, z, "z")


@torch.library.register_fake("mlp_ext::gated_mlp_forward")
def _gated_mlp_forward_fake(x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation,
                            weight_decay):
    check_gated_forward_inputs(x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation,
                               weight_decay)
    n, hidden = _prod(x.shape[:-1]), w_gate.shape[0]
    return (x.new_empty((*x.shape[:-1], w_down.shape[0])), x.new_empty(()),
            x.new_empty((n, 2 * hidden)), x.new_empty((n, hidden)))


@torch.library.register_fake("mlp_ext::gated_mlp_inference")
def _gated_mlp_inference_fake(x, w_gate, w_up, w_down, b_gate, b_up, b_down, activation,
                              weight_decay):
    o, s, _, _ = _gated_mlp_forward_fake(x, w_gate, w_up, w_down, b_gate, b_up, b_down,
                                         activation, weight_decay)
    return o, s


@torch.library.register_fake("mlp_ext::gated_mlp_backward")
def _gated_mlp_backward_fake(grad_o, grad_s, x, w_gate, w_up, w_down, z, h, activation,
                             weight_decay, output_mask):
    check_gated_backward_inputs(grad_o, grad_s, x, w_gate, w_up, w_down, z, h, activation)
    need = output_mask
    hidden, q = w_gate.shape[0], w_down.shape[0]
    return (
        x.new_empty(x.shape) if need[0] else None,
        w_gate.new_empty(w_gate.shape) if need[1] else None,
        w_up.new_empty(w_up.shape) if need[2] else None,
        w_down.new_empty(w_down.shape) if need[3] else None,
        w_gate.new_empty((hidden,)) if need[4] else None,
        w_gate.new_empty((hidden,)) if need[5] else None,
        w_down.new_empty((q,)) if need[6] else None,
    )
