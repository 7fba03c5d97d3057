"""The gated op (mlp_ext.gated_mlp: SwiGLU / GeGLU / ReGLU / GLU): float64
gradcheck and gradgradcheck, gradients against both references of
mlp_ext.reference (autograd of the torch-op forward, and the backward equations
by hand), opcheck, fake kernels, torch.compile, argument errors."""
import pytest
import torch
from torch.library import opcheck

import mlp_ext
from mlp_ext import reference

from helpers import HALF_TYPES, error_bound, relative_error

OPS = torch.ops.mlp_ext


def make_gated(n=5, d=4, h=6, q=3, *, bias=True, dtype=torch.float64, device="cpu",
               batch_shape=None, requires_grad=True):
    """Fresh random (x, w_gate, w_up, w_down, b_gate, b_up, b_down)."""
    shape = (*batch_shape, d) if batch_shape is not None else (n, d)

    def rand(*size):
        return torch.randn(*size, dtype=dtype, device=device).requires_grad_(requires_grad)

    x, w_gate, w_up, w_down = rand(*shape), rand(h, d), rand(h, d), rand(q, h)
    biases = (rand(h), rand(h), rand(q)) if bias else (None, None, None)
    return (x, w_gate, w_up, w_down, *biases)


def present(inputs):
    return [t for t in inputs if t is not None]


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(device, activation, bias, weight_decay):
    inputs = make_gated(batch_shape=(2, 3), d=5, h=7, q=4, bias=bias, device=device)
    o, s = mlp_ext.gated_mlp(*inputs, activation=activation, weight_decay=weight_decay)
    o_ref, s_ref = reference.gated_mlp(*inputs, activation=activation, weight_decay=weight_decay)
    assert o.shape == (2, 3, 4) and o.is_contiguous()
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s, s_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("save_hidden", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_match_both_references(device, activation, bias, weight_decay, save_hidden):
    """Every gradient of J = <G_O, o> + g_s s against the hand-applied equations
    (reference.gated_mlp_backward) and against autograd through reference.gated_mlp."""
    inputs = make_gated(batch_shape=(2, 4), d=5, h=9, q=3, bias=bias, device=device)
    grad_o = torch.randn(2, 4, 3, dtype=torch.float64, device=device)
    grad_s = torch.randn((), dtype=torch.float64, device=device)
    o, s = mlp_ext.gated_mlp(*inputs, activation=activation, weight_decay=weight_decay,
                             save_hidden=save_hidden)
    got = torch.autograd.grad((o, s), present(inputs), (grad_o, grad_s))
    by_hand = reference.gated_mlp_backward(grad_o, *inputs[:6], activation=activation,
                                           weight_decay=weight_decay, grad_s=grad_s)
    expected_by_hand = [g for g, t in zip(by_hand, inputs) if t is not None]
    o_ref, s_ref = reference.gated_mlp(*inputs, activation=activation, weight_decay=weight_decay)
    by_autograd = torch.autograd.grad((o_ref, s_ref), present(inputs), (grad_o, grad_s))
    for g, hand, auto in zip(got, expected_by_hand, by_autograd):
        torch.testing.assert_close(g, hand, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(g, auto, rtol=1e-10, atol=1e-10)


def test_save_hidden_false_gives_the_same_gradients_bit_for_bit(device, activation):
    inputs = make_gated(n=7, d=5, h=11, q=4, device=device)
    results = []
    for save_hidden in (True, False):
        o, s = mlp_ext.gated_mlp(*inputs, activation=activation, weight_decay=0.1,
                                 save_hidden=save_hidden)
        results.append(torch.autograd.grad(o.sum() + s, present(inputs)))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("weight_decay", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(device, activation, bias, weight_decay):
    inputs = make_gated(n=4, d=3, h=5, q=2, bias=bias, device=device)

    def f(*args):
        return mlp_ext.gated_mlp(*args, activation=activation, weight_decay=weight_decay)

    args = inputs if bias else inputs[:4]
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("weight_decay", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
def test_gradgradcheck(device, activation, bias, weight_decay):
    """Exact second derivatives (the create_graph path) for every activation as the gate."""
    inputs = make_gated(n=3, d=3, h=4, q=2, bias=bias, device=device)

    def f(*args):
        return mlp_ext.gated_mlp(*args, activation=activation, weight_decay=weight_decay)

    args = inputs if bias else inputs[:4]
    assert torch.autograd.gradgradcheck(f, args)


def test_second_derivatives_match_the_reference():
    """A Hessian-vector product through the op equals the one through reference.gated_mlp."""
    inputs = make_gated(n=4, d=3, h=5, q=2)
    results = []
    for fn in (mlp_ext.gated_mlp, reference.gated_mlp):
        o, s = fn(*inputs, activation="gelu_tanh", weight_decay=0.2)
        grads = torch.autograd.grad(o.square().sum() + s, inputs, create_graph=True)
        total = sum((g * g).sum() for g in grads)
        results.append(torch.autograd.grad(total, inputs))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bias", [True, False])
def test_float32_against_float64_reference(device, activation, bias):
    """float32 against the float64 reference, weights scaled as nn.Linear's (z of
    order 1). Every value is a sum of at most k = 64 products (or 33 rows), whose
    float32 rounding error is at most about k u (u = 6e-8) times the sum of the
    terms' magnitudes; 2e-5 times the largest magnitude of the result covers that
    with a margin of ~5 for phi's own few ulps, and would still catch a wrong term."""
    n, d, h, q = 33, 40, 64, 24
    inputs64 = list(make_gated(n=n, d=d, h=h, q=q, bias=bias, device=device, requires_grad=False))
    inputs64[1:3] = [w * d ** -0.5 for w in inputs64[1:3]]
    inputs64[3] = inputs64[3] * h ** -0.5
    inputs32 = [t.float().requires_grad_() if t is not None else None for t in inputs64]
    o, s = mlp_ext.gated_mlp(*inputs32, activation=activation, weight_decay=0.1)
    grads = torch.autograd.grad(o.sum() + s, present(inputs32))
    inputs64 = [t.requires_grad_() if t is not None else None for t in inputs64]
    o_ref, s_ref = reference.gated_mlp(*inputs64, activation=activation, weight_decay=0.1)
    grads_ref = torch.autograd.grad(o_ref.sum() + s_ref, present(inputs64))
    for got, ref in zip((o, s, *grads), (o_ref, s_ref, *grads_ref)):
        torch.testing.assert_close(got.double(), ref, rtol=0,
                                   atol=2e-5 * ref.abs().max().item())



@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_half_types_against_float64_reference(device, activation, dtype, bias, weight_decay):
    """float16 / bfloat16 (elementwise work in float32 between half-precision loads
    and stores, products accumulated in float32): o, s and every gradient against the
    float64 reference on the same rounded inputs, no further from it than 3x what
    torch's own ops reach in that dtype plus rounding (helpers.error_bound); odd widths
    so that rows end in partial vectors; every result in the inputs' dtype."""
    n, d, h, q = 37, 24, 35, 9
    inputs = list(make_gated(n=n, d=d, h=h, q=q, bias=bias, device=device, requires_grad=False))
    inputs[1:3] = [w * d ** -0.5 for w in inputs[1:3]]
    inputs[3] = inputs[3] * h ** -0.5

    def run(fn, dtype):
        args = [t.to(dtype).requires_grad_() if t is not None else None for t in inputs]
        o, s = fn(*args, activation=activation, weight_decay=weight_decay)
        grad_o = torch.ones_like(o).copy_(grad_o64)
        return [o, s, *torch.autograd.grad((o, s), present(args), (grad_o, s.new_tensor(0.7)))]

    grad_o64 = torch.randn(n, q, dtype=torch.float64, device=device).to(dtype).double()
    inputs = [t.to(dtype).double() if t is not None else None for t in inputs]  # rounded once
    ours = run(mlp_ext.gated_mlp, dtype)
    eager = run(reference.gated_mlp, dtype)
    truth = run(reference.gated_mlp, torch.float64)
    for i, (mine, theirs, exact) in enumerate(zip(ours, eager, truth)):
        assert mine.dtype == dtype and mine.shape == exact.shape, (i, mine.dtype, mine.shape)
        bound = error_bound(theirs, exact, dtype)
        assert relative_error(mine, exact) <= bound, (i, relative_error(mine, exact), bound)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("autocast_dtype", HALF_TYPES)
def test_autocast_casts_as_it_casts_nn_linear(device, autocast_dtype, input_dtype):
    """Under torch.autocast the gated op casts its inputs as autocast casts
    F.linear's (checked in this process): every floating dtype but float64 to the
    autocast dtype, which o and s then have, bit for bit the op on inputs cast by
    hand; float64 left alone. The casts are recorded by autograd, so each gradient
    comes back in its parameter's dtype."""
    inputs = make_gated(n=6, d=5, h=7, q=3, dtype=input_dtype, device=device)
    with torch.autocast(device, dtype=autocast_dtype):
        o, s = mlp_ext.gated_mlp(*inputs, activation="silu", weight_decay=0.1)
        linear = torch.nn.functional.linear(inputs[0], inputs[1], inputs[4])
    assert o.dtype == s.dtype == linear.dtype
    expected_dtype = torch.float64 if input_dtype == torch.float64 else autocast_dtype
    assert o.dtype == expected_dtype
    with torch.no_grad():
        cast = [t.detach().to(expected_dtype) for t in inputs]
        o_cast, s_cast = mlp_ext.gated_mlp(*cast, activation="silu", weight_decay=0.1)
    assert torch.equal(o, o_cast) and torch.equal(s, s_cast)
    grads = torch.autograd.grad(o.float().sum() + s.float(), inputs)
    assert [g.dtype for g in grads] == [t.dtype for t in inputs]

def test_only_the_requested_gradients_are_computed():
    x, w_gate, w_up, w_down, b_gate, b_up, b_down = make_gated(requires_grad=False)
    _, _, z, h = OPS.gated_mlp_forward(x, w_gate, w_up, w_down, b_gate, b_up, b_down, "silu", 0.1)
    grad_o = torch.randn(5, 3, dtype=torch.float64)
    mask = [False, True, False, True, False, True, False]
    out = OPS.gated_mlp_backward(grad_o, None, x, w_gate, w_up, w_down, z, h, "silu", 0.1, mask)
    assert [t is not None for t in out] == mask


def test_empty_batch_and_leading_dimensions():
    inputs = make_gated(batch_shape=(0,), d=4, h=6, q=3)
    o, s = mlp_ext.gated_mlp(*inputs, weight_decay=0.1)
    assert o.shape == (0, 3)
    o.sum().backward()
    assert inputs[1].grad is not None and torch.equal(inputs[1].grad, torch.zeros_like(inputs[1]))


def test_only_s_reaches_the_loss():
    inputs = make_gated()
    _, s = mlp_ext.gated_mlp(*inputs, weight_decay=0.5)
    grads = torch.autograd.grad(s, inputs[1:4])
    for g, w in zip(grads, inputs[1:4]):
        torch.testing.assert_close(g, 0.5 * w)


def test_no_grad_runs_the_inference_op():
    inputs = make_gated(requires_grad=False)
    with torch.profiler.profile() as prof:
        mlp_ext.gated_mlp(*inputs)
    assert "mlp_ext::gated_mlp_inference" in {e.name for e in prof.events()}


# -- opcheck, fake kernels, torch.compile -------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "relu"])
def test_opcheck_gated_mlp(bias, activation):
    inputs = make_gated(n=6, d=5, h=7, q=3, bias=bias, dtype=torch.float32)
    opcheck(OPS.gated_mlp.default, tuple(inputs), {"activation": activation, "weight_decay": 0.1})


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_forward_inference_and_backward_ops(bias):
    inputs = make_gated(batch_shape=(2, 3), d=5, h=7, q=3, bias=bias, dtype=torch.float32,
                        requires_grad=False)
    opcheck(OPS.gated_mlp_forward.default, (*inputs, "silu", 0.1))
    opcheck(OPS.gated_mlp_inference.default, (*inputs, "gelu", 0.1))
    _, _, z, h = OPS.gated_mlp_forward(*inputs, "silu", 0.1)
    grad_o = torch.randn(2, 3, 3)
    for mask in ([True] * 7, [False, True, True, False, False, False, True]):
        for g_s in (torch.randn(()), None):
            for saved_h in (h, None):
                opcheck(OPS.gated_mlp_backward.default,
                        (grad_o, g_s, *inputs[:4], z, saved_h, "silu", 0.1, mask))


def test_inference_op_is_the_forward_without_z_and_h(activation):
    inputs = make_gated(batch_shape=(3, 4), d=9, h=33, q=5, requires_grad=False)
    o, s, z, h = OPS.gated_mlp_forward(*inputs, activation, 0.1)
    o_inf, s_inf = OPS.gated_mlp_inference(*inputs, activation, 0.1)
    assert torch.equal(o, o_inf) and torch.equal(s, s_inf)
    assert z.shape == (12, 66) and h.shape == (12, 33)


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph_matches_eager(dynamic):
    torch._dynamo.reset()

    def step(*inputs):
        o, s = mlp_ext.gated_mlp(*inputs, activation="silu", weight_decay=0.05)
        return torch.nn.functional.log_softmax(o, -1).mean() + s

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic)
    for n in (8, 13):
        inputs = make_gated(n=n, d=6, h=10, q=4, dtype=torch.float32)
        loss = compiled(*inputs)
        grads = torch.autograd.grad(loss, inputs)
        loss_ref = step(*inputs)
        torch.testing.assert_close(loss, loss_ref)
        for a, b in zip(grads, torch.autograd.grad(loss_ref, inputs)):
            torch.testing.assert_close(a, b)


def test_torch_compile_module_calls_the_gated_ops():
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    mlp = mlp_ext.GatedFusedMLP(6, 10, 4, weight_decay=0.01)
    x = torch.randn(9, 6)
    compiled = torch.compile(mlp, backend=counter, fullgraph=True)
    o, s = compiled(x, return_penalty=True)
    (o.sum() + s).backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(o, mlp(x))
    with torch.profiler.profile() as prof:
        o, s = compiled(x, return_penalty=True)
        (o.sum() + s).backward()
    names = {e.name for e in prof.events()}
    assert {"mlp_ext::gated_mlp_forward", "mlp_ext::gated_mlp_backward"} <= names


# -- argument errors: the op and its fake kernel raise the same ---------------------------

def _bad_calls():
    x, wg, wu, wd, bg, bu, bd = make_gated(requires_grad=False)
    return [
        ((x, wg, wu[:, :2], wd, bg, bu, bd), RuntimeError, "expected w_up of the shape of w_gate"),
        ((x[:, :3], wg, wu, wd, bg, bu, bd), RuntimeError, "x.shape[-1] = 3 does not match"),
        ((x, wg, wu, wd[:, :2], bg, bu, bd), RuntimeError, "w_down.shape[1] = 2 does not match"),
        ((x, wg, wu, wd, bg[:2], bu, bd), RuntimeError, "expected b_gate of shape"),
        ((x, wg, wu, wd, bg, bu, bd[:1]), RuntimeError, "expected b_down of shape"),
        ((x, wg.float(), wu, wd, bg, bu, bd), TypeError, "expected w_gate to have the dtype of x"),
        ((x.int(), wg, wu, wd, bg, bu, bd), TypeError, "expected x of a floating dtype"),
        ((x[0, 0], wg, wu, wd, bg, bu, bd), RuntimeError, "with at least 1 dimension"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_bad_arguments_raise_the_same_error_eager_and_fake(case):
    args, error, message = _bad_calls()[case]
    with pytest.raises(error, match=message.replace("[", r"\[").replace(".", r"\.")):
        OPS.gated_mlp_forward(*args, "silu", 0.0)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) if t is not None else None for t in args]
        with pytest.raises(error, match=message.replace("[", r"\[").replace(".", r"\.")):
            OPS.gated_mlp_forward(*fake, "silu", 0.0)


def test_bad_options():
    inputs = make_gated(requires_grad=False)
    with pytest.raises(ValueError, match="weight_decay"):
        mlp_ext.gated_mlp(*inputs, weight_decay=-1.0)
    with pytest.raises(ValueError, match="unknown activation"):
        mlp_ext.gated_mlp(*inputs, activation="swish2")
    with pytest.raises(TypeError, match="expected w_up to be a Tensor"):
        mlp_ext.gated_mlp(inputs[0], inputs[1], None, inputs[3])


def test_forward_mode_ad_is_rejected_clearly():
    import torch.autograd.forward_ad as fwAD
    inputs = make_gated(requires_grad=False)
    with fwAD.dual_level():
        x = fwAD.make_dual(inputs[0], torch.randn_like(inputs[0]))
        with pytest.raises(RuntimeError):
            mlp_ext.gated_mlp(x, *inputs[1:])


def test_benchmark_script_runs_and_verifies():
    """benchmarks/gated.py on a tiny shape: the sides agree and every ratio is reported."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gated.py")
    spec = importlib.util.spec_from_file_location("gated_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--shapes", "3x8x12x8", "--rounds", "1", "--block-seconds", "0.01",
                       "--out", "-"])
    assert [r["mode"] for r in out["results"]] == ["train", "inference"]
    assert all(r["compiled_graphs_seen"] and r["eager_over_fused"] > 0 for r in out["results"])
