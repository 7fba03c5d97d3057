"""FusedMLP: a drop-in for nn.Sequential(nn.Linear, activation, nn.Linear)."""
import copy
from typing import Tuple, Union

from torch import Tensor, nn
from torch.nn import Parameter

from . import penalty as _penalty
from .activations import QuickGELU, resolve_activation
from .functional import (_fused_mlp, check_dropout, check_module_options, check_tensor, is_dtensor,
                         op_options)

# Activation name <-> the nn module of a Sequential (to_sequential builds these).
_MODULES = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": lambda: nn.GELU(approximate="none"),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "quick_gelu": QuickGELU,
}


def _attribute(module: nn.Module, name: str):
    """module.<name>, read from module._parameters when it is there.

    Plain `module.weight` goes through nn.Module.__getattr__, which costs about
    as much as a small MLP's whole forward; a parametrized weight is no longer
    in _parameters and takes that usual route.
    """
    parameters = module._parameters
    return parameters[name] if name in parameters else getattr(module, name)


def _activation_name(module, where: str = "FusedMLP.from_sequential") -> str:
    """The canonical name of an activation module or function (mlp_ext.activations)."""
    return resolve_activation(module, where=where)


def _check_linears(where: str, fc1, fc2, names=("fc1", "fc2")) -> None:
    for name, layer in zip(names, (fc1, fc2)):
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"{where}: expected {name} to be an nn.Linear, but got {type(layer).__name__}")
    if fc1.out_features != fc2.in_features:
        raise ValueError(f"{where}: {names[0]}.out_features = {fc1.out_features} does not match "
                         f"{names[1]}.in_features = {fc2.in_features}")
    if (fc1.bias is None) != (fc2.bias is None):
        raise ValueError(f"{where}: both Linear layers must have a bias, or neither")
    if fc1.weight.dtype != fc2.weight.dtype or fc1.weight.device != fc2.weight.device:
        raise ValueError(f"{where}: {names[0]} and {names[1]} must share a dtype and a device, but got "
                         f"{fc1.weight.dtype} on {fc1.weight.device} and {fc2.weight.dtype} on "
                         f"{fc2.weight.device}")


def check_sizes(where: str, bias, **sizes) -> None:
    """TypeError / ValueError for a module's feature sizes (ints >= 0) and bias (a bool)."""
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{where}: expected {name} to be an int, but got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{where}: expected {name} >= 0, but got {value}")
    if not isinstance(bias, bool):
        raise TypeError(f"{where}: expected bias to be a bool, but got {type(bias).__name__}")


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

    Inside ``mlp_ext.collect_penalty()`` a module with weight_decay > 0 also adds
    its s to the collector, so that a host model that calls ``mlp(x)`` itself can
    train J = L + sum of s (see mlp_ext.penalty).

    ``activation`` may be any name, module or function ``mlp_ext.resolve_activation``
    accepts; the module keeps the canonical name.
    """

    # The names of the two Linear children. from_linears may register them under
    # the names a host model gave them (a Sequential's "0" and "2"), so that
    # state_dict keys do not change when a block is fused.
    _linear_names: Tuple[str, str] = ("fc1", "fc2")

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int,
        *,
        activation="relu",
        bias: bool = True,
        weight_decay: float = 0.0,
        save_hidden: bool = True,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_sizes("FusedMLP", bias, in_features=in_features, hidden_features=hidden_features,
                    out_features=out_features)
        activation = check_module_options("FusedMLP", activation, weight_decay, save_hidden)
        check_dropout("FusedMLP", dropout)
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, **factory)
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, **factory)
        self.activation = activation
        self.weight_decay = float(weight_decay)
        self.save_hidden = bool(save_hidden)
        self.dropout = float(dropout)

    @property
    def fc1(self) -> nn.Linear:
        return self._modules[self._linear_names[0]]

    @property
    def fc2(self) -> nn.Linear:
        return self._modules[self._linear_names[1]]

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
        names = self._linear_names
        fc1, fc2 = self._modules[names[0]], self._modules[names[1]]
        p1, p2 = fc1._parameters, fc2._parameters
        if "weight" in p1 and "weight" in p2 and "bias" in p1 and "bias" in p2:
            # Read from _parameters in place (_attribute's fast path, without its four calls).
            w1, w2, b1, b2 = p1["weight"], p2["weight"], p1["bias"], p2["bias"]
        else:  # a parametrized weight or bias
            w1, w2 = _attribute(fc1, "weight"), _attribute(fc2, "weight")
            b1, b2 = _attribute(fc1, "bias"), _attribute(fc2, "bias")
        if type(w1) is not Parameter and type(w1) is not Tensor and is_dtensor(w1):
            # Tensor parallel (parallelize_module): DTensor weights (mlp_ext/_dtensor.py).
            from ._dtensor import fused_mlp_module_forward
            return fused_mlp_module_forward(self, x, w1, w2, b1, b2, return_penalty)
        # Without return_penalty or a collector s is dropped: let the op skip computing it.
        collector = _penalty._ACTIVE[-1] if _penalty._ACTIVE and self.weight_decay else None
        if not isinstance(x, Tensor):
            check_tensor("fused_mlp", "x", x)
        # The op directly, not fused_mlp: the options were checked when they were set
        # (at construction), the op checks the tensors, and the Python checks would
        # cost ~12K instructions, a tenth of a small inference call. Only the options
        # that differ from the op's defaults are passed (op_options).
        o, s = _fused_mlp(x, w1, w2, b1, b2,
                          **op_options(self.activation,
                                       self.weight_decay if return_penalty or collector is not None else 0.0,
                                       self.save_hidden, self.dropout if self.training else 0.0))
        if collector is not None:
            collector.add(s)
        return (o, s) if return_penalty else o

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
                f"out_features={self.out_features}, activation={self.activation!r}, "
                f"bias={self.fc1.bias is not None}, weight_decay={self.weight_decay}"
                + ("" if self.save_hidden else ", save_hidden=False")
                + (f", dropout={self.dropout}" if self.dropout else ""))

    @classmethod
    def from_linears(cls, fc1: nn.Linear, fc2: nn.Linear, activation="relu", *,
                     weight_decay: float = 0.0, save_hidden: bool = True, dropout: float = 0.0,
                     names: Tuple[str, str] = ("fc1", "fc2")) -> "FusedMLP":
        """FusedMLP around existing Linear modules: o = fc2(phi(fc1(x))).

        ``fc1`` and ``fc2`` are shared, not copied: their parameters (identity,
        optimizer state, hooks on them) stay as they are. ``activation`` is any name,
        module or function ``mlp_ext.resolve_activation`` accepts. ``names`` are the
        child names the Linears get (by default fc1, fc2); give a host block's own
        names to keep its state_dict keys. ``dropout`` is the hidden-layer dropout
        (training mode only). Consumes no random numbers.
        """
        where = "FusedMLP.from_linears"
        _check_linears(where, fc1, fc2)
        activation = check_module_options(where, activation, weight_decay, save_hidden)
        check_dropout(where, dropout)
        if not (isinstance(names, (tuple, list)) and len(names) == 2
                and all(isinstance(n, str) and n and "." not in n for n in names)
                and names[0] != names[1]):
            raise ValueError(f"{where}: expected names to be two distinct module names, but got "
                             f"{names!r}")
        mlp = cls.__new__(cls)
        nn.Module.__init__(mlp)
        if tuple(names) != cls._linear_names:
            mlp._linear_names = tuple(names)
        mlp._modules[names[0]] = fc1
        mlp._modules[names[1]] = fc2
        mlp.activation = activation
        mlp.weight_decay = float(weight_decay)
        mlp.save_hidden = bool(save_hidden)
        mlp.dropout = float(dropout)
        return mlp

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, *, weight_decay: float = 0.0,
                        save_hidden: bool = True, copy_weights: bool = False) -> "FusedMLP":
        """FusedMLP of nn.Sequential(nn.Linear, activation, [nn.Dropout,] nn.Linear).

        The activation is any module ``mlp_ext.resolve_activation`` recognises
        (torch.nn's, transformers', timm's, a user's). The Linear modules are shared
        with ``seq`` (training one trains the other) unless ``copy_weights=True``,
        which deep-copies them. An nn.Dropout(p) between the activation and the
        second Linear becomes ``dropout=p``.
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
        activation = _activation_name(act)
        if copy_weights:
            fc1, fc2 = copy.deepcopy(fc1), copy.deepcopy(fc2)
        return cls.from_linears(fc1, fc2, activation, weight_decay=weight_decay,
                                save_hidden=save_hidden, dropout=dropout)

    def to_sequential(self, *, copy_weights: bool = False) -> nn.Sequential:
        """The equivalent nn.Sequential (with nn.Dropout(p) before the second Linear
        when dropout > 0); its Linear layers are this module's own (shared) unless
        ``copy_weights=True``. Weight decay is not part of it."""
        fc1, fc2 = self.fc1, self.fc2
        if copy_weights:
            fc1, fc2 = copy.deepcopy(fc1), copy.deepcopy(fc2)
        dropout = [nn.Dropout(self.dropout)] if self.dropout else []
        return nn.Sequential(fc1, _MODULES[self.activation](), *dropout, fc2)
