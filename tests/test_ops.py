"""The registered ops: torch.library.opcheck, and torch.compile(fullgraph=True) against eager."""
import pytest
import torch
from torch.library import opcheck

import mlp_ext

from conftest import make_inputs

OPS = torch.ops.mlp_ext


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh"])
def test_opcheck_fused_mlp(device, bias, activation):
    x, w1, w2, b1, b2 = make_inputs(n=6, d=5, h=7, q=3, bias=bias, dtype=torch.float32, device=device)
    opcheck(OPS.fused_mlp.default, (x, w1, w2, b1, b2),
            {"activation": activation, "weight_decay": 0.1})


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_forward_and_backward_ops(device, bias):
    x, w1, w2, b1, b2 = make_inputs(batch_shape=(2, 3), d=5, h=7, q=3, bias=bias,
                                    dtype=torch.float32, device=device, requires_grad=False)
    opcheck(OPS.fused_mlp_forward.default, (x, w1, w2, b1, b2, "silu", 0.1))
    _, _, z, h, _ = OPS.fused_mlp_forward(x, w1, w2, b1, b2, "silu", 0.1)
    grad_o = torch.randn(2, 3, 3, device=device)
    grad_s = torch.randn((), device=device)
    for mask in ([True] * 5, [False, True, False, True, False], [True, False, False, False, True]):
        for g_s in (grad_s, None):
            opcheck(OPS.fused_mlp_backward.default,
                    (grad_o, g_s, x, w1, w2, z, h, "silu", 0.1, mask))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", mlp_ext.ACTIVATIONS)
def test_inference_op_is_the_forward_without_z_and_h(device, bias, activation):
    """fused_mlp_inference (h written over z on CPU) gives the forward op's o and
    s bit for bit, and fused_mlp without autograd runs it."""
    x, w1, w2, b1, b2 = make_inputs(batch_shape=(3, 4), d=9, h=33, q=5, bias=bias,
                                    dtype=torch.float64, device=device, requires_grad=False)
    opcheck(OPS.fused_mlp_inference.default, (x, w1, w2, b1, b2, activation, 0.1))
    o, s, _, _, _ = OPS.fused_mlp_forward(x, w1, w2, b1, b2, activation, 0.1)
    o_inf, s_inf = OPS.fused_mlp_inference(x, w1, w2, b1, b2, activation, 0.1)
    assert o_inf.shape == (3, 4, 5) and o_inf.is_contiguous()
    assert torch.equal(o_inf, o) and torch.equal(s_inf, s)
    with torch.profiler.profile() as prof:
        with torch.no_grad():
            o_api, s_api = mlp_ext.fused_mlp(x, w1.requires_grad_(), w2, b1, b2,
                                             activation=activation, weight_decay=0.1)
    names = {e.name for e in prof.events()}
    assert "mlp_ext::fused_mlp_inference" in names and "mlp_ext::fused_mlp_forward" not in names
    assert torch.equal(o_api, o) and torch.equal(s_api, s)


def test_inference_op_checks_its_arguments(device):
    x, w1, w2, b1, b2 = make_inputs(dtype=torch.float32, device=device, requires_grad=False)
    with pytest.raises(RuntimeError, match=r"x.shape\[-1\] = 3 does not match in_features"):
        OPS.fused_mlp_inference(x[:, :3], w1, w2, b1, b2, "relu", 0.0)
    with pytest.raises(ValueError, match="unknown activation"):
        OPS.fused_mlp_inference(x, w1, w2, b1, b2, "swish", 0.0)


def test_backward_op_returns_only_the_masked_gradients(device):
    x, w1, w2, b1, b2 = make_inputs(dtype=torch.float32, device=device, requires_grad=False)
    _, _, z, h, _ = OPS.fused_mlp_forward(x, w1, w2, b1, b2, "tanh", 0.0)
    grads = OPS.fused_mlp_backward(torch.randn(5, 3, device=device), None, x, w1, w2, z, h,
                                   "tanh", 0.0, [False, True, False, False, True])
    assert [g is not None for g in grads] == [False, True, False, False, True]


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_torch_compile_fullgraph_matches_eager(device, bias, dynamic):
    torch._dynamo.reset()

    def step(x, w1, w2, b1, b2):
        o, s = mlp_ext.fused_mlp(x, w1, w2, b1, b2, activation="gelu", weight_decay=0.05)
        return torch.nn.functional.log_softmax(o, -1).mean() + s

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    for n in (8, 13):  # a second batch size exercises recompilation / dynamic shapes
        inputs = make_inputs(n=n, d=6, h=10, q=4, bias=bias, dtype=torch.float32, device=device)
        params = [t for t in inputs if t is not None]
        loss = compiled(*inputs)
        grads = torch.autograd.grad(loss, params)
        loss_ref = step(*inputs)
        torch.testing.assert_close(loss, loss_ref)
        for a, b in zip(grads, torch.autograd.grad(loss_ref, params)):
            torch.testing.assert_close(a, b)


def test_torch_compile_module_uses_the_fused_ops(device):
    """The compiled graph calls our two ops (no graph break, no decomposition)."""
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    mlp = mlp_ext.FusedMLP(6, 10, 4, activation="silu", weight_decay=0.01, device=device)
    x = torch.randn(9, 6, device=device)
    compiled = torch.compile(mlp, backend=counter, fullgraph=True)
    o, s = compiled(x, return_penalty=True)
    (o.sum() + s).backward()
    assert counter.frame_count == 1
    o_ref, s_ref = mlp(x, return_penalty=True)
    torch.testing.assert_close(o, o_ref)
    with torch.profiler.profile() as prof:
        o, s = compiled(x, return_penalty=True)
        (o.sum() + s).backward()
    names = {e.name for e in prof.events()}
    assert {"mlp_ext::fused_mlp_forward", "mlp_ext::fused_mlp_backward"} <= names
