"""Activations by any name, module or function (mlp_ext.activations), and quick_gelu."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import mlp_ext
from mlp_ext import FusedMLP, activations, reference
from mlp_ext.activations import ALIASES, resolve_activation

from conftest import make_inputs


# -- quick_gelu, the new activation -------------------------------------------

def test_quick_gelu_is_an_operator_activation():
    assert "quick_gelu" in mlp_ext.ACTIVATIONS
    assert "quick_gelu" in torch.ops.mlp_ext._activation_names()


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_quick_gelu_gradcheck_and_both_references(bias, weight_decay):
    inputs = make_inputs(n=6, d=5, h=7, q=4, bias=bias)

    def f(*args):
        return mlp_ext.fused_mlp(*args, activation="quick_gelu", weight_decay=weight_decay)

    args = [t for t in inputs if t is not None]
    wrapped = (lambda x, w1, w2, b1, b2: f(x, w1, w2, b1, b2)) if bias else (
        lambda x, w1, w2: f(x, w1, w2))
    assert gradcheck(wrapped, args)
    assert gradgradcheck(wrapped, args)
    o, s = f(*inputs)
    ro, rs = reference.fused_mlp(*inputs, activation="quick_gelu", weight_decay=weight_decay)
    torch.testing.assert_close(o, ro, rtol=1e-12, atol=1e-12)
    grad_o = torch.randn_like(o)
    got = torch.autograd.grad((o * grad_o).sum() + s, args)
    by_autograd = torch.autograd.grad((ro * grad_o).sum() + rs, args)
    by_hand = reference.fused_mlp_backward(grad_o, *inputs[:4], activation="quick_gelu",
                                           weight_decay=weight_decay)
    by_hand = [g for g, t in zip(by_hand, inputs) if t is not None]
    for a, b, c in zip(got, by_autograd, by_hand):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
        torch.testing.assert_close(a, c, rtol=1e-11, atol=1e-11)


def test_quick_gelu_matches_its_definition_and_float32():
    z = torch.linspace(-30, 30, 2001, dtype=torch.float64)
    # With 1x1 unit weights o = phi(z): the op's phi on every value, float64 and float32.
    o, _ = mlp_ext.fused_mlp(z[:, None], torch.ones(1, 1, dtype=torch.float64),
                             torch.ones(1, 1, dtype=torch.float64), activation="quick_gelu")
    torch.testing.assert_close(o[:, 0], z * torch.sigmoid(1.702 * z), rtol=1e-14, atol=1e-300)
    o32, _ = mlp_ext.fused_mlp(z[:, None].float(), torch.ones(1, 1), torch.ones(1, 1),
                               activation="quick_gelu")
    torch.testing.assert_close(o32[:, 0].double(), z * torch.sigmoid(1.702 * z), rtol=2e-6, atol=1e-6)


def test_quick_gelu_derivative_of_the_reference_is_autograds():
    z = torch.linspace(-12, 12, 501, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(reference.phi("quick_gelu")(z).sum(), z)
    torch.testing.assert_close(reference._PHI_DERIVATIVE["quick_gelu"](z.detach()), g)


# -- names ---------------------------------------------------------------------

@pytest.mark.parametrize("alias, canonical", [
    ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu_new", "gelu_tanh"), ("gelu_fast", "gelu_tanh"),
    ("gelu_accurate", "gelu_tanh"), ("gelu_python", "gelu"), ("swish", "silu"),
    ("linear", "identity"), ("quick_gelu", "quick_gelu"), ("gelu", "gelu"), ("relu", "relu"),
])
def test_aliases(alias, canonical):
    assert resolve_activation(alias) == canonical
    # every entry point takes them and keeps / passes the canonical name
    assert FusedMLP(3, 4, 2, activation=alias).activation == canonical
    x, w1, w2, b1, b2 = make_inputs(n=3, d=3, h=4, q=2, requires_grad=False)
    torch.testing.assert_close(mlp_ext.fused_mlp(x, w1, w2, b1, b2, activation=alias)[0],
                               mlp_ext.fused_mlp(x, w1, w2, b1, b2, activation=canonical)[0], rtol=0, atol=0)
    target = torch.randint(0, 2, (3,))
    assert torch.equal(mlp_ext.fused_mlp_loss(x, target, w1, w2, b1, b2, activation=alias),
                       mlp_ext.fused_mlp_loss(x, target, w1, w2, b1, b2, activation=canonical))


def test_every_alias_computes_its_canonical_function():
    """The transformers / timm functions behind each alias, written out, match the
    canonical phi (so the table is right, not just self-consistent)."""
    z = torch.linspace(-10, 10, 1001, dtype=torch.float64)
    c = math.sqrt(2 / math.pi)
    written = {
        "gelu_new": 0.5 * z * (1 + torch.tanh(c * (z + 0.044715 * z ** 3))),
        "gelu_fast": 0.5 * z * (1.0 + torch.tanh(z * 0.7978845608 * (1.0 + 0.044715 * z * z))),
        "gelu_accurate": 0.5 * z * (1 + torch.tanh(c * (z + 0.044715 * z ** 3))),
        "gelu_pytorch_tanh": F.gelu(z, approximate="tanh"),
        "gelu_python": z * 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0))),
        "swish": z * torch.sigmoid(z), "linear": z,
    }
    for alias, value in written.items():
        torch.testing.assert_close(reference.phi(ALIASES[alias])(z), value, rtol=1e-10, atol=1e-10)


def test_unknown_names_raise_naming_argument_value_and_accepted_names():
    for bad in ["RELU", "softmax", "", "mish"]:
        with pytest.raises(ValueError) as info:
            FusedMLP(3, 4, 2, activation=bad)
        message = str(info.value)
        assert f"unknown activation {bad!r} for argument activation" in message
        assert "'quick_gelu'" in message and "'gelu_new' -> 'gelu_tanh'" in message
    with pytest.raises(TypeError, match="fused_mlp: expected activation to be a str, an activation "
                                        "module or a function, but got int"):
        mlp_ext.fused_mlp(*make_inputs(requires_grad=False), activation=3)


# -- modules and functions -----------------------------------------------------

class ErfGELU(nn.Module):        # transformers' GELUActivation(use_gelu_python=True)
    def forward(self, x):
        return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class NewGELU(nn.Module):        # transformers' NewGELUActivation
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class QuickGELUOfCLIP(nn.Module):  # transformers' QuickGELUActivation
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Float32Silu(nn.Module):    # computes in float32 internally: still silu
    def forward(self, x):
        return F.silu(x.float()).to(x.dtype)


class SubclassedGELU(nn.GELU):   # a subclass of a torch class: recognised by probe
    pass


class Scaled(nn.Module):
    def forward(self, x):
        return 1.0001 * torch.tanh(x)


class InPlaceTanh(nn.Module):
    def forward(self, x):
        return x.tanh_()


class Stateful(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        return torch.relu(x)


@pytest.mark.parametrize("value, expected", [
    (nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.ReLU(), "relu"),
    (nn.ReLU(inplace=True), "relu"), (nn.SiLU(), "silu"), (nn.Tanh(), "tanh"),
    (nn.Sigmoid(), "sigmoid"), (nn.Identity(), "identity"), (nn.Dropout(0.0), "identity"),
    (nn.GELU, "gelu"), (nn.SiLU, "silu"),                         # classes (timm's act_layer)
    (ErfGELU(), "gelu"), (NewGELU(), "gelu_tanh"), (QuickGELUOfCLIP(), "quick_gelu"),
    (Float32Silu(), "silu"), (SubclassedGELU(approximate="tanh"), "gelu_tanh"),
    (activations.QuickGELU(), "quick_gelu"),
    (torch.tanh, "tanh"), (F.gelu, "gelu"), (F.silu, "silu"), (torch.relu, "relu"),
    (functools.partial(F.gelu, approximate="tanh"), "gelu_tanh"),
    (lambda x: x * torch.sigmoid(1.702 * x), "quick_gelu"),
    (lambda x: F.gelu(x, approximate="tanh"), "gelu_tanh"),
])
def test_modules_and_functions_are_recognised(value, expected):
    assert resolve_activation(value) == expected
    assert FusedMLP(3, 4, 2, activation=value).activation == expected


@pytest.mark.parametrize("value, fragment", [
    (nn.PReLU(), "holds parameters or buffers (weight)"),
    (Stateful(), "holds parameters or buffers (calls)"),
    (nn.Dropout(0.5), "changes between calls or between train() and eval()"),
    (nn.LeakyReLU(0.01), "nearest: 'relu'"),
    (nn.ReLU6(), "nearest: 'relu'"),
    (nn.Softplus(), "matches none"),
    (nn.Mish(), "matches none"),
    (nn.Hardswish(), "matches none"),
    (Scaled(), "nearest: 'tanh'"),
    (InPlaceTanh(), "modifies its input in place"),
    (nn.Softmax(dim=-1), "matches none"),
    (lambda x: x.sum(), "returned shape ()"),
])
def test_other_modules_are_refused_naming_the_module(value, fragment):
    with pytest.raises(ValueError) as info:
        resolve_activation(value, where="FusedMLP")
    assert fragment in str(info.value), str(info.value)
    assert str(info.value).startswith("FusedMLP: activation = ")


def test_recognition_consumes_no_random_numbers_and_keeps_the_mode():
    dropout = nn.Dropout(0.0).eval()
    state = torch.get_rng_state()
    for value in (nn.Dropout(0.3), dropout, ErfGELU(), lambda x: x * torch.sigmoid(1.702 * x)):
        try:
            resolve_activation(value)
        except ValueError:
            pass
    assert torch.equal(torch.get_rng_state(), state)
    assert not dropout.training


def test_the_probe_separates_every_pair_by_far_more_than_the_tolerance():
    separation = activations.probe_separation()
    closest = min(separation.values())
    assert closest > 100 * activations._RTOL, closest
    # gelu vs gelu_tanh is the closest pair (documented in mlp_ext/activations.py).
    assert min(separation, key=separation.get) in {("gelu", "gelu_tanh"), ("gelu_tanh", "gelu")}


@pytest.mark.parametrize("activation", mlp_ext.ACTIVATIONS)
def test_from_sequential_and_from_linears_share_the_linears(activation):
    seq = nn.Sequential(nn.Linear(5, 7), activations.activation_module(activation), nn.Linear(7, 3))
    seq.double()
    mlp = FusedMLP.from_sequential(seq)
    assert mlp.activation == activation and mlp.fc1 is seq[0] and mlp.fc2 is seq[2]
    x = torch.randn(4, 5, dtype=torch.float64)
    torch.testing.assert_close(mlp(x), seq(x), rtol=1e-12, atol=1e-12)
    state = torch.get_rng_state()
    wrapped = FusedMLP.from_linears(seq[0], seq[2], seq[1], weight_decay=0.1)
    assert torch.equal(torch.get_rng_state(), state)     # no throwaway init
    assert wrapped.fc1 is seq[0] and list(wrapped.state_dict()) == [
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    torch.testing.assert_close(wrapped(x), seq(x), rtol=1e-12, atol=1e-12)


def test_from_linears_keeps_the_given_names_and_checks_its_arguments():
    fc1, fc2 = nn.Linear(4, 6), nn.Linear(6, 2)
    mlp = FusedMLP.from_linears(fc1, fc2, "gelu_new", names=("up", "down"))
    assert list(mlp.state_dict()) == ["up.weight", "up.bias", "down.weight", "down.bias"]
    assert mlp.fc1 is fc1 and mlp.fc2 is fc2 and mlp.activation == "gelu_tanh"
    assert mlp.to_sequential()[0] is fc1
    with pytest.raises(ValueError, match="fc1.out_features = 6 does not match fc2.in_features = 5"):
        FusedMLP.from_linears(fc1, nn.Linear(5, 2), "relu")
    with pytest.raises(TypeError, match="expected fc2 to be an nn.Linear"):
        FusedMLP.from_linears(fc1, nn.ReLU(), "relu")
    with pytest.raises(ValueError, match="both Linear layers must have a bias, or neither"):
        FusedMLP.from_linears(fc1, nn.Linear(6, 2, bias=False), "relu")
    with pytest.raises(ValueError, match="names"):
        FusedMLP.from_linears(fc1, fc2, "relu", names=("a", "a"))
    with pytest.raises(ValueError, match="unknown activation 'bogus'"):
        FusedMLP.from_linears(fc1, fc2, "bogus")
