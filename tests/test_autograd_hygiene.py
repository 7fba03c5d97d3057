"""What the autograd node saves, that nothing leaks, and that in-place edits are caught."""
import gc

import pytest
import torch

import mlp_ext
from mlp_ext import reference

from conftest import make_inputs
from helpers import SavedTensors


@pytest.mark.parametrize("bias", [True, False])
def test_saves_exactly_x_weights_z_and_h(device, activation, bias):
    """The forward saves Z and H (the README's math), plus the inputs the equations read
    (x, W1, W2; b1 only so that create_graph can rebuild z). Nothing else: no o, no b2."""
    x, w1, w2, b1, b2 = make_inputs(n=7, d=5, h=9, q=4, bias=bias, device=device)
    with SavedTensors() as packed:
        o, s = mlp_ext.fused_mlp(x, w1, w2, b1, b2, activation=activation, weight_decay=0.1)
    saved = packed.tensors
    expected_inputs = [x, w1, w2] + ([b1] if bias else [])
    assert len(saved) == len(expected_inputs) + 2
    for t, ref in zip(saved, expected_inputs):
        assert t.data_ptr() == ref.data_ptr() and t.shape == ref.shape  # the input itself, no copy
    z, h = saved[-2:]
    z_ref = x.detach() @ w1.detach().T + (b1.detach() if bias else 0)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(h, reference.phi(activation)(z_ref))
    assert all(t.data_ptr() != o.data_ptr() for t in saved)


def test_saved_bytes_are_the_intermediates_only():
    """Beyond the inputs, backward keeps exactly z and h: 2 * n * hidden elements."""
    x, w1, w2, b1, b2 = make_inputs(n=32, d=16, h=64, q=8, dtype=torch.float32)
    inputs = {t.data_ptr() for t in (x, w1, w2, b1)}
    with SavedTensors() as saved:
        mlp_ext.fused_mlp(x, w1, w2, b1, b2)
    extra = [t for t in saved.tensors if t.data_ptr() not in inputs]
    assert sum(t.numel() * t.element_size() for t in extra) == 2 * 32 * 64 * 4
    assert saved.owned_bytes(x, w1, w2, b1) == 2 * 32 * 64 * 4  # two storages of their own


def _resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_memory_stays_flat_over_many_steps(device):
    mlp = mlp_ext.FusedMLP(256, 512, 256, weight_decay=1e-3, device=device)
    opt = torch.optim.SGD(mlp.parameters(), lr=1e-3)
    x = torch.randn(256, 256, device=device)

    def step():
        opt.zero_grad()
        o, s = mlp(x, return_penalty=True)
        (o.square().mean() + s).backward()
        opt.step()

    for _ in range(20):
        step()
    gc.collect()
    before = torch.cuda.memory_allocated() if device == "cuda" else _resident_bytes()
    for _ in range(200):  # each step makes 1 MiB of z and h: a leak would show 200 MiB
        step()
    gc.collect()
    after = torch.cuda.memory_allocated() if device == "cuda" else _resident_bytes()
    assert after - before < (0 if device == "cuda" else 32 * 2**20) + 1, (before, after)


def test_in_place_edit_of_a_saved_input_raises_at_backward(device):
    x, w1, w2, b1, b2 = make_inputs(device=device)
    o, s = mlp_ext.fused_mlp(x, w1, w2, b1, b2, weight_decay=0.1)
    with torch.no_grad():
        w1.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (o.sum() + s).backward()

    x, w1, w2, b1, b2 = make_inputs(device=device)
    x_in = x * 1  # a non-leaf input, edited in place after the forward
    o, _ = mlp_ext.fused_mlp(x_in, w1, w2, b1, b2)
    x_in.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        o.sum().backward()


def test_one_node_and_no_graph_without_grad(device):
    x, w1, w2, b1, b2 = make_inputs(device=device)
    o, s = mlp_ext.fused_mlp(x, w1, w2, b1, b2, weight_decay=0.1)
    assert o.grad_fn is s.grad_fn and o.grad_fn.name() == "FusedMLPBackward"
    with torch.no_grad():
        o, s = mlp_ext.fused_mlp(x, w1, w2, b1, b2, weight_decay=0.1)
    assert o.grad_fn is None and not o.requires_grad
