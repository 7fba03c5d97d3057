"""The gated feed-forward block (SwiGLU, GeGLU, ReGLU, GLU) of today's language
models, fused: ``gated_mlp`` (functional) and ``GatedFusedMLP`` (module).

    o = (phi(x W_g^T + b_g) * (x W_u^T + b_u)) W_2^T + b_2
    s = weight_decay / 2 (||W_g||^2 + ||W_u||^2 + ||W_2||^2)

phi is any of ``mlp_ext.ACTIVATIONS``: silu (SwiGLU: LLaMA, Mistral, Qwen),
gelu_tanh / gelu (GeGLU: Gemma, T5 v1.1), relu (ReGLU), sigmoid (GLU). See
docs/gated.md.
"""
from typing import Optional, Tuple, Union

from torch import Tensor, nn
from torch.nn import Parameter

import torch

from . import penalty as _penalty
from .functional import (check_module_options, check_options, check_tensor, is_dtensor, op_options,
                         register_dtensor_rules)
from .modules import _attribute, check_sizes

_gated_mlp = torch.ops.mlp_ext.gated_mlp.default

# The child names of the blocks GatedFusedMLP loads the state_dict of unchanged:
# (gate, up, down).
LLAMA_NAMES = ("gate_proj", "up_proj", "down_proj")   # transformers' LlamaMLP, Mistral, Qwen2, Gemma
TIMM_NAMES = ("fc1_g", "fc1_x", "fc2")                  # timm.layers.SwiGLU
T5_NAMES = ("wi_0", "wi_1", "wo")                       # transformers' T5DenseGatedActDense


def gated_mlp(
    x: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    b_gate: Optional[Tensor] = None,
    b_up: Optional[Tensor] = None,
    b_down: Optional[Tensor] = None,
    *,
    activation="silu",
    weight_decay: float = 0.0,
    save_hidden: bool = True,
) -> Tuple[Tensor, Tensor]:
    """The gated block as one operator call and one autograd node.

    Args:
        x: (*, in_features).  w_gate, w_up: (hidden_features, in_features).
        w_down: (out_features, hidden_features).  Biases: (hidden_features,) for
            b_gate and b_up, (out_features,) for b_down, or None.
        activation: phi of the gate (a name, alias, module or function
            ``mlp_ext.resolve_activation`` accepts); "silu" gives SwiGLU.
        weight_decay: lambda >= 0 of the L2 term s (over the three weights).
        save_hidden: keep h = phi(z_g) * z_u for backward (the default); False
            recomputes it from the saved z = [z_g | z_u] (n x hidden_features
            elements less, one elementwise pass more).

    Returns:
        (o, s): o of shape (*, out_features), contiguous, and the 0-dim s; both
        differentiable. There is no dropout (the LLaMA-family blocks have none).
    """
    op = "gated_mlp"
    for name, t in (("x", x), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        check_tensor(op, name, t)
    for name, t in (("b_gate", b_gate), ("b_up", b_up), ("b_down", b_down)):
        check_tensor(op, name, t, optional=True)
    activation = check_options(op, activation, weight_decay, save_hidden, unknown_names_to_op=True)
    if type(w_gate) is not Tensor and type(w_gate) is not Parameter:
        register_dtensor_rules(w_gate)  # DTensor weights: the sharding rules, on first use
    return _gated_mlp(x, w_gate, w_up, w_down, b_gate, b_up, b_down,
                      **op_options(activation, float(weight_decay), save_hidden, default_activation="silu"))


def _check_names(where: str, names) -> Tuple[str, str, str]:
    if not (isinstance(names, (tuple, list)) and len(names) == 3
            and all(isinstance(n, str) and n and "." not in n for n in names)
            and len(set(names)) == 3):
        raise ValueError(f"{where}: expected names to be three distinct module names (gate, up, "
                         f"down), but got {names!r}")
    return tuple(names)


class GatedFusedMLP(nn.Module):
    """down(phi(gate(x)) * up(x)) as one fused operator; gate, up and down are
    nn.Linear children (initialized as nn.Linear is) whose names are
    ``names`` -- by default LLaMA's ``gate_proj, up_proj, down_proj``, so that a
    transformers LlamaMLP's (Mistral's, Qwen2's, Gemma's) state_dict loads
    unchanged; ``names=mlp_ext.gated.TIMM_NAMES`` (``fc1_g, fc1_x, fc2``, with
    bias=True) matches timm's SwiGLU.

    ``mlp(x)`` returns o; ``mlp(x, return_penalty=True)`` returns (o, s) with
    s = weight_decay/2 (||W_g||^2 + ||W_u||^2 + ||W_2||^2) from the same call,
    to be added to the loss (and ``mlp_ext.collect_penalty()`` collects it, as
    for FusedMLP). ``save_hidden=False`` recomputes h in backward. No dropout.
    """

    _linear_names: Tuple[str, str, str] = LLAMA_NAMES

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: Optional[int] = None,
        *,
        activation="silu",
        bias: bool = False,
        weight_decay: float = 0.0,
        save_hidden: bool = True,
        names: Tuple[str, str, str] = LLAMA_NAMES,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        where = "GatedFusedMLP"
        out_features = in_features if out_features is None else out_features
        check_sizes(where, bias, in_features=in_features, hidden_features=hidden_features,
                    out_features=out_features)
        self.activation = check_module_options(where, activation, weight_decay, save_hidden)
        names = _check_names(where, names)
        if names != type(self)._linear_names:
            self._linear_names = names
        factory = {"device": device, "dtype": dtype}
        self._modules[names[0]] = nn.Linear(in_features, hidden_features, bias=bias, **factory)
        self._modules[names[1]] = nn.Linear(in_features, hidden_features, bias=bias, **factory)
        self._modules[names[2]] = nn.Linear(hidden_features, out_features, bias=bias, **factory)
        self.weight_decay = float(weight_decay)
        self.save_hidden = bool(save_hidden)

    @property
    def gate(self) -> nn.Linear:
        return self._modules[self._linear_names[0]]

    @property
    def up(self) -> nn.Linear:
        return self._modules[self._linear_names[1]]

    @property
    def down(self) -> nn.Linear:
        return self._modules[self._linear_names[2]]

    @property
    def in_features(self) -> int:
        return self.gate.in_features

    @property
    def hidden_features(self) -> int:
        return self.gate.out_features

    @property
    def out_features(self) -> int:
        return self.down.out_features

    def forward(self, x: Tensor, return_penalty: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        gate_name, up_name, down_name = self._linear_names
        gate, up, down = self._modules[gate_name], self._modules[up_name], self._modules[down_name]
        w_gate = _attribute(gate, "weight")
        if type(w_gate) is not Parameter and type(w_gate) is not Tensor and is_dtensor(w_gate):
            # Tensor parallel (parallelize_module): DTensor weights (mlp_ext/_dtensor.py).
            from ._dtensor import gated_mlp_module_forward
            return gated_mlp_module_forward(self, x, w_gate, _attribute(up, "weight"), _attribute(down, "weight"),
                                            _attribute(gate, "bias"), _attribute(up, "bias"),
                                            _attribute(down, "bias"), return_penalty)
        collector = _penalty._ACTIVE[-1] if _penalty._ACTIVE and self.weight_decay else None
        if not isinstance(x, Tensor):
            check_tensor("gated_mlp", "x", x)
        o, s = _gated_mlp(x, w_gate, _attribute(up, "weight"), _attribute(down, "weight"),
                          _attribute(gate, "bias"), _attribute(up, "bias"), _attribute(down, "bias"),
                          **op_options(self.activation,
                                       self.weight_decay if return_penalty or collector is not None else 0.0,
                                       self.save_hidden, default_activation="silu"))
        if collector is not None:
            collector.add(s)
        return (o, s) if return_penalty else o

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, hidden_features={self.hidden_features}, "
                f"out_features={self.out_features}, activation={self.activation!r}, "
                f"bias={self.gate.bias is not None}, weight_decay={self.weight_decay}"
                + ("" if self.save_hidden else ", save_hidden=False"))

    @classmethod
    def from_linears(cls, gate: nn.Linear, up: nn.Linear, down: nn.Linear, activation="silu", *,
                     weight_decay: float = 0.0, save_hidden: bool = True,
                     names: Tuple[str, str, str] = LLAMA_NAMES) -> "GatedFusedMLP":
        """GatedFusedMLP around existing Linear modules: o = down(phi(gate(x)) * up(x)).

        The Linears are shared, not copied (parameters, optimizer state, hooks on
        them stay); ``names`` are the child names they get (a host block's own,
        to keep its state_dict keys). Consumes no random numbers.
        """
        where = "GatedFusedMLP.from_linears"
        for name, layer in (("gate", gate), ("up", up), ("down", down)):
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"{where}: expected {name} to be an nn.Linear, but got "
                                f"{type(layer).__name__}")
        if gate.weight.shape != up.weight.shape:
            raise ValueError(f"{where}: gate and up must have one shape, but got gate.weight.shape = "
                             f"{tuple(gate.weight.shape)}, up.weight.shape = {tuple(up.weight.shape)}")
        if down.in_features != gate.out_features:
            raise ValueError(f"{where}: down.in_features = {down.in_features} does not match "
                             f"gate.out_features = {gate.out_features}")
        layers = (gate, up, down)
        if any(layer.weight.dtype != gate.weight.dtype or layer.weight.device != gate.weight.device
               for layer in layers):
            raise ValueError(f"{where}: gate, up and down must share a dtype and a device")
        activation = check_module_options(where, activation, weight_decay, save_hidden)
        names = _check_names(where, names)
        mlp = cls.__new__(cls)
        nn.Module.__init__(mlp)
        if names != cls._linear_names:
            mlp._linear_names = names
        for name, layer in zip(names, layers):
            mlp._modules[name] = layer
        mlp.activation = activation
        mlp.weight_decay = float(weight_decay)
        mlp.save_hidden = bool(save_hidden)
        return mlp
