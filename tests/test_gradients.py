"""Gradients of fused_mlp: gradcheck in float64, and equality with both references."""
import itertools

import pytest
import torch

import mlp_ext
from mlp_ext import reference

from conftest import make_inputs

WEIGHT_DECAYS = [0.0, 0.3]


def _call(fn, activation, weight_decay):
    return lambda x, w1, w2, b1, b2: fn(x, w1, w2, b1, b2, activation=activation,
                                        weight_decay=weight_decay)


@pytest.mark.parametrize("weight_decay", WEIGHT_DECAYS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_every_subset_of_inputs(device, activation, bias, weight_decay):
    """gradcheck of (o, s) for each subset of the inputs requiring grad."""
    inputs = make_inputs(bias=bias, device=device)
    names = ["x", "w1", "w2", "b1", "b2"]
    present = [i for i, t in enumerate(inputs) if t is not None]
    fn = _call(mlp_ext.fused_mlp, activation, weight_decay)
    for k in range(1, len(present) + 1):
        for subset in itertools.combinations(present, k):
            args = [None if t is None else t.detach().requires_grad_(i in subset)
                    for i, t in enumerate(inputs)]
            assert torch.autograd.gradcheck(fn, args), [names[i] for i in subset]


@pytest.mark.parametrize("weight_decay", WEIGHT_DECAYS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_equal_both_references(device, activation, bias, weight_decay):
    """Gradients of J = <g_o, o> + g_s * s equal autograd on reference.fused_mlp and the
    hand-applied equations of reference.fused_mlp_backward."""
    inputs = make_inputs(n=7, d=5, h=9, q=4, bias=bias, device=device)
    grad_o = torch.randn(7, 4, dtype=torch.float64, device=device)
    grad_s = torch.randn((), dtype=torch.float64, device=device)
    params = [t for t in inputs if t is not None]

    o, s = mlp_ext.fused_mlp(*inputs, activation=activation, weight_decay=weight_decay)
    ours = torch.autograd.grad((o, s), params, (grad_o, grad_s))
    o_ref, s_ref = reference.fused_mlp(*inputs, activation=activation, weight_decay=weight_decay)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)
    autograd_ref = torch.autograd.grad((o_ref, s_ref), params, (grad_o, grad_s))
    by_hand = reference.fused_mlp_backward(
        grad_o, *inputs[:4], activation=activation, weight_decay=weight_decay, grad_s=grad_s)
    by_hand = [g for g, t in zip(by_hand, inputs) if t is not None]
    for mine, ref, hand in zip(ours, autograd_ref, by_hand):
        torch.testing.assert_close(mine, ref)
        torch.testing.assert_close(mine, hand)


@pytest.mark.parametrize("weight_decay", WEIGHT_DECAYS)
@pytest.mark.parametrize("bias", [True, False])
def test_float32_matches_float64_reference(device, activation, bias, weight_decay):
    """float32 outputs and gradients against the float64 reference, at float32 tolerances."""
    inputs64 = make_inputs(n=64, d=48, h=96, q=24, bias=bias, device=device)
    inputs32 = [None if t is None else t.detach().float().requires_grad_() for t in inputs64]
    grad_o = torch.randn(64, 24, dtype=torch.float64, device=device)

    o32, s32 = mlp_ext.fused_mlp(*inputs32, activation=activation, weight_decay=weight_decay)
    o64, s64 = reference.fused_mlp(*inputs64, activation=activation, weight_decay=weight_decay)
    assert o32.dtype == s32.dtype == torch.float32
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(o32.double(), o64, **tol)
    torch.testing.assert_close(s32.double(), s64, **tol)
    g32 = torch.autograd.grad((o32, s32), [t for t in inputs32 if t is not None], (grad_o.float(), None))
    g64 = torch.autograd.grad((o64, s64), [t for t in inputs64 if t is not None], (grad_o, None))
    for a, b in zip(g32, g64):
        # Gradients sum 64 products: scale the tolerance with their magnitude.
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_s_is_zero_without_weight_decay_and_differentiable_with(device):
    x, w1, w2, b1, b2 = make_inputs(device=device)
    _, s0 = mlp_ext.fused_mlp(x, w1, w2, b1, b2, weight_decay=0.0)
    assert s0.shape == () and s0.item() == 0.0
    _, s = mlp_ext.fused_mlp(x, w1, w2, b1, b2, weight_decay=0.5)
    expected = 0.25 * (w1.detach().square().sum() + w2.detach().square().sum())
    torch.testing.assert_close(s.detach(), expected)
    # s alone reaches the loss: dW = lambda W, nothing else gets a gradient.
    dx, dw1, dw2 = torch.autograd.grad(s, (x, w1, w2), allow_unused=True)
    assert dx is None
    torch.testing.assert_close(dw1, 0.5 * w1.detach())
    torch.testing.assert_close(dw2, 0.5 * w2.detach())


def test_only_needed_gradients_are_computed(device):
    """With only w2 requiring grad, the node asks the backward op for dW2 alone."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class BackwardSpy(TorchDispatchMode):
        masks = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.mlp_ext.fused_mlp_backward.default:
                self.masks.append(list(args[-1]))
            return func(*args, **(kwargs or {}))

    x, w1, w2, b1, b2 = make_inputs(device=device, requires_grad=False)
    w2.requires_grad_()
    o, s = mlp_ext.fused_mlp(x, w1, w2, b1, b2, activation="tanh", weight_decay=0.1)
    with BackwardSpy():
        (o.sum() + s).backward()
    assert BackwardSpy.masks == [[False, False, True, False, False]]
    o_ref, s_ref = reference.fused_mlp(x, w1, w2, b1, b2, activation="tanh", weight_decay=0.1)
    (ref,) = torch.autograd.grad(o_ref.sum() + s_ref, w2)
    torch.testing.assert_close(w2.grad, ref)
