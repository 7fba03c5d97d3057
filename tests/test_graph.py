"""python -m mlp_ext.graph: the rendered forward and backward graphs say what they should.

Needs the graphviz Python package (the module is skipped without it) and, for the
tests that render, Graphviz's `dot` program (skipped without it). CI installs
both (scripts/env.sh), so there they run; a bare GPU machine has neither.
"""
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

pytest.importorskip("graphviz", reason="mlp_ext.graph needs the graphviz Python package")

from mlp_ext.graph import GraphConfig, backward_graph, forward_graph, render  # noqa: E402
from mlp_ext.memory import saved_for_backward  # noqa: E402

# Rendering runs Graphviz's `dot`; building a graph's source does not.
needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz's `dot` program is not on PATH (apt-get install graphviz)")

SVG = "{http://www.w3.org/2000/svg}"


def svg_nodes(path):
    """{node id: [text lines]} of a Graphviz SVG, and the shape of each node."""
    root = ET.parse(path).getroot()
    texts, shapes = {}, {}
    for group in root.iter(f"{SVG}g"):
        if group.get("class") != "node":
            continue
        node = group.find(f"{SVG}title").text
        texts[node] = [t.text for t in group.iter(f"{SVG}text")]
        shapes[node] = "circle" if group.find(f"{SVG}ellipse") is not None else "box"
    return texts, shapes


def saved_nodes(texts):
    return {node for node, lines in texts.items() if any(line.startswith("saved") for line in lines)}


@needs_dot
@pytest.mark.parametrize("save_hidden", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_graph(tmp_path, bias, save_hidden):
    config = GraphConfig(activation="tanh", bias=bias, weight_decay=1e-3, save_hidden=save_hidden,
                         sizes=(32, 784, 256, 10))
    forward, _ = render(config, str(tmp_path), "svg")
    texts, shapes = svg_nodes(forward)
    first_lines = {node: lines[0] for node, lines in texts.items()}
    for node, symbol in {"x": "x", "W1": "W₁", "W2": "W₂", "z": "z", "h": "h", "o": "o",
                         "y": "y", "L": "L", "s": "s", "J": "J"}.items():
        assert first_lines[node] == symbol and shapes[node] == "box", node
    assert ("b1" in texts) == bias and ("b2" in texts) == bias
    assert shapes["phi"] == "circle" and texts["phi"] == ["φ", "tanh"]
    assert shapes["l2"] == "circle" and shapes["loss"] == "circle" and shapes["addJ"] == "circle"
    assert texts["z"][1] == "32×256" and texts["W1"][1] == "256×784"
    # The saved marks are exactly what the autograd node saves (checked against autograd
    # in test_memory.py), with the bytes of the activations the op keeps.
    expected = {t.name for t in saved_for_backward(bias=bias, save_hidden=save_hidden)}
    assert saved_nodes(texts) == expected
    assert "saved for backward: 32,768 B" in texts["z"]
    if save_hidden:
        assert "saved for backward: 32,768 B" in texts["h"]
    else:
        assert "recomputed in backward" in texts["h"]
    assert "saved (reference)" in texts["x"]
    assert not saved_nodes({k: texts[k] for k in ("o", "L", "s", "J")})


@needs_dot
def test_forward_graph_without_regularization_has_no_s_branch(tmp_path):
    forward, _ = render(GraphConfig(weight_decay=0.0), str(tmp_path), "svg")
    texts, _ = svg_nodes(forward)
    assert "s" not in texts and "l2" not in texts and texts["J"][0] == "J = L"
    assert texts["z"][1] == "n×h"  # symbolic shapes without sizes


@needs_dot
def test_fused_loss_graph_keeps_dloss_do_not_o(tmp_path):
    config = GraphConfig(fused_loss=True, sizes=(8, 4, 6, 3), dtype=torch.float64)
    forward, backward = render(config, str(tmp_path), "svg")
    texts, _ = svg_nodes(forward)
    expected = {t.name for t in saved_for_backward(bias=True, save_hidden=True, loss=True)}
    assert {"dLdo" if n == "dL/do" else n for n in expected} == saved_nodes(texts)
    assert "saved for backward: 192 B" in texts["dLdo"]  # 8 x 3 float64
    assert "not saved" in texts["o"]
    texts, _ = svg_nodes(backward)
    assert texts["s_dLdo"][0] == "∂L/∂o"


@needs_dot
@pytest.mark.parametrize("save_hidden", [True, False])
def test_backward_graph(tmp_path, save_hidden):
    _, backward = render(GraphConfig(save_hidden=save_hidden), str(tmp_path), "svg")
    texts, shapes = svg_nodes(backward)
    first = {node: lines[0] for node, lines in texts.items()}
    for node, label in {"go": "∂J/∂o", "gW2": "∂J/∂W₂", "gb2": "∂J/∂b₂", "gh": "∂J/∂h",
                        "gz": "∂J/∂z", "gW1": "∂J/∂W₁", "gb1": "∂J/∂b₁", "gx": "∂J/∂x"}.items():
        assert first[node] == label and shapes[node] == "box", node
    assert texts["dz"] == ["⊙ φ′(z)"] and shapes["dz"] == "circle"
    assert texts["dW1"] == ["prodᵀ", "+ g_s λ W"]
    assert first["gs"] == "∂J/∂s = 1"
    # The backward reads the saved values of the forward; without h it recomputes it.
    assert saved_nodes(texts) >= {"s_x", "s_W1", "s_W2", "s_z"}
    assert ("s_h" in saved_nodes(texts)) == save_hidden
    assert ("rephi" in texts) == (not save_hidden)


def test_graph_sources_follow_the_configuration():
    plain = forward_graph(GraphConfig(bias=False, weight_decay=0.0)).source
    assert "b₁" not in plain and "λ/2" not in plain
    full = backward_graph(GraphConfig(weight_decay=0.5)).source
    assert "g_s λ W" in full and "∂J/∂s = 1" in full
    with pytest.raises(ValueError, match="unknown activation"):
        GraphConfig(activation="softplus")


@needs_dot
def test_command_line_renders_svg_and_png(tmp_path):
    for fmt, magic in (("svg", b"<?xml"), ("png", b"\x89PNG")):
        result = subprocess.run(
            [sys.executable, "-m", "mlp_ext.graph", "--activation", "gelu", "--no-bias",
             "--no-save-hidden", "--sizes", "32", "784", "256", "10", "--format", fmt,
             "--output-dir", str(tmp_path)],
            capture_output=True, text=True, check=True)
        paths = result.stdout.split()
        assert [p.rsplit("/", 1)[-1] for p in paths] == [f"forward.{fmt}", f"backward.{fmt}"]
        for path in paths:
            with open(path, "rb") as f:
                assert f.read(8).startswith(magic)
    texts, _ = svg_nodes(tmp_path / "forward.svg")
    assert texts["phi"] == ["φ", "gelu"] and "b1" not in texts
    assert saved_nodes(texts) == {"x", "W1", "W2", "z"}
