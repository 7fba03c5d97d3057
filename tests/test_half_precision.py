"""float16 and bfloat16 on every device (CPU and, where present, CUDA), and
torch.autocast: the op computes in float32 between half-precision loads and
stores (products accumulated in float32, rounded once), so it is compared with
the float64 reference on the same rounded inputs, with bounds derived from the
dtype (helpers.error_bound); autocast is compared with what it does to the
nn.Linear Sequential in the same process.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

import mlp_ext
from mlp_ext import reference

from conftest import make_inputs
from helpers import HALF_TYPES, ROUNDING, error_bound, relative_error

OPS = torch.ops.mlp_ext
NAMES = ["dx", "dw1", "dw2", "db1", "db2"]
# (n, d, h, q): widths that fill whole vectors (AVX-512: 32 half-precision
# elements), and odd ones that end each row in a partial vector.
SHAPES = [(64, 48, 96, 24), (33, 17, 35, 9)]


def _detached(tensors, dtype):
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]


def _present(tensors):
    return [t for t in tensors if t is not None]


def _outputs_and_gradients(fn, inputs, activation, weight_decay, grad_o, grad_s, **kwargs):
    o, s = fn(*inputs, activation=activation, weight_decay=weight_decay, **kwargs)
    grads = torch.autograd.grad((o, s), _present(inputs), (grad_o, grad_s))
    return [o, s, *grads]


def _problem(device, dtype, shape, bias=True):
    n, d, h, q = shape
    inputs = _detached(make_inputs(n=n, d=d, h=h, q=q, bias=bias, device=device), dtype)
    grad_o = torch.randn(n, q, device=device).to(dtype)
    grad_s = torch.randn((), device=device).to(dtype)
    return inputs, grad_o, grad_s


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=["whole-vectors", "partial-vectors"])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_TYPES])
def test_matches_float64_reference(device, activation, dtype, shape, bias, weight_decay):
    """o, s and every gradient against reference.fused_mlp in float64 on the same
    (rounded) inputs: no further from it than 3x what torch's own ops reach in the
    same dtype, plus rounding (helpers.error_bound); every result in the inputs' dtype."""
    inputs, grad_o, grad_s = _problem(device, dtype, shape, bias)
    ours = _outputs_and_gradients(mlp_ext.fused_mlp, inputs, activation, weight_decay, grad_o, grad_s)
    eager = _outputs_and_gradients(reference.fused_mlp, _detached(inputs, dtype), activation,
                                   weight_decay, grad_o, grad_s)
    exact = _outputs_and_gradients(reference.fused_mlp, _detached(inputs, torch.float64),
                                   activation, weight_decay, grad_o.double(), grad_s.double())
    names = ["o", "s"] + [name for name, t in zip(NAMES, inputs) if t is not None]
    for name, mine, theirs, truth in zip(names, ours, eager, exact):
        assert mine.dtype == dtype and mine.shape == truth.shape, (name, mine.dtype, mine.shape)
        bound = error_bound(theirs, truth, dtype)
        assert relative_error(mine, truth) <= bound, (name, relative_error(mine, truth), bound)


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_s_is_the_penalty_rounded_once(device, dtype):
    """s = weight_decay/2 (||w1||^2 + ||w2||^2), summed in double and rounded once
    to the weights' dtype (as on CUDA): within half a unit in the last place."""
    _, w1, w2, _, _ = _detached(make_inputs(d=300, h=200, q=50, device=device), dtype)
    _, s = mlp_ext.fused_mlp(torch.randn(2, 300, device=device).to(dtype), w1, w2,
                             weight_decay=0.7)
    exact = 0.35 * (w1.double().square().sum() + w2.double().square().sum())
    assert s.dtype == dtype
    assert relative_error(s, exact) <= ROUNDING[dtype] / 4


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_save_hidden_false_and_inference_are_bitwise_the_training_forward(device, dtype):
    """Without a saved h the backward recomputes phi(z) with the forward's kernel,
    and the inference op (no grad) writes h over z with the same kernel: both give
    the same bits as the training path."""
    inputs, grad_o, grad_s = _problem(device, dtype, (300, 24, 40, 8))
    results = [
        _outputs_and_gradients(mlp_ext.fused_mlp, inputs, "gelu", 0.01, grad_o, grad_s,
                               save_hidden=save_hidden)
        for save_hidden in (True, False)]
    for a, b in zip(*results):
        assert torch.equal(a, b)
    with torch.no_grad():
        o, s = mlp_ext.fused_mlp(*inputs, activation="gelu", weight_decay=0.01)
    assert torch.equal(o, results[0][0]) and torch.equal(s, results[0][1])


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_dropout_matches_float64_reference_given_the_mask(device, dtype):
    """Hidden-layer dropout in a half type: o, s (forward op) and every gradient
    (backward op, with the forward's mask and save_hidden=False's recomputed h too)
    against the float64 reference given the same mask, within error_bound."""
    inputs, grad_o, grad_s = _problem(device, dtype, (70, 20, 40, 6))
    args = [t.detach() for t in inputs]
    o, s, z, h, mask = OPS.fused_mlp_forward(*args, "gelu", 0.2, 0.3)
    assert mask.dtype == torch.bool and 0 < mask.sum() < mask.numel()
    results = {}
    for name, dt in (("eager", dtype), ("exact", torch.float64)):
        x, w1, w2, b1, b2 = [t.to(dt) for t in args]
        ref_o, ref_s = reference.fused_mlp(x, w1, w2, b1, b2, activation="gelu", weight_decay=0.2,
                                           dropout=0.3, dropout_mask=mask)
        grads = reference.fused_mlp_backward(grad_o.to(dt), x, w1, w2, b1, activation="gelu",
                                             weight_decay=0.2, grad_s=grad_s.to(dt), dropout=0.3,
                                             dropout_mask=mask)
        results[name] = [ref_o, ref_s, *grads]
    for saved_h in (h, None):
        ours = [o, s, *OPS.fused_mlp_backward(grad_o, grad_s, *args[:3], z, saved_h, "gelu", 0.2,
                                              [True] * 5, mask, 0.3)]
        for name, mine, theirs, truth in zip(["o", "s", *NAMES], ours, results["eager"],
                                             results["exact"]):
            assert mine.dtype == dtype, name
            bound = error_bound(theirs, truth, dtype)
            assert relative_error(mine, truth) <= bound, (name, relative_error(mine, truth), bound)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_loss_op_matches_float64_reference(device, dtype, loss):
    """fused_mlp_loss in a half type: J in that dtype (the loss itself taken in
    float32, as torch's losses take it), its gradients within error_bound of the
    float64 composition of reference.fused_mlp and torch's loss."""
    n, q = 40, 6
    inputs, _, _ = _problem(device, dtype, (n, 12, 20, q))
    if loss == "cross_entropy":
        target = torch.randint(0, q, (n,), device=device)
    else:
        target = torch.randn(n, q, device=device).to(dtype)

    def composite(x, w1, w2, b1, b2):
        o, s = reference.fused_mlp(x, w1, w2, b1, b2, activation="silu", weight_decay=0.2)
        t = target if loss == "cross_entropy" else target.to(o.dtype)
        value = F.cross_entropy(o, t) if loss == "cross_entropy" else F.mse_loss(o, t)
        return value + s

    J = mlp_ext.fused_mlp_loss(*inputs[:1], target, *inputs[1:], activation="silu",
                               weight_decay=0.2, loss=loss)
    assert J.dtype == dtype
    ours = [J, *torch.autograd.grad(J, inputs)]
    eager_inputs, exact_inputs = _detached(inputs, dtype), _detached(inputs, torch.float64)
    eager_J, exact_J = composite(*eager_inputs), composite(*exact_inputs)
    eager = [eager_J, *torch.autograd.grad(eager_J, eager_inputs)]
    exact = [exact_J, *torch.autograd.grad(exact_J, exact_inputs)]
    for name, mine, theirs, truth in zip(["J", *NAMES], ours, eager, exact):
        assert mine.dtype == dtype, name
        bound = error_bound(theirs, truth, dtype)
        assert relative_error(mine, truth) <= bound, (name, relative_error(mine, truth), bound)


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_double_backward_matches_float64_reference(device, dtype):
    """Second derivatives (create_graph=True) in a half type: the gradient of
    <v, dJ/dx> with respect to every input, within error_bound of float64."""
    inputs, grad_o, _ = _problem(device, dtype, (24, 10, 16, 5))
    v = torch.randn(24, 10, device=device).to(dtype)

    def second(fn, tensors, g, vec):
        o, s = fn(*tensors, activation="tanh", weight_decay=0.1)
        (dx,) = torch.autograd.grad((o, s), tensors[0], (g, torch.ones_like(s)), create_graph=True)
        # (dx does not depend on b2: its gradient is None.)
        return torch.autograd.grad((dx * vec).sum(), tensors, allow_unused=True)

    ours = second(mlp_ext.fused_mlp, inputs, grad_o, v)
    eager = second(reference.fused_mlp, _detached(inputs, dtype), grad_o, v)
    exact = second(reference.fused_mlp, _detached(inputs, torch.float64), grad_o.double(),
                   v.double())
    assert ours[4] is None and all(t is not None for t in ours[:4])
    for name, mine, theirs, truth in zip(NAMES[:4], ours, eager, exact):
        assert mine.dtype == dtype, name
        bound = error_bound(theirs, truth, dtype)
        assert relative_error(mine, truth) <= bound, (name, relative_error(mine, truth), bound)


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_module_converted_to_half_precision_matches_sequential(device, dtype):
    """model.to(dtype) of a model holding FusedMLP works, and FusedMLP gives what
    the converted nn.Linear Sequential gives, within the dtype's bound."""
    mlp = mlp_ext.FusedMLP(20, 48, 7, activation="gelu", device=device)
    exact = mlp.to_sequential(copy_weights=True).double()
    seq = mlp.to_sequential(copy_weights=True).to(dtype)
    mlp = mlp.to(dtype)
    x = torch.randn(30, 20, device=device).to(dtype)
    o, o_seq, o_exact = mlp(x), seq(x), exact(x.double())
    assert o.dtype == dtype
    assert relative_error(o, o_exact) <= error_bound(o_seq, o_exact, dtype)
    o.float().square().sum().backward()
    o_seq.float().square().sum().backward()
    o_exact.square().sum().backward()
    for p, p_seq, p_exact in zip(mlp.parameters(), seq.parameters(), exact.parameters()):
        assert p.grad.dtype == dtype
        assert relative_error(p.grad, p_exact.grad) <= error_bound(p_seq.grad, p_exact.grad, dtype)


# --- torch.autocast -------------------------------------------------------------------


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.parametrize("activation", ["relu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_autocast_follows_nn_linear(device, dtype, activation, weight_decay):
    """Under torch.autocast(device) FusedMLP runs in autocast's dtype and returns
    float32 gradients for float32 parameters, like the nn.Linear Sequential; both
    are as close to float32 (no autocast) as each other."""
    mlp = mlp_ext.FusedMLP(32, 64, 16, activation=activation, weight_decay=weight_decay,
                           device=device)
    seq = mlp.to_sequential(copy_weights=True)
    exact = mlp.to_sequential(copy_weights=True)
    x = torch.randn(128, 32, device=device)

    def penalty(module):
        return weight_decay / 2 * (module[0].weight.square().sum() + module[2].weight.square().sum())

    with torch.autocast(device, dtype=dtype):
        o_fused, s_fused = mlp(x, return_penalty=True)
        o_seq, s_seq = seq(x), penalty(seq)
    assert o_fused.dtype == o_seq.dtype == dtype
    assert s_fused.dtype == dtype  # s comes from the same fused call
    o_exact, s_exact = exact(x), penalty(exact)

    for o, s in ((o_fused, s_fused), (o_seq, s_seq), (o_exact, s_exact)):
        (o.float().square().mean() + s).backward()
    assert relative_error(o_fused, o_exact) <= error_bound(o_seq, o_exact, dtype)
    assert relative_error(s_fused, s_exact) <= ROUNDING[dtype]
    for p_fused, p_seq, p_exact in zip(mlp.parameters(), seq.parameters(), exact.parameters()):
        assert p_fused.grad.dtype == p_seq.grad.dtype == torch.float32
        assert relative_error(p_fused.grad, p_exact.grad) <= error_bound(p_seq.grad, p_exact.grad,
                                                                        dtype)


@pytest.mark.parametrize("input_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("autocast_dtype", HALF_TYPES)
def test_autocast_casts_the_dtypes_that_nn_linear_casts(device, autocast_dtype, input_dtype):
    """Which dtypes autocast casts is nn.Linear's rule, checked against nn.Linear
    in this process: every floating dtype but float64 goes to the autocast dtype;
    float64 is left alone (and then computes exactly what it computes outside)."""
    inputs = make_inputs(n=6, d=5, h=7, q=3, dtype=input_dtype, device=device, requires_grad=False)
    x, w1, w2, b1, b2 = inputs
    with torch.autocast(device, dtype=autocast_dtype):
        o, s = mlp_ext.fused_mlp(*inputs, activation="silu", weight_decay=0.1)
        linear = F.linear(x, w1, b1)
    assert o.dtype == s.dtype == linear.dtype
    if input_dtype == torch.float64:
        assert o.dtype == torch.float64
        o_plain, s_plain = mlp_ext.fused_mlp(*inputs, activation="silu", weight_decay=0.1)
        assert torch.equal(o, o_plain) and torch.equal(s, s_plain)
    else:
        assert o.dtype == autocast_dtype
        # The same op on inputs cast by hand: bit for bit.
        cast = [t.to(autocast_dtype) for t in inputs]
        o_cast, s_cast = mlp_ext.fused_mlp(*cast, activation="silu", weight_decay=0.1)
        assert torch.equal(o, o_cast) and torch.equal(s, s_cast)


def test_autocast_disabled_or_on_another_device_type_changes_nothing(device):
    inputs = make_inputs(dtype=torch.float32, device=device, requires_grad=False)
    other = "cuda" if device == "cpu" else "cpu"
    contexts = [lambda: torch.autocast(device, enabled=False)]
    if other == "cpu" or torch.cuda.is_available():  # (autocast warns about a missing device)
        contexts.append(lambda: torch.autocast(other, dtype=torch.bfloat16))
    o, _ = mlp_ext.fused_mlp(*inputs)
    for context in contexts:
        with context():
            o_context, _ = mlp_ext.fused_mlp(*inputs)
        assert o_context.dtype == torch.float32 and torch.equal(o, o_context)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_autocast_loss_follows_linear_and_torch_losses(device, dtype, loss):
    """fused_mlp_loss under autocast does what autocast does to the Sequential
    followed by F.cross_entropy / F.mse_loss (which autocast runs in float32):
    o in the autocast dtype, J in float32, float32 gradients for float32
    parameters, each as close to float32 (no autocast) as the Sequential's."""
    n, q = 64, 10
    mlp = mlp_ext.FusedMLP(32, 48, q, activation="relu", weight_decay=0.01, device=device)
    seq = mlp.to_sequential(copy_weights=True)
    exact = mlp.to_sequential(copy_weights=True)
    x = torch.randn(n, 32, device=device)
    target = (torch.randint(0, q, (n,), device=device) if loss == "cross_entropy"
              else torch.randn(n, q, device=device))
    torch_loss = F.cross_entropy if loss == "cross_entropy" else F.mse_loss

    def sequential_objective(module):
        s = 0.005 * (module[0].weight.square().sum() + module[2].weight.square().sum())
        o = module(x)
        return torch_loss(o, target) + s, o

    with torch.autocast(device, dtype=dtype):
        J, o = mlp_ext.fused_mlp_loss(x, target, mlp.fc1.weight, mlp.fc2.weight, mlp.fc1.bias,
                                      mlp.fc2.bias, activation="relu", weight_decay=0.01,
                                      loss=loss, return_output=True)
        J_seq, o_seq = sequential_objective(seq)
    J_exact, _ = sequential_objective(exact)
    assert o.dtype == o_seq.dtype == dtype
    assert J.dtype == J_seq.dtype == torch.float32
    # J: the float32 loss and s rounded once to the autocast dtype.
    assert relative_error(J, J_exact) <= error_bound(J_seq, J_exact, dtype) + ROUNDING[dtype]
    for objective in (J, J_seq, J_exact):
        objective.backward()
    for p, p_seq, p_exact in zip(mlp.parameters(), seq.parameters(), exact.parameters()):
        assert p.grad.dtype == torch.float32
        assert relative_error(p.grad, p_exact.grad) <= error_bound(p_seq.grad, p_exact.grad, dtype)


# --- opcheck and torch.compile ------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_opcheck_half_precision(device, dtype):
    x, w1, w2, b1, b2 = make_inputs(batch_shape=(2, 3), d=5, h=7, q=3, dtype=dtype, device=device)
    opcheck(OPS.fused_mlp.default, (x, w1, w2, b1, b2), {"activation": "gelu", "weight_decay": 0.1})
    args = [t.detach() for t in (x, w1, w2, b1, b2)]
    opcheck(OPS.fused_mlp_forward.default, (*args, "silu", 0.1))
    opcheck(OPS.fused_mlp_inference.default, (*args, "silu", 0.1))
    _, _, z, h, _ = OPS.fused_mlp_forward(*args, "silu", 0.1)
    grad_o = torch.randn(2, 3, 3, device=device).to(dtype)
    grad_s = torch.randn((), device=device).to(dtype)
    for mask in ([True] * 5, [False, True, False, True, False]):
        opcheck(OPS.fused_mlp_backward.default,
                (grad_o, grad_s, *args[:3], z, h, "silu", 0.1, mask))
    target = torch.randint(0, 3, (2, 3), device=device)
    opcheck(OPS.fused_mlp_loss.default, (x, target, w1, w2, b1, b2), {"activation": "relu"})


def _loss(x, w1, w2, b1, b2):
    o, s = mlp_ext.fused_mlp(x, w1, w2, b1, b2, activation="gelu_tanh", weight_decay=0.05)
    return o.float().square().mean() + s


def _check_compiled_against_eager(compiled, inputs, context):
    """Loss and gradients of the compiled step against eager. Both call the same
    kernels; only the code around them (inductor's) may round differently, by a
    unit in the last place of the half-precision gradients it hands over."""
    with context():
        loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    with context():
        loss_eager = _loss(*inputs)
    grads_eager = torch.autograd.grad(loss_eager, inputs)
    assert relative_error(loss, loss_eager) <= 1e-5
    for a, b in zip(grads, grads_eager):
        assert a.dtype == b.dtype
        assert relative_error(a, b) <= 2e-2


@pytest.mark.parametrize("dtype", HALF_TYPES)
def test_torch_compile_fullgraph_half_precision(device, dtype):
    torch._dynamo.reset()
    compiled = torch.compile(_loss, fullgraph=True)
    inputs = make_inputs(n=16, d=8, h=32, q=4, dtype=dtype, device=device)
    _check_compiled_against_eager(compiled, inputs, torch.enable_grad)


def test_torch_compile_fullgraph_under_autocast(device):
    torch._dynamo.reset()
    compiled = torch.compile(_loss, fullgraph=True)
    inputs = make_inputs(n=16, d=8, h=32, q=4, dtype=torch.float32, device=device)
    _check_compiled_against_eager(
        compiled, inputs, lambda: torch.autocast(device, dtype=torch.bfloat16))
