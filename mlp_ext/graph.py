"""The computational graphs of the section, drawn for a configured MLP.

    python -m mlp_ext.graph --activation gelu --weight-decay 1e-4 --sizes 32 784 256 10

writes ``forward.svg`` and ``backward.svg`` (Graphviz; ``--format png`` for PNG).
As in the section's figure, variables are boxes and operators are circles.
The forward graph has the biases and the regularization branch; the values
that the autograd node keeps for backward are filled and say "saved" (with
their bytes when --sizes are given; the list comes from
``mlp_ext.memory.saved_for_backward``, which the tests check against what
autograd really saves). The backward graph is the chain rule of the section as
``fused_mlp_backward`` evaluates it, reading the saved values.

Needs the ``graphviz`` Python package and Graphviz's ``dot`` program (``import
mlp_ext`` itself needs neither: only this module imports graphviz).
"""
import argparse
import dataclasses
import os
import sys
from typing import List, Optional, Tuple

import torch

try:
    import graphviz
except ImportError as error:  # say which package, and that only the drawing needs it
    raise ImportError(
        "mlp_ext.graph draws with the `graphviz` Python package, which is not installed "
        "(pip install graphviz; the drawing also needs Graphviz's `dot` program). The rest "
        "of mlp_ext does not need it.", name="graphviz") from error

from .functional import ACTIVATIONS
from .loss import LOSSES
from .memory import saved_for_backward

# The section's symbols, as the nodes show them.
_SYMBOL = {"W1": "W₁", "W2": "W₂", "b1": "b₁", "b2": "b₂", "dL/do": "∂L/∂o", "y": "y"}

# Saved, but read only when the backward itself is differentiated (create_graph).
_SECOND_ORDER_ONLY = ("b1", "b2", "y")

_SAVED_STYLE = {"style": "filled,bold", "fillcolor": "#ffe8a8"}
_GRADIENT_STYLE = {"style": "filled", "fillcolor": "#dbe9ff"}
_PARAMETER_STYLE = {"style": "filled", "fillcolor": "#e6f4e6"}


@dataclasses.dataclass(frozen=True)
class GraphConfig:
    """The MLP whose graphs are drawn (the arguments of fused_mlp / fused_mlp_loss)."""
    activation: str = "relu"
    bias: bool = True
    weight_decay: float = 1e-4
    save_hidden: bool = True
    loss: str = "cross_entropy"
    fused_loss: bool = False          # J from mlp_ext.fused_mlp_loss (keeps dL/do, not o)
    sizes: Optional[Tuple[int, int, int, int]] = None  # (n, d, h, q) for shapes and bytes
    dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; expected one of {ACTIVATIONS}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; expected one of {LOSSES}")
        if not self.weight_decay >= 0:
            raise ValueError(f"expected weight_decay >= 0, got {self.weight_decay}")
        if self.sizes is not None and (len(self.sizes) != 4 or min(self.sizes) < 0):
            raise ValueError(f"expected sizes = (n, d, h, q) of ints >= 0, got {self.sizes}")

    @property
    def regularized(self) -> bool:
        return self.weight_decay > 0

    def saved(self):
        """{symbol: kind} of what backward keeps."""
        return {t.name: t.kind for t in saved_for_backward(
            bias=self.bias, save_hidden=self.save_hidden, loss=self.fused_loss)}

    def shape(self, name: str) -> str:
        """The shape of a variable, numeric with sizes, symbolic without."""
        dims = {"x": "n×d", "W1": "h×d", "b1": "h", "z": "n×h", "h": "n×h", "W2": "q×h",
                "b2": "q", "o": "n×q", "dL/do": "n×q",
                "y": "n" if self.loss == "cross_entropy" else "n×q"}.get(name, "scalar")
        if self.sizes is None or dims == "scalar":
            return dims
        n, d, h, q = self.sizes
        return "×".join(str({"n": n, "d": d, "h": h, "q": q}[c]) for c in dims.split("×"))

    def nbytes(self, name: str) -> Optional[int]:
        if self.sizes is None:
            return None
        elements = 1
        for size in self.shape(name).split("×"):
            elements *= int(size)
        return elements * self.dtype.itemsize


def _graph(name: str, title: str) -> graphviz.Digraph:
    g = graphviz.Digraph(name)
    g.attr(rankdir="LR", label=title, labelloc="t", fontname="Helvetica", fontsize="16")
    g.attr("node", fontname="Helvetica", fontsize="12")
    g.attr("edge", arrowsize="0.7")
    return g


def _variable(g, config: GraphConfig, node: str, name: str, *, note: str = "", style=None):
    """A box: the symbol, its shape, and whether backward keeps it."""
    lines = [_SYMBOL.get(name, name), config.shape(name)]
    attrs = dict(style or {})
    kind = config.saved().get(name)
    if kind is not None:
        size = config.nbytes(name)
        if kind == "activation":
            lines.append("saved for backward" + (f": {size:,} B" if size is not None else ""))
        elif name in _SECOND_ORDER_ONLY:
            lines.append("saved (reference;\nfor 2nd derivatives)")
        else:  # inputs and parameters: autograd keeps a reference, no copy
            lines.append("saved (reference)")
        attrs.update(_SAVED_STYLE)
    if note:
        lines.append(note)
    g.node(node, "\n".join(lines), shape="box", **attrs)


def _operator(g, node: str, label: str):
    g.node(node, label, shape="circle", width="0.6", fixedsize="false")


def forward_graph(config: GraphConfig = GraphConfig()) -> graphviz.Digraph:
    """Inputs at the left, J at the right; the operator's part in a dashed frame."""
    op = "fused_mlp_loss" if config.fused_loss else "fused_mlp"
    g = _graph("forward", f"Forward propagation ({config.activation}, "
                          f"λ = {config.weight_decay:g}, {config.loss})")
    _variable(g, config, "x", "x")
    _variable(g, config, "y", "y")
    with g.subgraph(name="cluster_op") as c:
        c.attr(label=f"mlp_ext.{op}: one operator, one autograd node", style="dashed")
        for name in ("W1", "W2") + (("b1", "b2") if config.bias else ()):
            _variable(c, config, name, name, style=_PARAMETER_STYLE)
        _operator(c, "mm1", "×")
        c.edge("W1", "mm1")
        if config.bias:
            c.node("W1x", "W₁x\n" + config.shape("z"), shape="box")
            c.edge("mm1", "W1x")
            _operator(c, "add1", "+")
            c.edge("W1x", "add1")
            c.edge("b1", "add1")
            c.edge("add1", "z")
        else:
            c.edge("mm1", "z")
        _variable(c, config, "z", "z")
        _operator(c, "phi", f"φ\n{config.activation}")
        c.edge("z", "phi")
        h_note = "" if config.save_hidden else "not saved:\nrecomputed in backward"
        _variable(c, config, "h", "h", note=h_note,
                  style=None if config.save_hidden else {"style": "dashed"})
        c.edge("phi", "h")
        _operator(c, "mm2", "×")
        c.edge("h", "mm2")
        c.edge("W2", "mm2")
        if config.bias:
            c.node("W2h", "W₂h\n" + config.shape("o"), shape="box")
            c.edge("mm2", "W2h")
            _operator(c, "add2", "+")
            c.edge("W2h", "add2")
            c.edge("b2", "add2")
            c.edge("add2", "o")
        else:
            c.edge("mm2", "o")
        _variable(c, config, "o", "o", note="not saved" if config.fused_loss else "")
        if config.regularized:
            _operator(c, "l2", "ℓ₂")
            c.edge("W1", "l2")
            c.edge("W2", "l2")
            _variable(c, config, "s", "s",
                      note=f"λ/2 (‖W₁‖² + ‖W₂‖²)\nλ = {config.weight_decay:g}")
            c.edge("l2", "s")
        # The loss is inside the operator only for fused_mlp_loss.
        loss_graph = c if config.fused_loss else g
        _operator(loss_graph, "loss", "l")
        _variable(loss_graph, config, "L", "L", note=f"{config.loss}(o, y)")
        if config.fused_loss:
            _variable(c, config, "dLdo", "dL/do")
            c.edge("loss", "dLdo")
    # Edges with an end outside the frame are drawn at the top level (an edge inside
    # a subgraph would pull its ends into the frame).
    g.edge("x", "mm1")
    g.edge("o", "loss")
    g.edge("y", "loss")
    g.edge("loss", "L")
    if config.regularized:
        _operator(g, "addJ", "+")
        g.edge("L", "addJ")
        g.edge("s", "addJ")
        _variable(g, config, "J", "J")
        g.edge("addJ", "J")
    else:
        g.node("J", "J = L\n(λ = 0: no s)", shape="box")
        g.edge("L", "J")
    return g


def backward_graph(config: GraphConfig = GraphConfig()) -> graphviz.Digraph:
    """The chain rule from J back to the parameters, as fused_mlp_backward runs it."""
    g = _graph("backward", "Backward propagation (chain rule in reverse; "
                           "filled boxes: values saved by the forward)")

    def gradient(node: str, of: str, shape_of: str, note: str = ""):
        label = f"∂J/∂{_SYMBOL.get(of, of)}\n{config.shape(shape_of)}" + (f"\n{note}" if note else "")
        g.node(node, label, shape="box", **_GRADIENT_STYLE)

    def saved(node: str, name: str):
        _variable(g, config, node, name)

    g.node("gL", "∂J/∂L = 1", shape="box", **_GRADIENT_STYLE)
    if config.regularized:
        g.node("gs", "∂J/∂s = 1", shape="box", **_GRADIENT_STYLE)
    # fused_mlp_loss formed dL/do in the forward: backward only scales it by g_J.
    _operator(g, "dl", "×" if config.fused_loss else "∂l/∂o")
    g.edge("gL", "dl")
    if config.fused_loss:
        saved("s_dLdo", "dL/do")
        g.edge("s_dLdo", "dl")
    else:
        g.node("o_y", "o, y\n(saved by the loss)", shape="box")
        g.edge("o_y", "dl")
    gradient("go", "o", "o")
    g.edge("dl", "go")

    for name in ("x", "W1", "W2", "z"):
        saved(f"s_{name}", name)
    h_source = "s_h"
    if config.save_hidden:
        saved("s_h", "h")
    else:
        _operator(g, "rephi", f"φ\n{config.activation}")
        g.edge("s_z", "rephi")
        g.node("s_h", "h\n" + config.shape("h") + "\nrecomputed", shape="box", style="dashed")
        g.edge("rephi", "s_h")

    decay = "\n+ g_s λ W" if config.regularized else ""
    _operator(g, "dW2", "prodᵀ" + decay)
    g.edge("go", "dW2")
    g.edge(h_source, "dW2")
    gradient("gW2", "W2", "W2")
    g.edge("dW2", "gW2")
    if config.bias:
        _operator(g, "db2", "Σ rows")
        g.edge("go", "db2")
        gradient("gb2", "b2", "b2")
        g.edge("db2", "gb2")
    _operator(g, "dh", "prod")
    g.edge("go", "dh")
    g.edge("s_W2", "dh")
    gradient("gh", "h", "h")
    g.edge("dh", "gh")
    _operator(g, "dz", "⊙ φ′(z)")
    g.edge("gh", "dz")
    g.edge("s_z", "dz")
    gradient("gz", "z", "z")
    g.edge("dz", "gz")
    if config.bias:
        _operator(g, "db1", "Σ rows")
        g.edge("gz", "db1")
        gradient("gb1", "b1", "b1")
        g.edge("db1", "gb1")
    _operator(g, "dW1", "prodᵀ" + decay)
    g.edge("gz", "dW1")
    g.edge("s_x", "dW1")
    gradient("gW1", "W1", "W1")
    g.edge("dW1", "gW1")
    _operator(g, "dx", "prod")
    g.edge("gz", "dx")
    g.edge("s_W1", "dx")
    gradient("gx", "x", "x", note="(when x requires grad)")
    g.edge("dx", "gx")
    if config.regularized:
        g.edge("gs", "dW2")
        g.edge("s_W2", "dW2")
        g.edge("gs", "dW1")
        g.edge("s_W1", "dW1")
    return g


def render(config: GraphConfig = GraphConfig(), directory: str = ".",
           format: str = "svg") -> List[str]:
    """Writes forward.<format> and backward.<format> into directory; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    return [graph.render(filename=graph.name, directory=directory, format=format, cleanup=True)
            for graph in (forward_graph(config), backward_graph(config))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlp_ext.graph", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--activation", default="relu", choices=ACTIVATIONS)
    parser.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True,
                        help="biases b1, b2")
    parser.add_argument("--weight-decay", type=float, default=1e-4,
                        help="lambda; 0 drops the regularization branch")
    parser.add_argument("--save-hidden", action=argparse.BooleanOptionalAction, default=True,
                        help="keep h for backward (else recomputed from z)")
    parser.add_argument("--loss", default="cross_entropy", choices=LOSSES)
    parser.add_argument("--fused-loss", action="store_true",
                        help="draw mlp_ext.fused_mlp_loss (J in one operator)")
    parser.add_argument("--sizes", type=int, nargs=4, metavar=("N", "D", "H", "Q"),
                        help="batch, in, hidden and out features: numeric shapes and saved bytes")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64", "float16",
                                                                "bfloat16"))
    parser.add_argument("--format", default="svg", choices=("svg", "png", "pdf"))
    parser.add_argument("--output-dir", default=".")
    args = parser.parse_args(argv)
    config = GraphConfig(
        activation=args.activation, bias=args.bias, weight_decay=args.weight_decay,
        save_hidden=args.save_hidden, loss=args.loss, fused_loss=args.fused_loss,
        sizes=tuple(args.sizes) if args.sizes else None, dtype=getattr(torch, args.dtype))
    try:
        paths = render(config, args.output_dir, args.format)
    except graphviz.ExecutableNotFound:
        print("mlp_ext.graph: Graphviz's `dot` program is not installed (Debian/Ubuntu: "
              "apt-get install graphviz; macOS: brew install graphviz)", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
