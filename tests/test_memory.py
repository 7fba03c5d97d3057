"""memory_footprint against what a real step allocates and what autograd really saves,
and the save_hidden=False mode (z saved, h recomputed in backward)."""
import pytest
import torch

import mlp_ext
from mlp_ext.memory import saved_for_backward

from helpers import SavedTensors

SHAPES = [  # (leading shape of x, in, hidden, out)
    ((7,), 5, 6, 3),
    ((2, 3), 4, 8, 2),
    ((33,), 17, 65, 9),   # odd widths: vector tails in the kernels
    ((1,), 1, 1, 1),
    ((0,), 4, 5, 3),      # an empty batch
]


@pytest.mark.parametrize("save_hidden", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_footprint_of_a_training_step_to_the_byte(shape, dtype, bias, save_hidden):
    batch, d, h, q = shape
    mlp = mlp_ext.FusedMLP(d, h, q, bias=bias, weight_decay=0.01, save_hidden=save_hidden,
                           dtype=dtype)
    x = torch.randn(*batch, d, dtype=dtype)
    with SavedTensors() as saved:
        o, s = mlp(x, return_penalty=True)
    (o.square().sum() + s).backward()

    fp = mlp_ext.memory_footprint(batch, d, h, q, dtype=dtype, bias=bias, training=True,
                                  save_hidden=save_hidden)
    params = list(mlp.parameters())
    assert fp.saved_activations == saved.owned_bytes(x, *params)
    assert fp.parameters == sum(p.untyped_storage().nbytes() for p in params)
    assert fp.gradients == sum(p.grad.untyped_storage().nbytes() for p in params)
    assert fp.inputs == x.untyped_storage().nbytes()
    assert fp.outputs == o.untyped_storage().nbytes() + s.untyped_storage().nbytes()
    assert fp.total == sum(fp)


@pytest.mark.parametrize("save_hidden", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_saved_tensors_are_the_documented_ones(bias, save_hidden):
    """saved_for_backward (also used by mlp_ext.graph) lists what the node saves, in order."""
    batch, d, h, q = (6,), 3, 4, 2
    x = torch.randn(*batch, d, requires_grad=True)
    mlp = mlp_ext.FusedMLP(d, h, q, bias=bias, save_hidden=save_hidden)
    with SavedTensors() as saved:
        mlp(x)
    expected = saved_for_backward(bias=bias, save_hidden=save_hidden)
    assert len(saved.tensors) == len(expected)
    shapes = {"x": (*batch, d), "W1": (h, d), "W2": (q, h), "b1": (h,), "z": (6, h),
              "h": (6, h)}
    references = {"x": x, "W1": mlp.fc1.weight, "W2": mlp.fc2.weight, "b1": mlp.fc1.bias}
    for t, entry in zip(saved.tensors, expected):
        assert tuple(t.shape) == shapes[entry.name], entry
        if entry.kind == "activation":
            assert all(t.untyped_storage().data_ptr() != r.untyped_storage().data_ptr()
                       for r in references.values() if r is not None)
        else:
            assert t.data_ptr() == references[entry.name].data_ptr(), entry


def test_h_saved_is_phi_of_z():
    x = torch.randn(5, 3)
    mlp = mlp_ext.FusedMLP(3, 4, 2, activation="gelu")
    with SavedTensors() as saved:
        mlp(x)
    z, h = saved.tensors[-2:]
    torch.testing.assert_close(h, mlp_ext.reference.phi("gelu")(z))
    torch.testing.assert_close(z, x @ mlp.fc1.weight.T + mlp.fc1.bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prediction_saves_nothing(dtype):
    mlp = mlp_ext.FusedMLP(4, 8, 3, dtype=dtype)
    x = torch.randn(10, 4, dtype=dtype)
    with torch.no_grad(), SavedTensors() as saved:
        o = mlp(x)
    fp = mlp_ext.memory_footprint(10, 4, 8, 3, dtype=dtype, training=False)
    assert saved.tensors == [] and fp.saved_activations == 0 and fp.gradients == 0
    assert fp.outputs == o.nbytes + dtype.itemsize  # o and the 0-dim s
    train = mlp_ext.memory_footprint(10, 4, 8, 3, dtype=dtype, training=True)
    assert train.total - fp.total == train.gradients + train.saved_activations


def test_save_hidden_false_saves_n_times_hidden_elements_less():
    n, d, h, q = 64, 16, 256, 8
    measured = {}
    for save_hidden in (True, False):
        mlp = mlp_ext.FusedMLP(d, h, q, save_hidden=save_hidden)
        x = torch.randn(n, d)
        with SavedTensors() as saved:
            mlp(x)
        measured[save_hidden] = saved.owned_bytes(x, *mlp.parameters())
    assert measured[True] == 2 * n * h * 4
    assert measured[False] == n * h * 4


@pytest.mark.parametrize("weight_decay", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", mlp_ext.ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_hidden_false_gives_bitwise_identical_gradients(dtype, activation, bias,
                                                             weight_decay):
    """h recomputed in backward by the forward's own kernel: the same bits."""
    x = torch.randn(3, 11, 13, dtype=dtype, requires_grad=True)
    w1 = torch.randn(37, 13, dtype=dtype, requires_grad=True)
    w2 = torch.randn(5, 37, dtype=dtype, requires_grad=True)
    b1 = torch.randn(37, dtype=dtype, requires_grad=True) if bias else None
    b2 = torch.randn(5, dtype=dtype, requires_grad=True) if bias else None
    inputs = [t for t in (x, w1, w2, b1, b2) if t is not None]
    grad_o = torch.randn(3, 11, 5, dtype=dtype)
    results = []
    for save_hidden in (True, False):
        o, s = mlp_ext.fused_mlp(x, w1, w2, b1, b2, activation=activation,
                                 weight_decay=weight_decay, save_hidden=save_hidden)
        results.append((o, s, torch.autograd.grad((o * grad_o).sum() + 0.7 * s, inputs)))
    (o1, s1, g1), (o2, s2, g2) = results
    assert torch.equal(o1, o2) and torch.equal(s1, s2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_save_hidden_on_the_module():
    seq = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.SiLU(), torch.nn.Linear(6, 2))
    lean = mlp_ext.FusedMLP.from_sequential(seq, save_hidden=False)
    assert lean.save_hidden is False and "save_hidden=False" in repr(lean)
    assert mlp_ext.FusedMLP(4, 6, 2).save_hidden is True
    x = torch.randn(3, 4)
    lean(x).sum().backward()
    grads = [p.grad.clone() for p in seq.parameters()]
    seq.zero_grad()
    mlp_ext.FusedMLP.from_sequential(seq)(x).sum().backward()
    for a, p in zip(grads, seq.parameters()):
        assert torch.equal(a, p.grad)


def test_backward_op_recomputes_h_when_absent():
    """The op level: fused_mlp_backward with h=None equals it with the saved h."""
    ops = torch.ops.mlp_ext
    x, w1, w2, b1 = torch.randn(6, 5), torch.randn(7, 5), torch.randn(3, 7), torch.randn(7)
    _, _, z, h, _ = ops.fused_mlp_forward(x, w1, w2, b1, None, "sigmoid", 0.1)
    z_before = z.clone()
    grad_o, grad_s = torch.randn(6, 3), torch.tensor(0.5)
    mask = [True, True, True, True, True]
    with_h = ops.fused_mlp_backward(grad_o, grad_s, x, w1, w2, z, h, "sigmoid", 0.1, mask)
    without = ops.fused_mlp_backward(grad_o, grad_s, x, w1, w2, z, None, "sigmoid", 0.1, mask)
    assert torch.equal(z, z_before)  # the saved z is left as it was
    for a, b in zip(with_h, without):
        assert torch.equal(a, b)
    torch.library.opcheck(ops.fused_mlp_backward.default,
                          (grad_o, grad_s, x, w1, w2, z, None, "sigmoid", 0.1, mask))


def test_save_hidden_false_double_backward():
    from torch.autograd import gradgradcheck
    inputs = [torch.randn(*s, dtype=torch.float64, requires_grad=True)
              for s in ((4, 3), (5, 3), (2, 5), (5,), (2,))]
    assert gradgradcheck(lambda *a: mlp_ext.fused_mlp(*a, activation="tanh", weight_decay=0.1,
                                                      save_hidden=False), inputs)


def test_save_hidden_false_under_torch_compile():
    torch._dynamo.reset()
    mlp = mlp_ext.FusedMLP(6, 10, 4, activation="gelu", save_hidden=False)
    x = torch.randn(9, 6)
    compiled = torch.compile(mlp, fullgraph=True)
    compiled(x).sum().backward()
    grads = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    mlp(x).sum().backward()
    for a, p in zip(grads, mlp.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_footprint_formula_and_errors():
    fp = mlp_ext.memory_footprint(32, 784, 256, 10, dtype=torch.float32)
    assert fp.parameters == (256 * 784 + 10 * 256 + 256 + 10) * 4
    assert fp.saved_activations == 2 * 32 * 256 * 4
    assert fp.inputs == 32 * 784 * 4 and fp.outputs == (32 * 10 + 1) * 4
    assert "saved_activations" in str(fp) and "total" in str(fp)
    half = mlp_ext.memory_footprint((4, 8), 784, 256, 10, dtype=torch.bfloat16, bias=False,
                                    save_hidden=False)
    assert half.saved_activations == 32 * 256 * 2 and half.parameters == (256 * 784 + 2560) * 2
    with pytest.raises(ValueError, match="hidden_features"):
        mlp_ext.memory_footprint(32, 784, -1, 10)
    with pytest.raises(TypeError, match="floating torch.dtype"):
        mlp_ext.memory_footprint(32, 784, 256, 10, dtype=torch.int64)
    with pytest.raises(TypeError, match="floating torch.dtype"):
        mlp_ext.memory_footprint(32, 784, 256, 10, dtype="float32")


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_fused_mlp_without_saved_h(bias):
    x = torch.randn(2, 3, 5, requires_grad=True)
    w1, w2 = torch.randn(7, 5, requires_grad=True), torch.randn(3, 7, requires_grad=True)
    b1, b2 = (torch.randn(7, requires_grad=True), torch.randn(3, requires_grad=True)) if bias \
        else (None, None)
    torch.library.opcheck(torch.ops.mlp_ext.fused_mlp.default, (x, w1, w2, b1, b2),
                          {"activation": "gelu_tanh", "weight_decay": 0.1, "save_hidden": False})
