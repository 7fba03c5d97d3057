"""Every bad input the README's API section lists raises a clear exception naming the
argument, the expected and the actual value."""
import math

import pytest
import torch

from torch._subclasses.fake_tensor import FakeTensorMode

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


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float16),
                                             (torch.bfloat16, torch.float16),
                                             (torch.float16, torch.float64)])
def test_mixed_floating_dtypes_are_refused(x_dtype, w_dtype):
    """Every floating dtype is taken, but one dtype per call: a half-precision x
    with float32 weights (or the reverse, or two half types) is not cast silently."""
    x, w1, w2, b1, b2 = _inputs()
    with pytest.raises(TypeError, match=f"expected w1 to have the dtype of x \\({_scalar_name(x_dtype)}\\), "
                                        f"but got {_scalar_name(w_dtype)}"):
        mlp_ext.fused_mlp(x.to(x_dtype), w1.to(w_dtype), w2.to(w_dtype), b1.to(w_dtype),
                          b2.to(w_dtype))


def _scalar_name(dtype):
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
            torch.bfloat16: "BFloat16"}[dtype]


@pytest.mark.parametrize("activation", ["RELU", "softmax", ""])
def test_unknown_activation(activation):
    # Aliases are resolved in Python (mlp_ext.activations); an unknown name goes on to
    # the operator, whose message (eager and fake alike) names the value and the names.
    with pytest.raises(ValueError, match=f'unknown activation "{activation}".*"gelu_tanh".*"quick_gelu"'):
        mlp_ext.fused_mlp(*_inputs(), activation=activation)
    # FusedMLP (never traced at construction) lists the aliases too.
    with pytest.raises(ValueError, match=f"FusedMLP: unknown activation '{activation}' for argument "
                                         "activation; expected one of .*'gelu_tanh'.*'swish' -> 'silu'"):
        mlp_ext.FusedMLP(4, 6, 3, activation=activation)


def test_the_operator_itself_takes_canonical_names_only():
    with pytest.raises(ValueError, match='unknown activation "gelu_new"; expected one of .*"quick_gelu"'):
        torch.ops.mlp_ext.fused_mlp(*_inputs(), activation="gelu_new")
    inputs = _inputs()
    torch.testing.assert_close(mlp_ext.fused_mlp(*inputs, activation="gelu_new"),
                               mlp_ext.fused_mlp(*inputs, activation="gelu_tanh"), rtol=0, atol=0)


@pytest.mark.parametrize("weight_decay", [-0.1, math.inf, math.nan])
def test_bad_weight_decay(weight_decay):
    with pytest.raises(ValueError, match="weight_decay to be a finite number >= 0, but got"):
        mlp_ext.fused_mlp(*_inputs(), weight_decay=weight_decay)


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown activation 'swoosh'"):
        mlp_ext.FusedMLP(4, 6, 3, activation="swoosh")
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


# ---------------------------------------------------------------------------
# The same checks eagerly, under FakeTensor (torch.compile / torch.export trace
# with it) and on meta tensors: the fake kernels (mlp_ext/_meta.py) follow the
# real ones' rules and messages.

def _raised(fn):
    """(exception type, message) of what fn() raises; None if it returns."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the point is to capture it
        return type(e), str(e)
    return None


def _faked(args, mode):
    return [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]


def _leaves(inputs, requires_grad):
    return [t if t is None else t.detach().requires_grad_(requires_grad and t.is_floating_point())
            for t in inputs]


# name -> (fused_mlp's positional arguments from fresh float32 inputs, keyword arguments)
FORWARD_CASES = {
    "x of another width": (lambda i: _replace(i, 0, torch.randn(5, 7)), {}),
    "0-dim x": (lambda i: _replace(i, 0, torch.tensor(1.0)), {}),
    "3-D w1": (lambda i: _replace(i, 1, torch.randn(6, 4, 1)), {}),
    "w2 of another hidden size": (lambda i: _replace(i, 2, torch.randn(3, 5)), {}),
    "1-D w2": (lambda i: _replace(i, 2, torch.randn(3)), {}),
    "b1 of another length": (lambda i: _replace(i, 3, torch.randn(5)), {}),
    "2-D b1 (6, 1)": (lambda i: _replace(i, 3, torch.randn(6, 1)), {}),
    "2-D b1 (6, 4)": (lambda i: _replace(i, 3, torch.randn(6, 4)), {}),
    "b2 of another length": (lambda i: _replace(i, 4, torch.randn(4)), {}),
    "float64 w1": (lambda i: _replace(i, 1, i[1].double()), {}),
    "float64 b2": (lambda i: _replace(i, 4, i[4].double()), {}),
    "int64 inputs": (lambda i: [t.long() for t in i], {}),
    "bool inputs": (lambda i: [t.bool() for t in i], {}),
    "bfloat16 x, float32 weights": (lambda i: _replace(i, 0, i[0].bfloat16()), {}),
    "float16 b1": (lambda i: _replace(i, 3, i[3].half()), {}),
    "unknown activation": (lambda i: i, {"activation": "ReLU"}),
    "negative weight_decay": (lambda i: i, {"weight_decay": -0.5}),
    "nan weight_decay": (lambda i: i, {"weight_decay": math.nan}),
    "inf weight_decay": (lambda i: i, {"weight_decay": math.inf}),
}


@pytest.mark.parametrize("requires_grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_fake_kernels_raise_what_the_real_ones_raise(case, requires_grad):
    build, kwargs = FORWARD_CASES[case]
    args = _leaves(build(_inputs()), requires_grad)
    eager = _raised(lambda: mlp_ext.fused_mlp(*args, **kwargs))
    assert eager is not None, case
    mode = FakeTensorMode()
    fake_args = _faked(args, mode)
    with mode:
        fake = _raised(lambda: mlp_ext.fused_mlp(*fake_args, **kwargs))
    assert fake == eager


@pytest.mark.parametrize("case", list(FORWARD_CASES))
def test_meta_tensors_raise_what_cpu_tensors_raise(case):
    """All inputs on meta (the same rules as on the CPU)."""
    build, kwargs = FORWARD_CASES[case]
    args = build(_inputs())
    eager = _raised(lambda: mlp_ext.fused_mlp(*args, **kwargs))
    meta = _raised(lambda: mlp_ext.fused_mlp(*[t.to("meta") for t in args], **kwargs))
    assert meta is not None and meta[0] is eager[0], (meta, eager)
    if "floating dtype" not in eager[1]:
        assert meta[1] == eager[1].replace("(cpu)", "(meta)")


def _cause_chain(e):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


@pytest.mark.parametrize("case", ["x of another width", "int64 inputs", "unknown activation",
                                  "nan weight_decay", "2-D b1 (6, 1)"])
def test_compile_and_export_raise_the_eager_error(case):
    build, kwargs = FORWARD_CASES[case]
    args = build(_inputs())
    eager_type, eager_message = _raised(lambda: mlp_ext.fused_mlp(*args, **kwargs))

    def f(*a):
        return mlp_ext.fused_mlp(*a, **kwargs)

    class Module(torch.nn.Module):
        def forward(self, *a):
            return f(*a)

    torch._dynamo.reset()
    for run in (lambda: torch.compile(f, fullgraph=True, backend="eager")(*args),
                lambda: torch.export.export(Module(), tuple(args))):
        with pytest.raises(Exception) as info:
            run()
        assert any(type(e) is eager_type and str(e) == eager_message
                   for e in _cause_chain(info.value)), info.value


@pytest.mark.parametrize("requires_grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("index, name", list(enumerate(["x", "w1", "w2", "b1", "b2"])))
def test_cpu_and_meta_tensors_mixed_raise(index, name, requires_grad):
    """A meta tensor among CPU ones wins the dispatch: the fake kernel runs and must
    report the device mismatch (never a CPU tensor of uninitialised memory)."""
    inputs = _leaves(_inputs(), requires_grad)
    moved = _replace(inputs, index, inputs[index].detach().to("meta"))
    other = "w1" if name == "x" else name
    with pytest.raises(RuntimeError, match=rf"expected {other} on the device of x \((cpu|meta)\), "
                                           r"but got \w+ on (meta|cpu)"):
        mlp_ext.fused_mlp(*moved, weight_decay=0.1)


def test_cpu_and_meta_mixed_in_the_loss_raise():
    x, w1, w2, b1, b2 = _inputs()
    target = torch.randint(0, 3, (5,))
    with pytest.raises(RuntimeError, match=r"expected w2 on the device of x \(cpu\), but got w2 on meta"):
        mlp_ext.fused_mlp_loss(x, target, w1, w2.to("meta"), b1, b2)
    with pytest.raises(RuntimeError, match=r"expected target on the device of x \(cpu\), "
                                           r"but got target on meta"):
        mlp_ext.fused_mlp_loss(x, target.to("meta"), w1, w2, b1, b2)


# name -> keyword arguments of fused_mlp_loss that replace the good ones
LOSS_CASES = {
    "unknown loss": {"loss": "hinge"},
    "unknown reduction": {"reduction": "avg"},
    "int32 class indices": {"target": torch.randint(0, 3, (5,), dtype=torch.int32)},
    "class indices of another shape": {"target": torch.randint(0, 3, (4,))},
    "float64 probabilities": {"target": torch.rand(5, 3, dtype=torch.float64)},
    "probabilities of another shape": {"target": torch.rand(5, 4)},
    "mse target of another shape": {"loss": "mse", "target": torch.rand(5, 2)},
    "mse int64 target": {"loss": "mse", "target": torch.randint(0, 3, (5, 3))},
    "x of another width": {"x": torch.randn(5, 7)},
    "unknown activation": {"activation": "gelu_newest"},
}


@pytest.mark.parametrize("requires_grad", [False, True], ids=["evaluation", "training"])
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_loss_fake_kernels_raise_what_the_real_ones_raise(case, requires_grad):
    x, w1, w2, b1, b2 = _leaves(_inputs(), requires_grad)
    kwargs = dict(x=x, target=torch.randint(0, 3, (5,)), w1=w1, w2=w2, b1=b1, b2=b2)
    kwargs.update(LOSS_CASES[case])
    eager = _raised(lambda: mlp_ext.fused_mlp_loss(**kwargs))
    assert eager is not None, case
    mode = FakeTensorMode()
    fake_kwargs = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v
                   for k, v in kwargs.items()}
    with mode:
        fake = _raised(lambda: mlp_ext.fused_mlp_loss(**fake_kwargs))
    assert fake == eager


def _backward_args():
    x, w1, w2, _, _ = _inputs()
    z, h, grad_o = torch.randn(5, 6), torch.randn(5, 6), torch.randn(5, 3)
    return [grad_o, torch.tensor(1.0), x, w1, w2, z, h, "relu", 0.1, [True] * 5]


BACKWARD_CASES = {
    "z of another width": (5, torch.randn(5, 7)),
    "1-D z": (5, torch.randn(30)),
    "h of another shape": (6, torch.randn(4, 6)),
    "x of another batch": (2, torch.randn(4, 4)),
    "grad_o of another size": (0, torch.randn(5, 4)),
    "grad_s of two elements": (1, torch.ones(2)),
    "float64 grad_o": (0, torch.randn(5, 3, dtype=torch.float64)),
    "float64 w2": (4, torch.randn(3, 6, dtype=torch.float64)),
    "w2 of another hidden size": (4, torch.randn(3, 5)),
    "unknown activation": (7, "softplus"),
}


@pytest.mark.parametrize("case", list(BACKWARD_CASES))
def test_backward_op_checks_its_arguments_eager_and_fake(case):
    index, bad = BACKWARD_CASES[case]
    args = _replace(_backward_args(), index, bad)
    op = torch.ops.mlp_ext.fused_mlp_backward
    eager = _raised(lambda: op(*args))
    assert eager is not None and eager[0] in (RuntimeError, TypeError, ValueError), eager
    assert "fused_mlp" in eager[1]
    mode = FakeTensorMode()
    fake_args = _faked(args, mode)
    with mode:
        fake = _raised(lambda: op(*fake_args))
    assert fake == eager


# ---------------------------------------------------------------------------
# Arguments of the wrong type: a clear TypeError naming the argument, where the
# op's schema would otherwise fail obscurely or coerce silently.

@pytest.mark.parametrize("name, value, expected", [
    ("x", None, "x to be a Tensor, but got NoneType"),
    ("w1", None, "w1 to be a Tensor, but got NoneType"),
    ("w2", [[1.0]], "w2 to be a Tensor, but got list"),
    ("b1", "zeros", "b1 to be a Tensor or None, but got str"),
    ("activation", 3, "activation to be a str, an activation module or a function, but got int"),
    ("activation", int, "activation to be a str, an activation module or a function, but got the "
                        "class int"),
    ("weight_decay", True, "weight_decay to be a real number, but got bool"),
    ("weight_decay", torch.tensor([0.1]), "weight_decay to be a real number, but got Tensor"),
    ("weight_decay", "0.1", "weight_decay to be a real number, but got str"),
    ("save_hidden", None, "save_hidden to be a bool, but got NoneType"),
    ("save_hidden", 1, "save_hidden to be a bool, but got int"),
])
def test_arguments_of_the_wrong_type(name, value, expected):
    x, w1, w2, b1, b2 = _inputs()
    kwargs = dict(x=x, w1=w1, w2=w2, b1=b1, b2=b2)
    kwargs[name] = value
    with pytest.raises(TypeError, match=f"fused_mlp: expected {expected}"):
        mlp_ext.fused_mlp(**kwargs)
    target = torch.randint(0, 3, (5,))
    with pytest.raises(TypeError, match=f"fused_mlp_loss: expected {expected}"):
        mlp_ext.fused_mlp_loss(target=target, **kwargs)


@pytest.mark.parametrize("name, value, exc, expected", [
    ("target", None, TypeError, "target to be a Tensor, but got NoneType"),
    ("loss", 3, TypeError, "loss to be a str, but got int"),
    ("reduction", None, TypeError, "reduction to be a str, but got NoneType"),
    ("return_output", "yes", TypeError, "return_output to be a bool, but got str"),
])
def test_loss_arguments_of_the_wrong_type(name, value, exc, expected):
    x, w1, w2, b1, b2 = _inputs()
    kwargs = dict(x=x, target=torch.randint(0, 3, (5,)), w1=w1, w2=w2, b1=b1, b2=b2)
    kwargs[name] = value
    with pytest.raises(exc, match=f"fused_mlp_loss: expected {expected}"):
        mlp_ext.fused_mlp_loss(**kwargs)


@pytest.mark.parametrize("kwargs, exc, expected", [
    (dict(in_features="4"), TypeError, "in_features to be an int, but got str"),
    (dict(hidden_features=6.0), TypeError, "hidden_features to be an int, but got float"),
    (dict(out_features=True), TypeError, "out_features to be an int, but got bool"),
    (dict(in_features=-1), ValueError, "in_features >= 0, but got -1"),
    (dict(bias=None), TypeError, "bias to be a bool, but got NoneType"),
    (dict(save_hidden="no"), TypeError, "save_hidden to be a bool, but got str"),
    (dict(activation=3), TypeError, "activation to be a str, an activation module or a function, "
                                    "but got int"),
    (dict(activation="swoosh"), ValueError, "unknown activation 'swoosh'"),
    (dict(weight_decay="1e-4"), TypeError, "weight_decay to be a real number, but got str"),
    (dict(weight_decay=math.nan), ValueError, "weight_decay to be a finite number >= 0"),
])
def test_module_constructor_rejects_bad_arguments(kwargs, exc, expected):
    arguments = dict(in_features=4, hidden_features=6, out_features=3)
    arguments.update(kwargs)
    positional = [arguments.pop(k) for k in ("in_features", "hidden_features", "out_features")]
    with pytest.raises(exc, match=f"FusedMLP: expected {expected}|FusedMLP: {expected}"):
        mlp_ext.FusedMLP(*positional, **arguments)


def test_module_call_rejects_bad_inputs():
    mlp = mlp_ext.FusedMLP(4, 6, 3)
    with pytest.raises(TypeError, match="fused_mlp: expected x to be a Tensor, but got list"):
        mlp([[1.0, 2.0, 3.0, 4.0]])
    with pytest.raises(TypeError, match=r"float32, float64, float16 or bfloat16\), but got Long"):
        mlp(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"expected w1 on the device of x \(meta\)"):
        mlp(torch.randn(2, 4, device="meta"))


@pytest.mark.parametrize("args, kwargs, exc, expected", [
    ((True, 4, 6, 3), {}, TypeError, "batch to be an int or a sequence of ints"),
    (("32", 4, 6, 3), {}, TypeError, "batch to be an int or a sequence of ints"),
    (((2, -3), 4, 6, 3), {}, ValueError, "batch >= 0"),
    ((32, 4.0, 6, 3), {}, TypeError, "in_features to be an int"),
    ((32, 4, 6, -3), {}, ValueError, "out_features >= 0"),
    ((32, 4, 6, 3), {"bias": None}, TypeError, "bias to be a bool"),
    ((32, 4, 6, 3), {"training": 1}, TypeError, "training to be a bool"),
    ((32, 4, 6, 3), {"dtype": torch.int32}, TypeError, "a floating torch.dtype"),
])
def test_memory_footprint_rejects_bad_arguments(args, kwargs, exc, expected):
    with pytest.raises(exc, match=f"memory_footprint: expected {expected}"):
        mlp_ext.memory_footprint(*args, **kwargs)


def test_parallel_constructors_reject_bad_arguments():
    from mlp_ext import parallel

    with pytest.raises(ValueError, match="unknown activation 'bogus'"):
        parallel.TensorParallelFusedMLP(4, 6, 3, activation="bogus")
    with pytest.raises(TypeError, match="expected a mlp_ext.FusedMLP, got Linear"):
        parallel.TensorParallelFusedMLP.from_fused(torch.nn.Linear(4, 3))
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        parallel.TensorParallelFusedMLP(4, 6, 3)
    with pytest.raises(ValueError, match="world_size >= 1"):
        parallel.shard_sizes(6, 0)
    with pytest.raises(ValueError, match="0 <= rank < world_size = 2, got rank 2"):
        parallel.shard_range(6, 2, 2)


# ---------------------------------------------------------------------------
# Hidden-layer dropout: a probability in [0, 1], checked by the op, its fake
# kernel and the Python entry points alike (also with training=False, as F.dropout
# checks p in eval mode).

BAD_DROPOUTS = [(-0.1, "-0.1"), (1.5, "1.5"), (math.nan, "nan"), (math.inf, "inf")]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dropout, shown", BAD_DROPOUTS)
def test_bad_dropout(dropout, shown, training):
    x, w1, w2, b1, b2 = _inputs()
    message = f"expected dropout to be a probability in [0, 1], but got {shown}"
    with pytest.raises(ValueError) as info:
        mlp_ext.fused_mlp(x, w1, w2, b1, b2, dropout=dropout, training=training)
    assert str(info.value) == f"fused_mlp: {message}"
    with pytest.raises(ValueError) as info:
        mlp_ext.fused_mlp_loss(x, torch.randint(0, 3, (5,)), w1, w2, b1, b2, dropout=dropout,
                               training=training)
    assert str(info.value) == f"fused_mlp_loss: {message}"
    with pytest.raises(ValueError) as info:
        mlp_ext.FusedMLP(4, 6, 3, dropout=dropout)
    assert str(info.value) == f"FusedMLP: {message}"
    with pytest.raises(ValueError) as info:
        mlp_ext.memory_footprint(5, 4, 6, 3, dropout=dropout)
    assert str(info.value) == f"memory_footprint: {message}"


# op -> a call of it with the given dropout (the ops below the Python entry points)
DROPOUT_OP_CALLS = {
    "fused_mlp": lambda i, p: torch.ops.mlp_ext.fused_mlp(*i, dropout=p),
    "fused_mlp_forward": lambda i, p: torch.ops.mlp_ext.fused_mlp_forward(*i, "relu", 0.0, p),
    "fused_mlp_inference": lambda i, p: torch.ops.mlp_ext.fused_mlp_inference(*i, "relu", 0.0, p),
    "fused_mlp_loss": lambda i, p: torch.ops.mlp_ext.fused_mlp_loss(
        i[0], torch.randint(0, 3, (5,)), *i[1:], dropout=p),
}


@pytest.mark.parametrize("requires_grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("dropout", [-0.1, 1.5, math.nan])
@pytest.mark.parametrize("op", list(DROPOUT_OP_CALLS))
def test_ops_check_dropout_eager_fake_and_compiled(op, dropout, requires_grad):
    call = DROPOUT_OP_CALLS[op]
    args = _leaves(_inputs(), requires_grad)
    eager = _raised(lambda: call(args, dropout))
    assert eager is not None and eager[0] is ValueError
    assert eager[1] == f"fused_mlp: expected dropout to be a probability in [0, 1], but got " \
                       f"{dropout:g}"
    mode = FakeTensorMode()
    fake_args = _faked(args, mode)
    with mode:
        assert _raised(lambda: call(fake_args, dropout)) == eager
    torch._dynamo.reset()
    with pytest.raises(Exception) as info:
        torch.compile(lambda *a: call(a, dropout), fullgraph=True, backend="eager")(*args)
    assert any(type(e) is ValueError and str(e) == eager[1] for e in _cause_chain(info.value))


@pytest.mark.parametrize("name, value, expected", [
    ("dropout", True, "dropout to be a real number, but got bool"),
    ("dropout", "0.5", "dropout to be a real number, but got str"),
    ("dropout", None, "dropout to be a real number, but got NoneType"),
    ("training", 1, "training to be a bool, but got int"),
    ("training", None, "training to be a bool, but got NoneType"),
])
def test_dropout_arguments_of_the_wrong_type(name, value, expected):
    x, w1, w2, b1, b2 = _inputs()
    with pytest.raises(TypeError, match=f"fused_mlp: expected {expected}"):
        mlp_ext.fused_mlp(x, w1, w2, b1, b2, **{name: value})
    with pytest.raises(TypeError, match=f"fused_mlp_loss: expected {expected}"):
        mlp_ext.fused_mlp_loss(x, torch.randint(0, 3, (5,)), w1, w2, b1, b2, **{name: value})
    if name == "dropout":
        with pytest.raises(TypeError, match=f"FusedMLP: expected {expected}"):
            mlp_ext.FusedMLP(4, 6, 3, dropout=value)


# name -> the backward op's arguments (dropout_mask, dropout) that replace good ones
DROPOUT_BACKWARD_CASES = {
    "dropout without a mask": (None, 0.5),
    "mask of another shape": (torch.ones(5, 7, dtype=torch.bool), 0.5),
    "uint8 mask": (torch.ones(5, 6, dtype=torch.uint8), 0.5),
    "float mask": (torch.ones(5, 6), 0.5),
    "dropout above 1": (torch.ones(5, 6, dtype=torch.bool), 1.5),
    "negative dropout": (torch.ones(5, 6, dtype=torch.bool), -0.5),
    "meta mask": (torch.ones(5, 6, dtype=torch.bool, device="meta"), 0.5),
}


@pytest.mark.parametrize("case", list(DROPOUT_BACKWARD_CASES))
def test_backward_op_checks_the_dropout_mask_eager_and_fake(case):
    mask, dropout = DROPOUT_BACKWARD_CASES[case]
    args = _backward_args() + [mask, dropout]
    op = torch.ops.mlp_ext.fused_mlp_backward
    if mask is not None and mask.is_meta:  # a meta tensor wins the dispatch: fake kernel only
        with pytest.raises(RuntimeError, match=r"expected dropout_mask on the device of z \(cpu\), "
                                               r"but got dropout_mask on meta"):
            op(*args)
        return
    eager = _raised(lambda: op(*args))
    assert eager is not None and "fused_mlp_backward" in eager[1] and "dropout" in eager[1], eager
    mode = FakeTensorMode()
    fake_args = _faked(args, mode)
    with mode:
        assert _raised(lambda: op(*fake_args)) == eager
