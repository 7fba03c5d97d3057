"""Activations by any name or object a user has, resolved in one place.

``resolve_activation(value)`` returns the operator's canonical name (one of
``mlp_ext.ACTIVATIONS``) for

* a **name**: mlp_ext's own, torch's, or an alias of Hugging Face transformers
  (its ``hidden_act`` values, ``ACT2FN`` keys) or timm (``get_act_layer`` names),
  listed in ``ALIASES``. Names are case-sensitive, as in those libraries;
* an **activation module** (an ``nn.Module`` instance) or a module class that
  builds one with no arguments (timm's ``act_layer=nn.GELU``);
* an **activation function** (``torch.tanh``, ``F.gelu``,
  ``functools.partial(F.gelu, approximate="tanh")``, a lambda, ...).

torch.nn's own classes and torch's functions are recognised by type / identity
(``nn.GELU`` by its ``approximate`` attribute). Anything else -- transformers'
``GELUActivation``, ``QuickGELUActivation``, timm's ``GELUTanh``, a user's own
module -- is recognised by **evaluating it** on a fixed float64 probe
(``probe_points()``: 0, ±1e-3 ... ±50, a dense grid over [-8, 8]) and matching
its output against each supported phi; it is accepted only if

1. it holds no parameters and no buffers (a PReLU or any learned activation is
   refused: the fused op would ignore its state),
2. it returns a float64 tensor of the probe's shape and leaves the probe as it was
   (no in-place side effect on its input),
3. it is deterministic and gives the same result in ``train()`` and ``eval()`` mode
   (a Dropout(p > 0) is not the identity in training; the module's mode is restored
   and the global RNG is not consumed: the probe runs under ``fork_rng``),
4. its output matches exactly one phi within ``|out - phi(p)| <= 1e-6 (1 + |phi(p)|)``.

The tolerance separates every pair of supported functions by a wide margin: on the
probe the closest pair, gelu and gelu_tanh, differ by up to 4.7e-4 (at p = 2.7, 4.7e-4
in the relative measure above, 470 times the tolerance); gelu and quick_gelu by 2.0e-2
(at p = 2.25); silu and quick_gelu by 0.18 (``probe_separation()`` computes the table
in the relative measure; tests/test_activations.py checks its minimum), while a module
that computes in float32 internally stays within about 1.2e-7 relative. Otherwise a ValueError names the module and the
nearest function with its largest deviation.

The C++ operator takes canonical names only; every Python entry point
(``fused_mlp``, ``fused_mlp_loss``, ``FusedMLP``, ``FusedMLP.from_sequential``,
``FusedMLP.from_linears``, ``mlp_ext.fuse``) resolves through this module.
Resolving a name is one dict lookup; resolving an object by probe costs a few
small tensor operations, so modules resolve once at construction.
"""
import functools
import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference

# The names the operator takes, from its one list (csrc/activation.h).
ACTIVATIONS: Tuple[str, ...] = tuple(torch.ops.mlp_ext._activation_names())

# Every accepted name -> canonical name. The canonical names map to themselves.
ALIASES: Dict[str, str] = {name: name for name in ACTIVATIONS}
ALIASES.update({
    # identity: transformers' "linear" (LinearActivation), torch's nn.Identity.
    "linear": "identity",
    # gelu, erf form: transformers' "gelu" (GELUActivation), "gelu_python"; timm's "gelu".
    "gelu_python": "gelu",
    # gelu, tanh form: torch's F.gelu(approximate="tanh"); transformers' "gelu_new",
    # "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate" (the same formula written
    # differently); timm's "gelu_tanh".
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    # silu: transformers' and timm's "swish".
    "swish": "silu",
    # quick_gelu (x sigmoid(1.702 x)) is transformers' and timm's own name.
})

# phi of each name, as torch functions: the reference's (one place for the math in Python).
_PHI = reference._PHI

# torch.nn's activation classes, by exact type (a subclass may override forward:
# it goes to the probe). nn.GELU is told apart by its approximate attribute.
_TORCH_MODULES: Dict[type, Callable[[nn.Module], Optional[str]]] = {
    nn.Identity: lambda m: "identity",
    nn.ReLU: lambda m: "relu",
    nn.Sigmoid: lambda m: "sigmoid",
    nn.Tanh: lambda m: "tanh",
    nn.SiLU: lambda m: "silu",
    nn.GELU: lambda m: {"none": "gelu", "tanh": "gelu_tanh"}.get(m.approximate),
}

# torch's functions, by identity (F.gelu's default is the erf form).
_TORCH_FUNCTIONS: Dict[Callable, str] = {
    torch.relu: "relu", F.relu: "relu", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    torch.tanh: "tanh", F.tanh: "tanh", F.gelu: "gelu", F.silu: "silu",
}

_RTOL = 1e-6  # |out - phi(p)| <= _RTOL * (1 + |phi(p)|); see the module docstring


def probe_points() -> Tensor:
    """The fixed float64 probe recognition evaluates unknown activations on."""
    edges = [0.0] + [s * v for v in (1e-3, 0.1, 9.0, 10.0, 12.0, 15.0, 20.0, 30.0, 50.0)
                     for s in (1.0, -1.0)]
    grid = torch.linspace(-8.0, 8.0, 321, dtype=torch.float64)
    return torch.cat([torch.tensor(edges, dtype=torch.float64), grid]).reshape(17, 20)


def probe_separation() -> Dict[Tuple[str, str], float]:
    """max |phi_a(p) - phi_b(p)| / (1 + |phi_b(p)|) over the probe, for every pair (a, b)."""
    p = probe_points()
    values = {name: phi(p) for name, phi in _PHI.items()}
    return {(a, b): float(((values[a] - values[b]).abs() / (1 + values[b].abs())).max())
            for a in ACTIVATIONS for b in ACTIVATIONS if a != b}


def _accepted_names() -> str:
    aliases = sorted(set(ALIASES) - set(ACTIVATIONS))
    return (", ".join(repr(n) for n in ACTIVATIONS) + " (aliases: "
            + ", ".join(f"{a!r} -> {ALIASES[a]!r}" for a in aliases) + ")")


def _describe(value) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _by_type(value) -> Optional[str]:
    """The canonical name of a torch.nn module or a torch function, or None."""
    recognise = _TORCH_MODULES.get(type(value))
    if recognise is not None:
        return recognise(value)
    try:
        name = _TORCH_FUNCTIONS.get(value)
    except TypeError:  # unhashable callable
        return None
    if name is None and isinstance(value, functools.partial) and value.func is F.gelu and (
            not value.args and set(value.keywords) <= {"approximate"}):
        name = {"none": "gelu", "tanh": "gelu_tanh"}.get(value.keywords.get("approximate", "none"))
    return name


def _evaluate(function, probe: Tensor) -> Tensor:
    out = function(probe)
    if not isinstance(out, Tensor):
        raise ValueError(f"it returned {type(out).__name__}, not a Tensor")
    if out.shape != probe.shape or out.dtype != probe.dtype:
        raise ValueError(f"it returned shape {tuple(out.shape)} dtype {out.dtype} for an input of "
                         f"shape {tuple(probe.shape)} dtype {probe.dtype}")
    return out.detach().clone()


def _by_probe(value) -> str:
    """Recognise an activation module or function by evaluating it; raises ValueError
    saying why when it is not exactly one of the supported functions."""
    module = value if isinstance(value, nn.Module) else None
    if module is not None:
        state = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
        if state:
            raise ValueError(f"it holds parameters or buffers ({', '.join(state)}), which the fused "
                             "operator would ignore")
    probe = probe_points()
    outputs = []
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        modes = [True, False] if module is not None else [None]
        was_training = module.training if module is not None else None
        try:
            for mode in modes:
                if module is not None:
                    module.train(mode)
                for _ in range(2):  # twice: a stochastic function is not phi
                    x = probe.clone()
                    out = _evaluate(value, x)
                    if not torch.equal(x, probe):
                        raise ValueError("it modifies its input in place")
                    outputs.append(out)
        finally:
            if module is not None:
                module.train(was_training)
    for out in outputs[1:]:
        if not torch.equal(out, outputs[0]):
            raise ValueError("its output changes between calls or between train() and eval() "
                             "(e.g. dropout in training)")
    out = outputs[0]
    deviations = {}
    for name in ACTIVATIONS:
        expected = _PHI[name](probe)
        deviations[name] = float(((out - expected).abs() / (1 + expected.abs())).max())
    matches = [name for name, dev in deviations.items() if dev <= _RTOL]
    if len(matches) == 1:
        return matches[0]
    nearest = min(deviations, key=lambda n: (math.isnan(deviations[n]), deviations[n]))
    raise ValueError(f"its output on the probe matches none of the supported functions (nearest: "
                     f"{nearest!r}, off by {deviations[nearest]:.3g} relative; allowed {_RTOL:g})")


def resolve_activation(activation, *, where: str = "mlp_ext", argument: str = "activation",
                       unknown_names_to_op: bool = False) -> str:
    """The canonical name (one of ``mlp_ext.ACTIVATIONS``) of an activation given by
    name, module, module class or function; see the module docstring.

    Raises TypeError for a value of another kind and ValueError for a name or an
    object that is none of the supported functions, naming ``where``, ``argument``,
    the value and what is accepted. With ``unknown_names_to_op`` an unknown name is
    returned as it is, for the operator to reject: fused_mlp and fused_mlp_loss do
    that so that eager, FakeTensor, torch.compile and torch.export raise the one
    message (a ValueError raised by Python code that dynamo traces comes out of
    torch.compile as an Unsupported error instead).
    """
    if isinstance(activation, str):
        name = ALIASES.get(activation)
        if name is None and unknown_names_to_op:
            return activation
        if name is None:
            raise ValueError(f"{where}: unknown activation {activation!r} for argument {argument}; "
                             f"expected one of {_accepted_names()}, an activation module or a "
                             "function")
        return name
    if isinstance(activation, type):
        if not issubclass(activation, nn.Module):
            raise TypeError(f"{where}: expected {argument} to be a str, an activation module or a "
                            f"function, but got the class {activation.__name__}")
        try:
            with torch.random.fork_rng(devices=[]):
                instance = activation()
        except Exception as e:
            raise ValueError(f"{where}: {argument} = {activation.__name__} cannot be built without "
                             f"arguments ({type(e).__name__}: {e}); pass a module instance") from e
        return resolve_activation(instance, where=where, argument=argument)
    if not callable(activation):
        raise TypeError(f"{where}: expected {argument} to be a str, an activation module or a "
                        f"function, but got {type(activation).__name__}")
    name = _by_type(activation)
    if name is not None:
        return name
    try:
        return _by_probe(activation)
    except ValueError as e:
        raise ValueError(f"{where}: {argument} = {_describe(activation)} is not a supported "
                         f"activation: {e}. Supported: {', '.join(ACTIVATIONS)}") from None
    except Exception as e:  # the object failed on a float64 tensor
        raise ValueError(f"{where}: {argument} = {_describe(activation)} could not be evaluated on "
                         f"the recognition probe ({type(e).__name__}: {e})") from e


def activation_module(name: str) -> nn.Module:
    """A torch.nn module computing the activation ``name`` (any accepted name)."""
    name = resolve_activation(name, where="activation_module", argument="name")
    if name == "quick_gelu":
        return QuickGELU()
    return {"identity": nn.Identity, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
            "gelu": lambda: nn.GELU(approximate="none"),
            "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU}[name]()


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), CLIP's activation (torch.nn has no class for it)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


_TORCH_MODULES[QuickGELU] = lambda m: "quick_gelu"


def is_activation(value) -> bool:
    """Whether resolve_activation accepts value (never raises)."""
    try:
        resolve_activation(value)
        return True
    except (TypeError, ValueError):
        return False
