"""What only the CUDA operator has: streams, deterministic reductions, the vector and
scalar kernel paths, tensors of more than 2^31 elements. (float16 / bfloat16 and
autocast, on every device: tests/test_half_precision.py.)

Skipped as a whole without a CUDA device. The core suite (tests/test_*.py) runs every
one of its tests on "cuda" as well, so float64 gradcheck, opcheck, torch.compile and
the bad-input checks are not repeated here except where CUDA adds something.
"""

import pytest
import torch

import mlp_ext
from mlp_ext import reference

from conftest import make_inputs
from helpers import HALF_TYPES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

OPS = torch.ops.mlp_ext


def _present(tensors):
    return [t for t in tensors if t is not None]


def _outputs_and_gradients(fn, inputs, activation, weight_decay, grad_o, grad_s):
    o, s = fn(*inputs, activation=activation, weight_decay=weight_decay)
    grads = torch.autograd.grad((o, s), _present(inputs), (grad_o, grad_s))
    return [o, s, *grads]


@pytest.mark.parametrize("activation", ["gelu", "silu", "tanh"])  # smooth: no kink for finite differences
@pytest.mark.parametrize("shape", [(1200, 3, 8, 2), (700, 3, 9, 2)], ids=["vector", "scalar"])
def test_gradcheck_float64_over_row_chunks(activation, shape):
    """gradcheck on batches large enough that db1 is summed over several row chunks."""
    n, d, h, q = shape
    inputs = make_inputs(n=n, d=d, h=h, q=q, device="cuda")

    def fn(*args):
        return mlp_ext.fused_mlp(*args, activation=activation, weight_decay=0.2)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *HALF_TYPES])
def test_scalar_path_is_bitwise_the_vector_path(dtype):
    """A bias or z that is not 16-byte aligned takes the scalar kernels, which add in
    the same order as the vector ones: the results are identical to the last bit."""
    x, w1, w2, b1, b2 = make_inputs(n=1000, d=16, h=64, q=8, dtype=dtype, device="cuda",
                                    requires_grad=False)

    def misaligned(t):  # the same values one element past a 16-byte boundary
        storage = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        out = storage[1:].view(t.shape).copy_(t)
        assert out.is_contiguous() and out.data_ptr() % 16 != 0
        return out

    o, s, z, h, _ = OPS.fused_mlp_forward(x, w1, w2, b1, b2, "gelu", 0.1)
    for a, b in zip((o, s, z, h), OPS.fused_mlp_forward(x, w1, w2, misaligned(b1), b2, "gelu", 0.1)):
        assert torch.equal(a, b)
    # The penalty reads misaligned weights element by element, in the same order.
    _, s_misaligned, _, _, _ = OPS.fused_mlp_forward(x, misaligned(w1), misaligned(w2), b1, b2,
                                                  "gelu", 0.1)
    assert torch.equal(s, s_misaligned)

    grad_o = torch.randn(1000, 8, device="cuda").to(dtype)
    mask = [True] * 5
    vector = OPS.fused_mlp_backward(grad_o, None, x, w1, w2, z, h, "gelu", 0.1, mask)
    scalar = OPS.fused_mlp_backward(grad_o, None, x, w1, w2, misaligned(z), h, "gelu", 0.1, mask)
    for a, b in zip(vector, scalar):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic_from_run_to_run(dtype):
    inputs = make_inputs(n=4096, d=64, h=512, q=32, dtype=dtype, device="cuda")
    grad_o = torch.randn(4096, 32, device="cuda").to(dtype)

    def run():
        o, s = mlp_ext.fused_mlp(*inputs, activation="silu", weight_decay=0.01)
        return [o, s, *torch.autograd.grad((o, s), inputs, (grad_o, torch.ones_like(s)))]

    first = run()
    for _ in range(3):
        for a, b in zip(first, run()):
            assert torch.equal(a, b)


def test_runs_on_the_current_stream():
    """Everything is queued on the current stream: with that stream kept busy, a kernel
    queued elsewhere would read its inputs before the products that write them."""
    inputs = make_inputs(n=512, d=64, h=256, q=32, dtype=torch.float32, device="cuda")
    grad_o = torch.randn(512, 32, device="cuda")
    expected = _outputs_and_gradients(mlp_ext.fused_mlp, inputs, "gelu", 0.1, grad_o, None)

    side = torch.cuda.Stream()
    busy = torch.randn(4096, 4096, device="cuda")
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(10):
            busy = busy @ busy
        got = _outputs_and_gradients(mlp_ext.fused_mlp, inputs, "gelu", 0.1, grad_o, None)
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("index, name", list(enumerate(["x", "w1", "w2", "b1", "b2"])))
def test_cpu_cuda_mix_raises_a_clear_error(index, name, autocast):
    inputs = list(make_inputs(dtype=torch.float32, device="cuda", requires_grad=False))
    inputs[index] = inputs[index].cpu()
    with torch.autocast("cuda", enabled=autocast):
        with pytest.raises(RuntimeError, match="device") as info:
            mlp_ext.fused_mlp(*inputs)
    message = str(info.value)
    assert "cpu" in message and "cuda" in message, message
    # x on the CPU: the message names the first argument checked against it.
    assert (name if index else "w1") in message, message


def test_more_than_2_31_elements():
    """z, h and G_Z of 2^31 + 4096 elements: the rows past element 2^31 are right,
    and db1 sums all of them."""
    n, d, width, q = 2**19 + 1, 8, 4096, 8
    dtype = torch.bfloat16
    needed = 5 * n * width * 2 + 2**32  # z, h, G_Z, float32 reference chunks
    free, _ = torch.cuda.mem_get_info()
    if free < needed:
        pytest.skip(f"needs {needed / 2**30:.0f} GiB of free GPU memory, {free / 2**30:.0f} free")
    phi = reference.phi("gelu")
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(dtype)

    x, w1, w2 = randn(n, d), randn(width, d, scale=d**-0.5), randn(q, width, scale=width**-0.5)
    b1, b2, grad_o = randn(width), randn(q), randn(n, q)
    o, _, z, h, _ = OPS.fused_mlp_forward(x, w1, w2, b1, b2, "gelu", 0.0)
    assert z.numel() > 2**31 and h.numel() > 2**31
    tail = slice(n - 4, n)  # the last row starts at element 2^31
    tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(z[tail].float(), x[tail].float() @ w1.float().T + b1.float(), **tol)
    torch.testing.assert_close(h[tail].float(), phi(z[tail].float()), **tol)
    torch.testing.assert_close(o[tail].float(), h[tail].float() @ w2.float().T + b2.float(), **tol)

    dx, _, _, db1, _ = OPS.fused_mlp_backward(grad_o, None, x, w1, w2, z, h, "gelu", 0.0,
                                              [True, False, False, True, False])

    def g_z(rows):  # G_Z = (G_O W2) * phi'(z) in float32, by autograd
        z_rows = z[rows].float().requires_grad_()
        (grad,) = torch.autograd.grad(phi(z_rows), z_rows, grad_o[rows].float() @ w2.float())
        return grad

    torch.testing.assert_close(dx[tail].float(), g_z(tail) @ w1.float(), **tol)
    db1_expected = torch.zeros(width, dtype=torch.float64, device="cuda")
    for start in range(0, n, 65536):
        db1_expected += g_z(slice(start, min(n, start + 65536))).sum(0, dtype=torch.float64)
    scale = db1_expected.abs().max().item()
    torch.testing.assert_close(db1.double(), db1_expected, rtol=2e-2, atol=2e-2 * scale)
    del o, z, h, dx
    torch.cuda.empty_cache()
