"""Every bad input the README's API section lists raises a clear exception naming the
argument, the expected and the actual value."""
import math

import pytest
import torch

import mlp_ext

from conftest import make_inputs


def _inputs(device="cpu", dtype=torch.float32):
    return list(make_inputs(n=5, d=4, h=6, q=3, dtype=dtype, device=device, requires_grad=False))


def _replace(inputs, index, value):
    inputs = list(inputs)
    inputs[index] = value
    return inputs


@pytest.mark.parametrize("index, bad, exc, fragments", [
    (0, torch.randn(5, 7), RuntimeError, ["x.shape[-1] = 7", "in_features = w1.shape[1] = 4"]),
    (0, torch.tensor(1.0), RuntimeError, ["x", "0-dim"]),
    (1, torch.randn(6, 4, 1), RuntimeError, ["w1", "(hidden_features, in_features)", "[6, 4, 1]"]),
    (2, torch.randn(3, 5), RuntimeError, ["w2.shape[1] = 5", "hidden_features = w1.shape[0] = 6"]),
    (2, torch.randn(3), RuntimeError, ["w2", "(out_features, hidden_features)", "[3]"]),
    (3, torch.randn(5), RuntimeError, ["b1", "(hidden_features,)", "[6]", "[5]"]),
    (3, torch.randn(1, 6), RuntimeError, ["b1", "[1, 6]"]),
    (4, torch.randn(4), RuntimeError, ["b2", "(out_features,)", "[3]", "[4]"]),
    (1, torch.randn(6, 4, dtype=torch.float64), TypeError, ["w1", "Float", "Double"]),
    (4, torch.randn(3, dtype=torch.float64), TypeError, ["b2", "Float", "Double"]),
])
def test_bad_shapes_and_dtypes(index, bad, exc, fragments):
    with pytest.raises(exc) as info:
        mlp_ext.fused_mlp(*_replace(_inputs(), index, bad))
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_dtypes(dtype):
    x, w1, w2, b1, b2 = _inputs()
    with pytest.raises(TypeError, match="expected x of a floating dtype.*got"):
        mlp_ext.fused_mlp(x.to(dtype), w1.to(dtype), w2.to(dtype), b1.to(dtype), b2.to(dtype))


def test_half_precision_on_cpu_is_refused():
    x, w1, w2, b1, b2 = _inputs()
    with pytest.raises(TypeError, match="float32 or float64 on cpu.*BFloat16"):
        mlp_ext.fused_mlp(*(t.bfloat16() for t in (x, w1, w2, b1, b2)))


@pytest.mark.parametrize("activation", ["RELU", "softmax", ""])
def test_unknown_activation(activation):
    with pytest.raises(ValueError, match=f'unknown activation "{activation}".*"gelu_tanh"'):
        mlp_ext.fused_mlp(*_inputs(), activation=activation)


@pytest.mark.parametrize("weight_decay", [-0.1, math.inf, math.nan])
def test_bad_weight_decay(weight_decay):
    with pytest.raises(ValueError, match="weight_decay to be a finite number >= 0, but got"):
        mlp_ext.fused_mlp(*_inputs(), weight_decay=weight_decay)


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        mlp_ext.FusedMLP(4, 6, 3, activation="swish")
    with pytest.raises(ValueError, match="weight_decay"):
        mlp_ext.FusedMLP(4, 6, 3, weight_decay=-1.0)
    with pytest.raises(RuntimeError, match=r"x.shape\[-1\] = 5 does not match in_features"):
        mlp_ext.FusedMLP(4, 6, 3)(torch.randn(2, 5))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("index", range(5))
def test_mixed_devices(index):
    inputs = _inputs()
    moved = [t.cuda() if i != index else t for i, t in enumerate(inputs)]
    with pytest.raises(RuntimeError, match="device"):
        mlp_ext.fused_mlp(*moved)
