"""Fake (meta) kernels of every registered op with tensors, for torch.compile and
FakeTensor: fused_mlp_forward / _inference / _backward and fused_mlp_loss_forward /
_backward (the composite fused_mlp and fused_mlp_loss trace through these).

They compute output shapes only; the real kernels (csrc/) check arguments.
"""
import torch


@torch.library.register_fake("mlp_ext::fused_mlp_forward")
def _fused_mlp_forward_fake(x, w1, w2, b1, b2, activation, weight_decay):
    torch._check(x.dim() >= 1, lambda: "fused_mlp: expected x with at least 1 dimension")
    torch._check(w1.dim() == 2 and w2.dim() == 2, lambda: "fused_mlp: w1 and w2 must be 2-D")
    torch._check(x.shape[-1] == w1.shape[1], lambda: "fused_mlp: x.shape[-1] != w1.shape[1]")
    torch._check(w2.shape[1] == w1.shape[0], lambda: "fused_mlp: w2.shape[1] != w1.shape[0]")
    n = _prod(x.shape[:-1])
    # new_empty: contiguous whatever the strides of x (empty_like would keep them).
    o = x.new_empty((*x.shape[:-1], w2.shape[0]))
    s = x.new_empty(())
    z = x.new_empty((n, w1.shape[0]))
    h = x.new_empty((n, w1.shape[0]))
    return o, s, z, h


@torch.library.register_fake("mlp_ext::fused_mlp_inference")
def _fused_mlp_inference_fake(x, w1, w2, b1, b2, activation, weight_decay):
    o, s, _, _ = _fused_mlp_forward_fake(x, w1, w2, b1, b2, activation, weight_decay)
    return o, s


@torch.library.register_fake("mlp_ext::fused_mlp_backward")
def _fused_mlp_backward_fake(grad_o, grad_s, x, w1, w2, z, h, activation, weight_decay, output_mask):
    need_dx, need_dw1, need_dw2, need_db1, need_db2 = output_mask
    return (
        x.new_empty(x.shape) if need_dx else None,
        w1.new_empty(w1.shape) if need_dw1 else None,
        w2.new_empty(w2.shape) if need_dw2 else None,
        w1.new_empty((w1.shape[0],)) if need_db1 else None,
        w2.new_empty((w2.shape[0],)) if need_db2 else None,
    )


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
    n = _prod(x.shape[:-1])
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


def _prod(sizes):
    n = 1
    for size in sizes:
        n *= size
    return n
