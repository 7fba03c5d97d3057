"""FusedMLP: a drop-in for nn.Sequential(nn.Linear, activation, nn.Linear)."""
import copy
import math
from typing import Tuple, Union

from torch import Tensor, nn
from torch.nn import Parameter

from .functional import ACTIVATIONS, check_dropout, check_options, fused_mlp, is_dtensor

# Activation name <-> the nn module of a Sequential.
_MODULES = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": lambda: nn.GELU(approximate="none"),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
}


def _attribute(module: nn.Module, name: str):
    """module.<name>, read from module._parameters when it is there.

    Plain `module.weight` goes through nn.Module.__getattr__, which costs about
    as much as a small MLP's whole forward; a parametrized weight is no longer
    in _parameters and takes that usual route.
    """
    parameters = module._parameters
    return parameters[name] if name in parameters else getattr(module, name)


def _activation_name(module: nn.Module) -> str:
    """The name of an activation module of a Sequential, as _MODULES builds it."""
    for name, make in _MODULES.items():
        reference = make()
        if type(module) is type(reference) and (
                getattr(module, "approximate", None) == getattr(reference, "approximate", None)):
            return name
    raise ValueError(
        f"FusedMLP.from_sequential: unsupported activation module {module!r}; expected one of "
        "nn.Identity, nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU")


class FusedMLP(nn.Module):
    """Linear(in, hidden) -> activation -> Linear(hidden, out) as one fused operator.

    The layers are ``fc1`` and ``fc2`` (nn.Linear, initialized exactly as
    nn.Linear is), so parameters are ``fc1.weight``, ``fc1.bias``,
    ``fc2.weight`` and ``fc2.bias``. ``mlp(x)`` returns o for x of shape
    (*, in_features); ``mlp(x, return_penalty=True)`` returns (o, s) with the
    L2 term s = weight_decay/2 (||fc1.weight||^2 + ||fc2.weight||^2) from the
    same fused call, to be added to the loss::

        o, s = mlp(x, return_penalty=True)
        loss = F.cross_entropy(o, y) + s      # J = L + s
        loss.backward()                       # gradients of J, decay included

    ``save_hidden=False`` keeps only z for backward and recomputes h = phi(z)
    there (less memory, the same gradients bit for bit).

    ``dropout=p`` drops hidden units with probability p in training mode
    (``mlp.train()``, the default), as ``nn.Dropout(p)`` between the activation and
    ``fc2`` does; ``mlp.eval()`` turns it off.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int,
        *,
        activation: str = "relu",
        bias: bool = True,
        weight_decay: float = 0.0,
        save_hidden: bool = True,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("hidden_features", hidden_features),
                            ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"FusedMLP: expected {name} to be an int, but got "
                                f"{type(value).__name__}")
            if value < 0:
                raise ValueError(f"FusedMLP: expected {name} >= 0, but got {value}")
        for name, value in (("bias", bias), ("save_hidden", save_hidden)):
            if not isinstance(value, bool):
                raise TypeError(f"FusedMLP: expected {name} to be a bool, but got {type(value).__name__}")
        check_options("FusedMLP", activation, weight_decay, save_hidden)
        check_dropout("FusedMLP", dropout)
        if activation not in ACTIVATIONS:
            raise ValueError(f"FusedMLP: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        if not math.isfinite(weight_decay) or weight_decay < 0:
            raise ValueError(f"FusedMLP: expected weight_decay to be a finite number >= 0, but got "
                             f"{weight_decay}")
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, **factory)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, **factory)
        self.activation = activation
        self.weight_decay = float(weight_decay)
        self.save_hidden = bool(save_hidden)
        self.dropout = float(dropout)

    @property
    def in_features(self) -> int:
        return self.fc1.in_features

    @property
    def hidden_features(self) -> int:
        return self.fc1.out_features

    @property
    def out_features(self) -> int:
        return self.fc2.out_features

    def forward(self, x: Tensor, return_penalty: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        fc1, fc2 = self._modules["fc1"], self._modules["fc2"]
        w1 = _attribute(fc1, "weight")
        if type(w1) is not Parameter and type(w1) is not Tensor and is_dtensor(w1):
            # Tensor parallel (parallelize_module): DTensor weights (mlp_ext/_dtensor.py).
            from ._dtensor import fused_mlp_module_forward
            return fused_mlp_module_forward(self, x, w1, _attribute(fc2, "weight"), _attribute(fc1, "bias"),
                                            _attribute(fc2, "bias"), return_penalty)
        # Without return_penalty s is dropped: let the op skip computing it.
        o, s = fused_mlp(x, w1, _attribute(fc2, "weight"),
                         _attribute(fc1, "bias"), _attribute(fc2, "bias"),
                         activation=self.activation,
                         weight_decay=self.weight_decay if return_penalty else 0.0,
                         save_hidden=self.save_hidden, dropout=self.dropout,
                         training=self.training)
        return (o, s) if return_penalty else o

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
                f"out_features={self.out_features}, activation={self.activation!r}, "
                f"bias={self.fc1.bias is not None}, weight_decay={self.weight_decay}"
                + ("" if self.save_hidden else ", save_hidden=False")
                + (f", dropout={self.dropout}" if self.dropout else ""))

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, *, weight_decay: float = 0.0,
                        save_hidden: bool = True, copy_weights: bool = False) -> "FusedMLP":
        """FusedMLP of nn.Sequential(nn.Linear, activation, [nn.Dropout,] nn.Linear).

        The Linear modules are shared with ``seq`` (training one trains the
        other) unless ``copy_weights=True``, which deep-copies them. An
        nn.Dropout(p) between the activation and the second Linear becomes
        ``dropout=p``.
        """
        # An nn.Dropout before the second Linear: the hidden-layer dropout.
        dropout = 0.0
        if (isinstance(seq, nn.Sequential) and len(seq) == 4 and type(seq[2]) is nn.Dropout):
            dropout = float(seq[2].p)
            seq = nn.Sequential(seq[0], seq[1], seq[3])
        if not (isinstance(seq, nn.Sequential) and len(seq) == 3
                and isinstance(seq[0], nn.Linear) and isinstance(seq[2], nn.Linear)):
            raise ValueError(f"FusedMLP.from_sequential: expected nn.Sequential(nn.Linear, activation, "
                             f"nn.Linear), got {seq!r}")
        fc1, act, fc2 = seq
        if fc1.out_features != fc2.in_features:
            raise ValueError(f"FusedMLP.from_sequential: seq[0].out_features = {fc1.out_features} does "
                             f"not match seq[2].in_features = {fc2.in_features}")
        if (fc1.bias is None) != (fc2.bias is None):
            raise ValueError("FusedMLP.from_sequential: both Linear layers must have a bias, or neither")
        if copy_weights:
            fc1, fc2 = copy.deepcopy(fc1), copy.deepcopy(fc2)
        mlp = cls.__new__(cls)
        nn.Module.__init__(mlp)
        mlp.fc1, mlp.fc2 = fc1, fc2
        mlp.activation = _activation_name(act)
        mlp.weight_decay = float(weight_decay)
        mlp.save_hidden = bool(save_hidden)
        mlp.dropout = dropout
        return mlp

    def to_sequential(self, *, copy_weights: bool = False) -> nn.Sequential:
        """The equivalent nn.Sequential (with nn.Dropout(p) before the second Linear
        when dropout > 0); its Linear layers are this module's own (shared) unless
        ``copy_weights=True``. Weight decay is not part of it."""
        fc1, fc2 = (copy.deepcopy(self.fc1), copy.deepcopy(self.fc2)) if copy_weights else (self.fc1, self.fc2)
        dropout = [nn.Dropout(self.dropout)] if self.dropout else []
        return nn.Sequential(fc1, _MODULES[self.activation](), *dropout, fc2)
