"""FusedMLP: a drop-in for nn.Sequential(nn.Linear, activation, nn.Linear)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlp_ext
from mlp_ext import FusedMLP, reference

SEQUENTIAL_ACTIVATIONS = {
    "identity": nn.Identity(), "relu": nn.ReLU(), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(),
    "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(),
    "quick_gelu": mlp_ext.activations.QuickGELU(),
}


@pytest.mark.parametrize("bias", [True, False])
def test_same_output_as_sequential(device, activation, bias):
    seq = nn.Sequential(nn.Linear(8, 16, bias=bias), SEQUENTIAL_ACTIVATIONS[activation],
                        nn.Linear(16, 5, bias=bias)).to(device)
    mlp = FusedMLP.from_sequential(seq)
    assert mlp.activation == activation
    for shape in [(8,), (3, 8), (2, 4, 8)]:
        x = torch.randn(*shape, device=device)
        torch.testing.assert_close(mlp(x), seq(x))


def test_round_trip_shares_or_copies_weights():
    mlp = FusedMLP(4, 6, 3, activation="tanh")
    seq = mlp.to_sequential()
    assert isinstance(seq[1], nn.Tanh)
    assert seq[0].weight is mlp.fc1.weight and seq[2].bias is mlp.fc2.bias   # shared
    back = FusedMLP.from_sequential(seq, weight_decay=0.1)
    assert back.fc1.weight is mlp.fc1.weight and back.weight_decay == 0.1
    copied = mlp.to_sequential(copy_weights=True)
    assert copied[0].weight is not mlp.fc1.weight
    torch.testing.assert_close(copied[0].weight, mlp.fc1.weight)
    with torch.no_grad():
        copied[0].weight.add_(1.0)   # a copy does not alias
    assert not torch.equal(copied[0].weight, mlp.fc1.weight)
    x = torch.randn(5, 4)
    torch.testing.assert_close(FusedMLP.from_sequential(copied, copy_weights=True)(x), copied(x))


def test_from_sequential_rejects_other_architectures():
    with pytest.raises(ValueError, match="expected nn.Sequential"):
        FusedMLP.from_sequential(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="Softmax.*is not a supported activation"):
        FusedMLP.from_sequential(nn.Sequential(nn.Linear(2, 3), nn.Softmax(-1), nn.Linear(3, 1)))
    with pytest.raises(ValueError, match="out_features = 3 does not match seq\\[2\\].in_features = 4"):
        FusedMLP.from_sequential(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(4, 1)))


def test_parameter_names_and_factory_kwargs():
    mlp = FusedMLP(4, 6, 3, dtype=torch.float64, device="cpu")
    assert [n for n, _ in mlp.named_parameters()] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert all(p.dtype == torch.float64 for p in mlp.parameters())
    assert [n for n, _ in FusedMLP(4, 6, 3, bias=False).named_parameters()] == ["fc1.weight", "fc2.weight"]
    assert "hidden_features=6" in repr(mlp)


def test_initialization_matches_nn_linear():
    """Same seed, same parameters as the Sequential; and nn.Linear's statistics."""
    torch.manual_seed(123)
    mlp = FusedMLP(300, 200, 100)
    torch.manual_seed(123)
    seq = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 100))
    for a, b in zip(mlp.parameters(), seq.parameters()):
        assert torch.equal(a, b)
    # kaiming_uniform_(a=sqrt(5)) and the bias both draw from U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    for weight, bias, fan_in in [(mlp.fc1.weight, mlp.fc1.bias, 300), (mlp.fc2.weight, mlp.fc2.bias, 200)]:
        bound = fan_in ** -0.5
        for p in (weight, bias):
            assert p.abs().max() <= bound
            assert abs(p.std().item() - bound / 3 ** 0.5) < 0.1 * bound / 3 ** 0.5
            assert abs(p.mean().item()) < 0.1 * bound


def test_training_step_gradients_are_those_of_J(device):
    """o, s = mlp(x, return_penalty=True); J = cross_entropy(o, y) + s: the gradients equal
    those of the reference J, and an SGD step matches the Sequential trained with the same J."""
    torch.manual_seed(0)
    mlp = FusedMLP(10, 32, 4, activation="gelu", weight_decay=1e-2, device=device, dtype=torch.float64)
    seq = mlp.to_sequential(copy_weights=True)
    x = torch.randn(16, 10, device=device, dtype=torch.float64)
    y = torch.randint(0, 4, (16,), device=device)

    o, s = mlp(x, return_penalty=True)
    J = F.cross_entropy(o, y) + s
    J.backward()
    o_ref, s_ref = reference.fused_mlp(x, seq[0].weight, seq[2].weight, seq[0].bias, seq[2].bias,
                                       activation="gelu", weight_decay=1e-2)
    (F.cross_entropy(o_ref, y) + s_ref).backward()
    torch.testing.assert_close(J, F.cross_entropy(o_ref, y) + s_ref)
    for p, q in zip(mlp.parameters(), seq.parameters()):
        torch.testing.assert_close(p.grad, q.grad)

    opt, opt_ref = torch.optim.SGD(mlp.parameters(), lr=0.5), torch.optim.SGD(seq.parameters(), lr=0.5)
    opt.step(), opt_ref.step()
    for _ in range(3):
        for optim in (opt, opt_ref):
            optim.zero_grad()
        o, s = mlp(x, return_penalty=True)
        (F.cross_entropy(o, y) + s).backward()
        o_ref = seq(x)
        (F.cross_entropy(o_ref, y) + 1e-2 / 2 * (seq[0].weight.square().sum()
                                                 + seq[2].weight.square().sum())).backward()
        opt.step(), opt_ref.step()
    for p, q in zip(mlp.parameters(), seq.parameters()):
        torch.testing.assert_close(p, q)


def test_penalty_is_a_loss_term_under_scaling_and_accumulation():
    """s goes through loss scaling and gradient accumulation like any loss term."""
    mlp = FusedMLP(3, 5, 2, weight_decay=0.2, dtype=torch.float64)
    xs = [torch.randn(4, 3, dtype=torch.float64) for _ in range(2)]
    for x in xs:   # two accumulated micro-batches, each scaled by 1/2
        o, s = mlp(x, return_penalty=True)
        ((o.square().mean() + s) / 2).backward()
    accumulated = [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    o, s = mlp(torch.cat(xs), return_penalty=True)
    (o.square().mean() + s).backward()
    for a, b in zip(accumulated, mlp.parameters()):
        torch.testing.assert_close(a, b.grad)


def test_weight_decay_zero_returns_zero_penalty():
    mlp = FusedMLP(3, 5, 2)
    o, s = mlp(torch.randn(2, 3), return_penalty=True)
    assert s.item() == 0.0 and o.shape == (2, 2)
    assert isinstance(mlp(torch.randn(2, 3)), torch.Tensor)


def test_module_state_dict_and_device_moves():
    mlp = FusedMLP(3, 5, 2, activation="sigmoid")
    clone = FusedMLP(3, 5, 2, activation="sigmoid")
    clone.load_state_dict(mlp.state_dict())
    x = torch.randn(4, 3)
    torch.testing.assert_close(clone(x), mlp(x))
    mlp = mlp.double()
    assert mlp(x.double()).dtype == torch.float64


def test_every_table_of_activations_covers_the_operators_list():
    """The names come from the operator (csrc/activation.h); every Python table keyed
    by them (modules, references, this file) has exactly those keys."""
    from mlp_ext import modules

    names = set(mlp_ext.ACTIVATIONS)
    assert len(names) == len(mlp_ext.ACTIVATIONS) >= 7
    assert set(modules._MODULES) == names
    assert set(reference._PHI) == set(reference._PHI_DERIVATIVE) == names
    assert set(SEQUENTIAL_ACTIVATIONS) == names
    for name in names:  # and the module table round-trips through from_sequential's lookup
        assert modules._activation_name(modules._MODULES[name]()) == name


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_parametrized_parameters_are_read_through_their_parametrization(name):
    """forward reads the parameters from _parameters in place; a parametrized one is not
    there, and must come through its parametrization (value and gradient)."""
    import torch.nn.utils.parametrize as parametrize

    class Doubled(nn.Module):
        def forward(self, t):
            return 2 * t

    torch.manual_seed(0)
    mlp = FusedMLP(5, 7, 3, activation="tanh", weight_decay=0.1).double()
    parametrize.register_parametrization(mlp.fc2, name, Doubled())
    x = torch.randn(4, 5, dtype=torch.float64)
    w1, b1 = mlp.fc1.weight, mlp.fc1.bias
    w2, b2 = mlp.fc2.weight, mlp.fc2.bias  # the parametrized values (one doubled)
    o, s = mlp(x, return_penalty=True)
    o_ref, s_ref = reference.fused_mlp(x, w1, w2, b1, b2, activation="tanh", weight_decay=0.1)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)
    original = mlp.fc2.parametrizations[name].original
    (o.sum() + s).backward()
    expected = torch.autograd.grad((o_ref.sum() + s_ref), original)[0]
    torch.testing.assert_close(original.grad, expected)
