"""Input shapes and layouts: (d,), (n, d), (*, d), empty batch, h = 1, strided inputs, NaN/Inf."""
import pytest
import torch

import mlp_ext
from mlp_ext import reference

from conftest import make_inputs


def _check_against_reference(inputs, activation="gelu", weight_decay=0.2):
    o, s = mlp_ext.fused_mlp(*inputs, activation=activation, weight_decay=weight_decay)
    o_ref, s_ref = reference.fused_mlp(*inputs, activation=activation, weight_decay=weight_decay)
    assert o.shape == o_ref.shape and o.is_contiguous()
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)
    params = [t for t in inputs if t is not None and t.requires_grad]
    if o.numel() and params:
        g = torch.randn_like(o)
        for a, b in zip(torch.autograd.grad((o, s), params, (g, None)),
                        torch.autograd.grad((o_ref, s_ref), params, (g, None))):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b)
    return o


@pytest.mark.parametrize("batch_shape", [(), (1,), (7,), (2, 3), (2, 1, 3)])
def test_leading_shapes(device, batch_shape):
    inputs = make_inputs(batch_shape=batch_shape, device=device)
    o = _check_against_reference(inputs)
    assert o.shape == (*batch_shape, 3)


@pytest.mark.parametrize("batch_shape", [(0,), (0, 3), (2, 0)])
def test_empty_batch(device, batch_shape):
    x, w1, w2, b1, b2 = make_inputs(batch_shape=batch_shape, device=device)
    o, s = mlp_ext.fused_mlp(x, w1, w2, b1, b2, weight_decay=0.1)
    assert o.shape == (*batch_shape, 3)
    (o.sum() + s).backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(w1.grad, 0.1 * w1.detach())  # only the decay term
    assert torch.count_nonzero(b1.grad) == 0


@pytest.mark.parametrize("widths", [(1, 1, 1), (4, 1, 3), (1, 5, 1), (3, 33, 2), (17, 257, 9)])
def test_narrow_and_odd_widths(device, activation, widths):
    d, h, q = widths
    _check_against_reference(make_inputs(n=11, d=d, h=h, q=q, device=device), activation)


def test_strided_and_transposed_inputs(device):
    x, w1, w2, b1, b2 = make_inputs(n=6, d=5, h=7, q=4, device=device, requires_grad=False)
    x_t = x.T.contiguous().T.requires_grad_()              # column-major x
    w1_t = w1.T.contiguous().T.requires_grad_()            # column-major w1
    w2_slice = torch.randn(4, 14, dtype=x.dtype, device=device)[:, ::2].requires_grad_()
    b1_slice = torch.randn(14, dtype=x.dtype, device=device)[::2].requires_grad_()
    x_expanded = torch.randn(1, 5, dtype=x.dtype, device=device).expand(6, 5).requires_grad_()
    assert not x_t.is_contiguous() and not w1_t.is_contiguous()
    assert not w2_slice.is_contiguous() and not b1_slice.is_contiguous()
    _check_against_reference((x_t, w1_t, w2_slice, b1_slice, b2.requires_grad_()))
    _check_against_reference((x_expanded, w1.requires_grad_(), w2, None, None))


def test_non_contiguous_upstream_gradient(device):
    """o.sum() hands backward an expanded (stride 0) gradient."""
    inputs = make_inputs(batch_shape=(3, 4), device=device)
    o, _ = mlp_ext.fused_mlp(*inputs, activation="silu")
    o_ref, _ = reference.fused_mlp(*inputs, activation="silu")
    params = [t for t in inputs if t is not None]
    for a, b in zip(torch.autograd.grad(o.sum(), params), torch.autograd.grad(o_ref.sum(), params)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("special", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_propagate_like_the_reference(device, activation, special):
    x, w1, w2, b1, b2 = make_inputs(n=4, device=device, requires_grad=False)
    x[1, 2] = special
    b1[3] = special
    for t in (x, w1, w2, b1, b2):
        t.requires_grad_()
    o, s = mlp_ext.fused_mlp(x, w1, w2, b1, b2, activation=activation)
    o_ref, s_ref = reference.fused_mlp(x, w1, w2, b1, b2, activation=activation)
    torch.testing.assert_close(o, o_ref, equal_nan=True)
    g = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad(o, (x, w1, w2, b1, b2), g),
                    torch.autograd.grad(o_ref, (x, w1, w2, b1, b2), g)):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_relu_keeps_nan(device):
    """fmax(nan, 0) would give 0; torch.relu(nan) is nan, and so is ours."""
    x = torch.tensor([[float("nan")]], dtype=torch.float32, device=device)
    one = torch.ones(1, 1, dtype=torch.float32, device=device)
    o, _ = mlp_ext.fused_mlp(x, one, one, activation="relu")
    assert torch.isnan(o).all()
