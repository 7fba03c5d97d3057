"""fused_mlp_loss: J = L + s in one forward op and one backward op, against the
composition fused_mlp + torch's loss."""
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.library import opcheck

import mlp_ext
from mlp_ext.memory import saved_for_backward

from conftest import make_inputs
from helpers import SavedTensors

OPS = torch.ops.mlp_ext
# (loss, kind of target): cross-entropy takes class indices or class probabilities.
TARGETS = [("cross_entropy", "indices"), ("cross_entropy", "probabilities"), ("mse", "values")]


def make_target(kind, batch_shape, q, *, dtype=torch.float64, device="cpu"):
    if kind == "indices":
        return torch.randint(0, q, batch_shape, device=device)
    if kind == "probabilities":
        return torch.softmax(torch.randn(*batch_shape, q, dtype=dtype, device=device), -1)
    return torch.randn(*batch_shape, q, dtype=dtype, device=device)


def composition(x, target, w1, w2, b1=None, b2=None, *, activation="relu", weight_decay=0.0,
                loss="cross_entropy", reduction="mean"):
    """fused_mlp + torch's loss on the rows of o (classes last), + s."""
    o, s = mlp_ext.fused_mlp(x, w1, w2, b1, b2, activation=activation,
                             weight_decay=weight_decay)
    q = w2.shape[0]
    if loss == "cross_entropy":
        rows = target.reshape(-1) if not target.is_floating_point() else target.reshape(-1, q)
        return F.cross_entropy(o.reshape(-1, q), rows, reduction=reduction) + s, o
    return F.mse_loss(o, target, reduction=reduction) + s, o


@pytest.mark.parametrize("weight_decay", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss,kind", TARGETS)
def test_gradcheck_and_gradgradcheck(device, loss, kind, reduction, bias, weight_decay):
    inputs = make_inputs(batch_shape=(2, 3), bias=bias, device=device)
    target = make_target(kind, (2, 3), 3, device=device)

    def f(*args):
        return mlp_ext.fused_mlp_loss(args[0], target, *args[1:], activation="gelu",
                                      weight_decay=weight_decay, loss=loss,
                                      reduction=reduction)

    assert gradcheck(f, inputs)
    assert gradgradcheck(f, inputs)


@pytest.mark.parametrize("activation", mlp_ext.ACTIVATIONS)
def test_gradcheck_every_activation_with_the_output(device, activation):
    """J and o both reach the result (o used for a metric-like extra term)."""
    inputs = make_inputs(device=device)
    target = make_target("indices", (5,), 3, device=device)

    def f(*args):
        J, o = mlp_ext.fused_mlp_loss(args[0], target, *args[1:], activation=activation,
                                      weight_decay=0.1, return_output=True)
        return J, o

    assert gradcheck(f, inputs)


@pytest.mark.parametrize("batch_shape", [(7,), (2, 3), ()], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("loss,kind", TARGETS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_equals_the_composition(device, loss, kind, reduction, dtype, batch_shape):
    """Value, o and every gradient; () is a single example x of shape (d,)."""
    inputs = make_inputs(batch_shape=batch_shape, d=9, h=16, q=5, dtype=dtype, device=device)
    target = make_target(kind, batch_shape, 5, dtype=dtype, device=device)
    kwargs = dict(activation="silu", weight_decay=0.05, loss=loss, reduction=reduction)
    J, o = mlp_ext.fused_mlp_loss(inputs[0], target, *inputs[1:], return_output=True, **kwargs)
    J_ref, o_ref = composition(inputs[0], target, *inputs[1:], **kwargs)
    assert J.shape == () and J.dtype == dtype and o.shape == (*batch_shape, 5)
    torch.testing.assert_close(J, J_ref)
    torch.testing.assert_close(o, o_ref)
    for a, b in zip(torch.autograd.grad(J, inputs), torch.autograd.grad(J_ref, inputs)):
        torch.testing.assert_close(a, b)


def test_float32_against_float64_reference(device):
    """float32 J and gradients within float32 rounding of the float64 composition."""
    inputs64 = make_inputs(batch_shape=(64,), d=32, h=128, q=10, device=device)
    target = make_target("indices", (64,), 10, device=device)
    inputs32 = [t.detach().float().requires_grad_() for t in inputs64]
    J = mlp_ext.fused_mlp_loss(inputs32[0], target, *inputs32[1:], activation="tanh",
                               weight_decay=0.01)
    J_ref, _ = composition(inputs64[0], target, *inputs64[1:], activation="tanh",
                           weight_decay=0.01)
    torch.testing.assert_close(J, J_ref.float(), rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(J, inputs32), torch.autograd.grad(J_ref, inputs64)):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5)


def test_scaled_objective_and_gradient_through_o(device):
    """g_J != 1 (loss scaling) and a second term on o: G_O = g_J dL/do + dK/do."""
    inputs = make_inputs(device=device)
    target = make_target("indices", (5,), 3, device=device)
    J, o = mlp_ext.fused_mlp_loss(inputs[0], target, *inputs[1:], weight_decay=0.1,
                                  activation="tanh", return_output=True)
    J_ref, o_ref = composition(inputs[0], target, *inputs[1:], weight_decay=0.1,
                               activation="tanh")
    ours = torch.autograd.grad(3.5 * J + o.square().sum(), inputs)
    expected = torch.autograd.grad(3.5 * J_ref + o_ref.square().sum(), inputs)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b)
    # Only o used: no decay term (s is not part of o's graph).
    J, o = mlp_ext.fused_mlp_loss(inputs[0], target, *inputs[1:], weight_decay=0.1,
                                  activation="tanh", return_output=True)
    o_ref, _ = mlp_ext.fused_mlp(*inputs, activation="tanh", weight_decay=0.1)
    for a, b in zip(torch.autograd.grad(o.sum(), inputs), torch.autograd.grad(o_ref.sum(), inputs)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss,kind", TARGETS)
def test_empty_batch_matches_torch(loss, kind, reduction):
    inputs = make_inputs(batch_shape=(0,))
    target = make_target(kind, (0,), 3)
    J = mlp_ext.fused_mlp_loss(inputs[0], target, *inputs[1:], loss=loss, reduction=reduction,
                               weight_decay=0.1)
    J_ref, _ = composition(inputs[0], target, *inputs[1:], loss=loss, reduction=reduction,
                           weight_decay=0.1)
    torch.testing.assert_close(J, J_ref, equal_nan=True)
    grads = torch.autograd.grad(J, inputs[1:], allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() or J.isnan() for g in grads)


@pytest.mark.parametrize("save_hidden", [True, False])
def test_saves_dloss_do_instead_of_o(save_hidden):
    """What the node keeps: saved_for_backward(loss=True), dL/do among it, never o."""
    x, w1, w2, b1, b2 = make_inputs(batch_shape=(6,), dtype=torch.float32)
    target = make_target("indices", (6,), 3)
    with SavedTensors() as saved:
        J, o = mlp_ext.fused_mlp_loss(x, target, w1, w2, b1, b2, return_output=True,
                                      save_hidden=save_hidden)
    packed = saved.tensors
    expected = saved_for_backward(bias=True, save_hidden=save_hidden, loss=True)
    assert len(packed) == len(expected)
    o_storage = o.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() != o_storage for t in packed)
    dloss_do = packed[0]
    torch.testing.assert_close(dloss_do, (torch.softmax(o, -1) - F.one_hot(target, 3)) / 6)
    references = {"x": x, "W1": w1, "W2": w2, "b1": b1, "y": target, "b2": b2}
    for t, entry in zip(packed, expected):
        if entry.kind != "activation":
            assert t.data_ptr() == references[entry.name].data_ptr(), entry


def test_save_hidden_false_bitwise_identical():
    inputs = make_inputs(batch_shape=(9,), d=7, h=33, q=4, dtype=torch.float32)
    target = make_target("indices", (9,), 4)
    grads = [torch.autograd.grad(
        mlp_ext.fused_mlp_loss(inputs[0], target, *inputs[1:], activation="gelu",
                               weight_decay=0.1, save_hidden=save_hidden), inputs)
        for save_hidden in (True, False)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("loss,kind", TARGETS)
def test_opcheck(device, loss, kind, bias):
    x, w1, w2, b1, b2 = make_inputs(batch_shape=(2, 3), d=5, h=7, q=3, bias=bias,
                                    dtype=torch.float32, device=device)
    target = make_target(kind, (2, 3), 3, dtype=torch.float32, device=device)
    opcheck(OPS.fused_mlp_loss.default, (x, target, w1, w2, b1, b2),
            {"activation": "tanh", "weight_decay": 0.1, "loss": loss, "reduction": "sum"})
    plain = [None if t is None else t.detach() for t in (x, w1, w2, b1, b2)]
    forward_args = (plain[0], target, *plain[1:], "tanh", 0.1, loss, "mean")
    opcheck(OPS.fused_mlp_loss_forward.default, (*forward_args, False))
    forward_args = (*forward_args, True)
    opcheck(OPS.fused_mlp_loss_forward.default, forward_args)
    _, _, dloss_do, z, h, _ = OPS.fused_mlp_loss_forward(*forward_args)
    for grad_J, grad_o in [(torch.tensor(2.0, device=device), None),
                           (None, torch.randn(2, 3, 3, device=device)),
                           (torch.tensor(1.0, device=device), torch.randn(2, 3, 3, device=device))]:
        for hidden in (h, None):
            opcheck(OPS.fused_mlp_loss_backward.default,
                    (grad_J, grad_o, dloss_do, plain[0], plain[1], plain[2], z, hidden, "tanh",
                     0.1, [True, True, True, bias, bias]))


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("loss,kind", [("cross_entropy", "indices"), ("mse", "values")])
def test_torch_compile_fullgraph(device, loss, kind, dynamic):
    torch._dynamo.reset()
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")

    def step(x, target, w1, w2, b1, b2):
        J, o = mlp_ext.fused_mlp_loss(x, target, w1, w2, b1, b2, activation="gelu",
                                      weight_decay=0.05, loss=loss, return_output=True)
        return J, o.argmax(-1)

    compiled = torch.compile(step, fullgraph=True, dynamic=dynamic, backend=counter)
    for n in (8, 13):
        inputs = make_inputs(batch_shape=(n,), d=6, h=10, q=4, dtype=torch.float32,
                             device=device)
        target = make_target(kind, (n,), 4, dtype=torch.float32, device=device)
        J, predicted = compiled(inputs[0], target, *inputs[1:])
        J_ref, predicted_ref = step(inputs[0], target, *inputs[1:])
        torch.testing.assert_close(J, J_ref)
        assert torch.equal(predicted, predicted_ref)
        for a, b in zip(torch.autograd.grad(J, inputs), torch.autograd.grad(J_ref, inputs)):
            torch.testing.assert_close(a, b)
    assert counter.frame_count >= 1


def test_one_forward_op_and_one_backward_op():
    inputs = make_inputs(batch_shape=(16,), d=8, h=32, q=4, dtype=torch.float32)
    target = make_target("indices", (16,), 4)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        J = mlp_ext.fused_mlp_loss(inputs[0], target, *inputs[1:], weight_decay=0.1)
        torch.autograd.grad(J, inputs)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts["mlp_ext::fused_mlp_loss_forward"] == 1
    assert counts["mlp_ext::fused_mlp_loss_backward"] == 1
    assert "aten::log_softmax" in counts and "aten::_log_softmax_backward_data" not in counts


# --- bad input -------------------------------------------------------------------------

def _call(target, loss="cross_entropy", reduction="mean", x=None):
    x_, w1, w2, b1, b2 = make_inputs(batch_shape=(4,), dtype=torch.float32, requires_grad=False)
    return mlp_ext.fused_mlp_loss(x if x is not None else x_, target, w1, w2, b1, b2,
                                  loss=loss, reduction=reduction)


@pytest.mark.parametrize("target,loss,exc,fragments", [
    (torch.zeros(5, dtype=torch.long), "cross_entropy", RuntimeError,
     ["class-index target of shape [4]", "target.shape = [5]"]),
    (torch.zeros(4, 1, dtype=torch.long), "cross_entropy", RuntimeError,
     ["class-index target of shape [4]", "[4, 1]"]),
    (torch.zeros(4, dtype=torch.int32), "cross_entropy", TypeError,
     ["int64 (class indices)", "Int"]),
    (torch.zeros(4, 3, dtype=torch.float64), "cross_entropy", TypeError,
     ["dtype Float", "Double"]),
    (torch.zeros(4, 2), "cross_entropy", RuntimeError,
     ["class-probability target of shape [4, 3]", "[4, 2]"]),
    (torch.zeros(4), "mse", RuntimeError, ["target of shape [4, 3]", "target.shape = [4]"]),
    (torch.zeros(4, 3, dtype=torch.long), "mse", TypeError, ["dtype Float", "Long"]),
    (torch.tensor([0, 1, 3, 2]), "cross_entropy", IndexError, ["[0, 3)", "[0, 3]"]),
    (torch.tensor([0, -1, 2, 2]), "cross_entropy", IndexError, ["[0, 3)", "[-1, 2]"]),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_bad_target(target, loss, exc, fragments):
    with pytest.raises(exc) as info:
        _call(target, loss)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_unknown_loss_and_reduction():
    with pytest.raises(ValueError, match='unknown loss "nll".*"cross_entropy", "mse"'):
        _call(torch.zeros(4, dtype=torch.long), loss="nll")
    with pytest.raises(ValueError, match='unknown reduction "none".*"mean", "sum"'):
        _call(torch.zeros(4, dtype=torch.long), reduction="none")


def test_target_on_another_device():
    with pytest.raises(RuntimeError, match="target on the device of x"):
        _call(torch.zeros(4, dtype=torch.long, device="meta"))


def test_bad_x_is_reported_like_fused_mlp():
    with pytest.raises(RuntimeError, match="x.shape\\[-1\\] = 5 does not match in_features"):
        _call(torch.zeros(4, dtype=torch.long), x=torch.randn(4, 5))


def test_target_requiring_grad_is_refused():
    target = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(NotImplementedError, match="target requires grad"):
        _call(target, loss="mse")
    with torch.no_grad():
        _call(target, loss="mse")  # fine without autograd
    _call(target.detach(), loss="mse")


@pytest.mark.parametrize("loss,kind", TARGETS)
def test_evaluation_does_not_form_the_gradient(loss, kind):
    """Without autograd (no_grad, or nothing requires grad) the same J and o, and dL/do is
    not formed."""
    inputs = make_inputs(batch_shape=(8,), dtype=torch.float32)
    target = make_target(kind, (8,), 3, dtype=torch.float32)
    J, o = mlp_ext.fused_mlp_loss(inputs[0], target, *inputs[1:], loss=loss, weight_decay=0.1,
                                  return_output=True)
    with torch.no_grad(), torch.profiler.profile() as prof:
        J_eval, o_eval = mlp_ext.fused_mlp_loss(inputs[0], target, *inputs[1:], loss=loss,
                                                weight_decay=0.1, return_output=True)
    assert torch.equal(J, J_eval) and torch.equal(o, o_eval) and not J_eval.requires_grad
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts["mlp_ext::fused_mlp_loss_forward"] == 1
    assert not {"aten::exp_", "aten::scatter_add_", "aten::mul_"} & set(counts), counts
    detached = [t.detach() for t in inputs]
    J_plain = mlp_ext.fused_mlp_loss(detached[0], target, *detached[1:], loss=loss,
                                     weight_decay=0.1)
    assert torch.equal(J, J_plain) and J_plain.grad_fn is None


@pytest.mark.parametrize("which", ["b1 only", "b2 only"])
def test_one_bias_only(which):
    """needs_input_grad skips absent biases: b2 is the 5th tensor without b1."""
    x, w1, w2, b1, b2 = make_inputs()
    b1, b2 = (b1, None) if which == "b1 only" else (None, b2)
    target = make_target("indices", (5,), 3)
    inputs = [t for t in (x, w1, w2, b1, b2) if t is not None]

    def f(x, w1, w2, bias):
        biases = (bias, None) if which == "b1 only" else (None, bias)
        return mlp_ext.fused_mlp_loss(x, target, w1, w2, *biases, activation="tanh",
                                      weight_decay=0.1)

    assert gradcheck(f, inputs) and gradgradcheck(f, inputs)
    J = mlp_ext.fused_mlp_loss(x, target, w1, w2, b1, b2, activation="tanh", weight_decay=0.1)
    J_ref, _ = composition(x, target, w1, w2, b1, b2, activation="tanh", weight_decay=0.1)
    for a, b in zip(torch.autograd.grad(J, inputs), torch.autograd.grad(J_ref, inputs)):
        torch.testing.assert_close(a, b)


# --- the autograd node (csrc/autograd.cpp, FusedMLPLossBackward) ------------------------

BIASES = {"both": (True, True), "b1 only": (True, False), "b2 only": (False, True),
          "none": (False, False)}


def _with_biases(which, **kwargs):
    """make_inputs with the biases `which` names (the others None)."""
    x, w1, w2, b1, b2 = make_inputs(**kwargs)
    has_b1, has_b2 = BIASES[which]
    return x, w1, w2, b1 if has_b1 else None, b2 if has_b2 else None


@pytest.mark.parametrize("which", BIASES)
def test_one_node_whose_next_functions_follow_the_inputs(which):
    """J and o share one node; its next edges are those of x, target, w1, w2, b1, b2 in
    that order (target's and an absent bias's: None), so output i is input i's gradient."""
    x0, w1, w2, b1, b2 = _with_biases(which)
    x = x0 * 2  # not a leaf: its edge is its grad_fn
    target = make_target("indices", (5,), 3)
    J, o = mlp_ext.fused_mlp_loss(x, target, w1, w2, b1, b2, return_output=True)
    node = J.grad_fn
    assert o.grad_fn is node and node.name() == "FusedMLPLossBackward"
    edges = node.next_functions
    assert len(edges) == 6 and edges[0] == (x.grad_fn, 0) and edges[1] == (None, 0)
    for (fn, nr), leaf in zip(edges[2:], (w1, w2, b1, b2)):
        if leaf is None:
            assert fn is None
        else:
            assert fn.name() == "torch::autograd::AccumulateGrad" and fn.variable is leaf and nr == 0


@pytest.mark.parametrize("which", BIASES)
def test_saved_tensor_hooks_see_the_saved_tensors_in_order(which):
    """Pack order dL/do, x, w1, w2, b1, z, h, y, b2, mask (mlp_ext.memory.saved_for_backward,
    with dropout); an absent bias is not packed; each saved tensor unpacked once by backward."""
    x, w1, w2, b1, b2 = _with_biases(which, batch_shape=(6,), dtype=torch.float32)
    target = make_target("indices", (6,), 3)
    packed, unpacked = [], []

    def pack(t):
        packed.append(t)
        return len(packed) - 1

    def unpack(i):
        unpacked.append(i)
        return packed[i]

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        J = mlp_ext.fused_mlp_loss(x, target, w1, w2, b1, b2, dropout=0.5)
    names = ["dL/do", "x", "W1", "W2"] + (["b1"] if b1 is not None else []) + ["z", "h", "y"] \
        + (["b2"] if b2 is not None else []) + ["mask"]
    assert len(packed) == len(names)
    references = {"x": x, "W1": w1, "W2": w2, "b1": b1, "y": target, "b2": b2}
    for t, name in zip(packed, names):
        if name in references:
            assert t is references[name], name
    assert packed[-1].dtype == torch.bool and packed[0].shape == (6, 3)
    J.backward()
    assert sorted(unpacked) == list(range(len(packed)))


def test_saved_tensors_are_released_after_backward():
    """backward frees what the node saved: a second backward raises torch's error, unless
    the first kept the graph (retain_graph=True), when it gives the same gradients."""
    inputs = make_inputs()
    target = make_target("indices", (5,), 3)
    J = mlp_ext.fused_mlp_loss(inputs[0], target, *inputs[1:], weight_decay=0.1)
    first = torch.autograd.grad(J, inputs, retain_graph=True)
    second = torch.autograd.grad(J, inputs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(J, inputs)


@pytest.mark.parametrize("needed", ["x", "w1", "w2", "b1", "b2", "w2 b2", "x b1"])
def test_gradients_of_only_the_inputs_that_require_grad(needed):
    """Each subset of the inputs requiring grad gets the composition's gradients; the
    others none (the node asks the backward op for the needed ones only)."""
    inputs = [t.detach() for t in make_inputs()]
    names = ["x", "w1", "w2", "b1", "b2"]
    for name, t in zip(names, inputs):
        t.requires_grad_(name in needed.split())
    target = make_target("probabilities", (5,), 3)
    chosen = [t for t in inputs if t.requires_grad]
    J = mlp_ext.fused_mlp_loss(inputs[0], target, *inputs[1:], activation="tanh",
                               weight_decay=0.1)
    J_ref, _ = composition(inputs[0], target, *inputs[1:], activation="tanh", weight_decay=0.1)
    for a, b in zip(torch.autograd.grad(J, chosen), torch.autograd.grad(J_ref, chosen)):
        torch.testing.assert_close(a, b)
    J = mlp_ext.fused_mlp_loss(inputs[0], target, *inputs[1:])
    J.backward()
    assert all((t.grad is not None) == t.requires_grad for t in inputs)


def test_in_place_edit_of_a_saved_input_raises_at_backward():
    x, w1, w2, b1, b2 = make_inputs()
    target = make_target("indices", (5,), 3)
    J = mlp_ext.fused_mlp_loss(x, target, w1, w2, b1, b2)
    with torch.no_grad():
        w2.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        J.backward()


def test_backward_from_several_threads_at_once():
    """The node locks its mutex in apply (as FusedMLPBackward): concurrent backward
    passes through one retained graph give the same gradients."""
    import threading

    inputs = make_inputs(batch_shape=(64,), d=16, h=32, q=8)
    target = make_target("indices", (64,), 8)
    J = mlp_ext.fused_mlp_loss(inputs[0], target, *inputs[1:], weight_decay=0.1)
    expected = torch.autograd.grad(J, inputs, retain_graph=True)
    results = [None] * 4

    def run(i):
        results[i] = torch.autograd.grad(J, inputs, retain_graph=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for grads in results:
        for a, b in zip(grads, expected):
            assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.*:DeprecationWarning")  # torch's forward_ad import
@pytest.mark.parametrize("dual", ["x", "target"])
def test_forward_mode_ad_raises_clearly(dual):
    import torch.autograd.forward_ad as fwAD
    x, w1, w2, b1, b2 = make_inputs(requires_grad=False)
    target = make_target("values", (5,), 3)
    with fwAD.dual_level():
        if dual == "x":
            x = fwAD.make_dual(x, torch.randn_like(x))
        else:
            target = fwAD.make_dual(target, torch.randn_like(target))
        with pytest.raises(NotImplementedError,
                           match="fused_mlp_loss: forward-mode AD is not implemented"):
            mlp_ext.fused_mlp_loss(x, target, w1, w2, b1, b2, loss="mse")


def test_functorch_transforms_are_refused():
    """As for a torch::autograd::Function: functorch cannot see into a C++ node."""
    x, w1, w2, b1, b2 = make_inputs(requires_grad=False)
    target = make_target("indices", (5,), 3)
    with pytest.raises(RuntimeError, match="functorch"):
        torch.func.grad(lambda w: mlp_ext.fused_mlp_loss(x, target, w, w2, b1, b2))(w1)
