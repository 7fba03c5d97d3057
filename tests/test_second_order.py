"""Second derivatives through fused_mlp (the section's exercise 4).

The autograd node's backward calls the fast fused_mlp_backward op; only under
create_graph=True does it recompute the forward from differentiable ATen ops
and differentiate that, so that second derivatives are exact.
"""
import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradgradcheck

import mlp_ext
from mlp_ext import reference

from conftest import make_inputs
from helpers import SavedTensors


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", mlp_ext.ACTIVATIONS)
def test_gradgradcheck(device, activation, bias, weight_decay):
    """Both outputs (o and s) get random upstream gradients, and so do the gradients."""
    inputs = make_inputs(batch_shape=(2, 3), bias=bias, device=device)

    def f(*args):
        return mlp_ext.fused_mlp(*args, activation=activation, weight_decay=weight_decay)

    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("wrt", ["x", "weights", "w2 and b2", "b1"])
@pytest.mark.parametrize("save_hidden", [True, False])
def test_gradgradcheck_subsets_of_inputs(device, wrt, save_hidden):
    """Only some inputs require grad: the backward must ask for exactly those."""
    x, w1, w2, b1, b2 = make_inputs(device=device, requires_grad=False)
    chosen = {"x": [x], "weights": [w1, w2], "w2 and b2": [w2, b2], "b1": [b1]}[wrt]
    for t in chosen:
        t.requires_grad_(True)

    def f(*args):
        return mlp_ext.fused_mlp(*args, activation="silu", weight_decay=0.2,
                                 save_hidden=save_hidden)

    assert gradgradcheck(f, (x, w1, w2, b1, b2))


def _objective(fn, activation, weight_decay, target):
    """J = cross-entropy(o, target) + s as a function of (x, w1, w2, b1, b2)."""
    def J(x, w1, w2, b1, b2):
        o, s = fn(x, w1, w2, b1, b2, activation=activation, weight_decay=weight_decay)
        return F.cross_entropy(o, target) + s
    return J


def _hvp_by_double_backward(J, inputs, vectors, argnums):
    """H v by differentiating <grad J, v>: two backward passes through our op."""
    wrt = [inputs[i] for i in argnums]
    grads = torch.autograd.grad(J(*inputs), wrt, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vectors))
    return torch.autograd.grad(dot, wrt)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("activation", ["tanh", "gelu", "silu", "relu"])
def test_hessian_wrt_x_and_weights_equals_torch_func_hessian(device, activation, weight_decay):
    """The full Hessian, column by column (H e_i), against torch.func.hessian of the reference."""
    inputs = make_inputs(batch_shape=(4,), d=3, h=5, q=3, device=device)
    target = torch.randint(0, 3, (4,), device=device)
    ours = _objective(mlp_ext.fused_mlp, activation, weight_decay, target)
    ref = _objective(reference.fused_mlp, activation, weight_decay, target)
    plain = [t.detach() for t in inputs]
    for argnums in [(0,), (1, 2, 3, 4)]:  # w.r.t. x; w.r.t. every weight and bias jointly
        hessian = torch.func.hessian(ref, argnums=argnums)(*plain)
        sizes = [plain[i].numel() for i in argnums]
        # hessian[a][b] has shape (*shape_a, *shape_b): assemble the square matrix.
        matrix = torch.cat([torch.cat([hessian[a][b].reshape(sizes[a], sizes[b])
                                       for b in range(len(argnums))], 1)
                            for a in range(len(argnums))], 0)
        for column in range(sum(sizes)):
            unit = torch.zeros(sum(sizes), dtype=torch.float64, device=device)
            unit[column] = 1
            vectors = [v.reshape(plain[i].shape)
                       for v, i in zip(unit.split(sizes), argnums)]
            hv = _hvp_by_double_backward(ours, inputs, vectors, argnums)
            torch.testing.assert_close(torch.cat([t.reshape(-1) for t in hv]), matrix[:, column])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["sigmoid", "gelu_tanh", "identity"])
def test_hvp_equals_forward_over_reverse_on_the_reference(device, activation, bias):
    """H v for a random v, against jvp-of-grad (forward-over-reverse) of the reference,
    with x of leading shape (2, 3) and sizes where the full Hessian would be large."""
    inputs = make_inputs(batch_shape=(2, 3), d=7, h=9, q=4, bias=bias, device=device)
    target = torch.randint(0, 4, (2, 3), device=device)

    def loss(fn):
        def J(x, w1, w2, b1, b2):
            o, s = fn(x, w1, w2, b1, b2, activation=activation, weight_decay=0.05)
            return F.cross_entropy(o.reshape(-1, 4), target.reshape(-1)) + s
        return J

    argnums = tuple(i for i, t in enumerate(inputs) if t is not None)
    plain = [None if t is None else t.detach() for t in inputs]
    vectors = [torch.randn_like(plain[i]) for i in argnums]

    def grad_of_ref(*wrt):
        args = list(plain)
        for i, t in zip(argnums, wrt):
            args[i] = t
        return torch.func.grad(loss(reference.fused_mlp), argnums=argnums)(*args)

    _, expected = torch.func.jvp(grad_of_ref, tuple(plain[i] for i in argnums), tuple(vectors))
    ours = _hvp_by_double_backward(loss(mlp_ext.fused_mlp), inputs, vectors, argnums)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)


def test_autograd_functional_hvp_on_the_module(device):
    """torch.autograd.functional.hvp w.r.t. the parameters of FusedMLP (with s in J)."""
    torch.manual_seed(0)
    mlp = mlp_ext.FusedMLP(5, 8, 3, activation="tanh", weight_decay=0.01,
                           dtype=torch.float64, device=device)
    seq = mlp.to_sequential(copy_weights=True)
    x = torch.randn(6, 5, dtype=torch.float64, device=device)
    y = torch.randint(0, 3, (6,), device=device)
    names = [name for name, _ in mlp.named_parameters()]
    params = tuple(p.detach() for p in mlp.parameters())
    v = tuple(torch.randn_like(p) for p in params)

    def J_fused(*ps):
        o, s = torch.func.functional_call(mlp, dict(zip(names, ps)), (x,),
                                          {"return_penalty": True})
        return F.cross_entropy(o, y) + s

    def J_sequential(*ps):
        o = torch.func.functional_call(seq, dict(zip(["0.weight", "0.bias", "2.weight", "2.bias"],
                                                     ps)), (x,))
        return F.cross_entropy(o, y) + 0.01 / 2 * (ps[0].square().sum() + ps[2].square().sum())

    _, ours = torch.autograd.functional.hvp(J_fused, params, v)
    _, expected = torch.autograd.functional.hvp(J_sequential, params, v)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)


def test_second_derivative_of_relu_network_is_linear_in_w2():
    """relu'' = 0 almost everywhere: d2 o / dW2^2 = 0, so H_W2W2 of <o, c> vanishes, while
    the cross terms (W1, W2) do not."""
    x, w1, w2, b1, b2 = make_inputs()
    c = torch.randn(5, 3, dtype=torch.float64)
    o, _ = mlp_ext.fused_mlp(x, w1, w2, b1, b2, activation="relu")
    (g_w2,) = torch.autograd.grad((o * c).sum(), w2, create_graph=True)
    v = torch.randn_like(w2)
    h_w2, h_w1 = torch.autograd.grad((g_w2 * v).sum(), (w2, w1), allow_unused=True,
                                     materialize_grads=True)
    assert torch.count_nonzero(h_w2) == 0
    assert torch.count_nonzero(h_w1) > 0


def _profile_backward(create_graph):
    x, w1, w2, b1, b2 = make_inputs(batch_shape=(16,), d=8, h=32, q=4, dtype=torch.float32)
    o, s = mlp_ext.fused_mlp(x, w1, w2, b1, b2, activation="gelu", weight_decay=0.1)
    loss = (o * torch.randn_like(o)).sum() + s
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.autograd.grad(loss, (x, w1, w2, b1, b2), create_graph=create_graph)
    return {event.key: event.count for event in prof.key_averages()}


def test_fast_backward_without_create_graph():
    """create_graph=False: one fused_mlp_backward call and no recomputed forward (no
    activation op, no matmul, no autograd of ATen ops)."""
    counts = _profile_backward(create_graph=False)
    assert counts.get("mlp_ext::fused_mlp_backward") == 1
    for recompute in ("aten::gelu", "aten::matmul", "aten::gelu_backward"):
        assert recompute not in counts, (recompute, counts)


def test_differentiable_backward_only_with_create_graph():
    """create_graph=True: the forward is recomputed from ATen ops (gelu, matmul) and
    differentiated; the fused backward op is not used."""
    counts = _profile_backward(create_graph=True)
    assert "mlp_ext::fused_mlp_backward" not in counts
    assert counts.get("aten::gelu", 0) >= 1 and counts.get("aten::gelu_backward", 0) >= 1


def _saved_bytes(fn):
    """fn(), and the bytes and the number of the distinct storages autograd saves while it runs."""
    with SavedTensors() as saved:
        result = fn()
    return result, saved.owned_bytes(), len(saved.storages())


def _median_seconds(fn, repeats=15):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def test_cost_of_the_second_order_graph(record_property):
    """What a second derivative costs against the first: the fast backward builds no
    graph (saves nothing); under create_graph the backward builds the graph of the
    gradient, which keeps at least the activations of the forward again, and a
    Hessian-vector product needs it plus a second backward pass."""
    n, d, h, q = 64, 32, 128, 10
    x, w1, w2, b1, b2 = make_inputs(batch_shape=(n,), d=d, h=h, q=q, dtype=torch.float32)
    params = (w1, w2, b1, b2)
    y = torch.randint(0, q, (n,))
    x.requires_grad_(False)

    def forward():
        o, s = mlp_ext.fused_mlp(x, *params, activation="tanh", weight_decay=1e-3)
        return F.cross_entropy(o, y) + s

    loss, forward_bytes, _ = _saved_bytes(forward)
    _, first_order_bytes, first_count = _saved_bytes(
        lambda: torch.autograd.grad(loss, params, retain_graph=True))
    grads, second_order_bytes, second_count = _saved_bytes(
        lambda: torch.autograd.grad(loss, params, retain_graph=True, create_graph=True))
    footprint = mlp_ext.memory_footprint(n, d, h, q, dtype=torch.float32)
    assert first_order_bytes == 0 and first_count == 0
    assert second_order_bytes >= footprint.saved_activations
    assert all(g.requires_grad for g in grads)

    v = [torch.randn_like(p) for p in params]

    def first():
        torch.autograd.grad(forward(), params)

    def hvp():
        g = torch.autograd.grad(forward(), params, create_graph=True)
        torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, v)), params)

    t_first, t_hvp = _median_seconds(first), _median_seconds(hvp)
    for key, value in {"forward_saved_bytes": forward_bytes,
                       "second_order_graph_saved_bytes": second_order_bytes,
                       "second_order_graph_saved_tensors": second_count,
                       "forward_backward_ms": 1e3 * t_first, "hvp_ms": 1e3 * t_hvp}.items():
        record_property(key, value)
    print(f"\n{n}x{d}x{h}x{q} float32: forward saves {forward_bytes:,} B; create_graph "
          f"backward saves {second_order_bytes:,} B in {second_count} tensors; "
          f"forward+backward {1e3 * t_first:.3f} ms, forward+HVP {1e3 * t_hvp:.3f} ms "
          f"({t_hvp / t_first:.1f}x)")


@pytest.mark.parametrize("which", ["b1 only", "b2 only"])
def test_gradgradcheck_with_one_bias(which):
    x, w1, w2, b1, b2 = make_inputs()
    if which == "b1 only":
        def f(x, w1, w2, b1):
            return mlp_ext.fused_mlp(x, w1, w2, b1, None, activation="gelu", weight_decay=0.1)
        inputs = (x, w1, w2, b1)
    else:
        def f(x, w1, w2, b2):
            return mlp_ext.fused_mlp(x, w1, w2, None, b2, activation="gelu", weight_decay=0.1)
        inputs = (x, w1, w2, b2)
    assert gradgradcheck(f, inputs)
