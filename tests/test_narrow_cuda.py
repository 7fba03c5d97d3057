"""The fully fused narrow-MLP CUDA path (csrc/cuda/narrow_mlp.cu).

Every test forces a path with the environment variable MLP_EXT_NARROW (read at
each call): "on" takes the fused kernels wherever they cover the problem (widths
multiples of 16 up to 128; float16, bfloat16, or float32 with TF32 allowed), "off"
(the default while the variable is unset) always takes the GEMM path, "auto" picks
by the thresholds of narrow_preferred (csrc/cuda/narrow_path.h). Results of both
paths are compared with float64 references computed from the same rounded inputs;
the profiler tells which kernels ran. Which problems the choice accepts, and why it
refuses the others, is tested without a GPU in tests/test_narrow_path.py.
"""
import contextlib
import math
import secrets

import pytest
import torch

import mlp_ext
from mlp_ext import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FORWARD_KERNEL = "narrow_forward_kernel"
BACKWARD_KERNEL = "narrow_backward_kernel"
REDUCE_KERNEL = "narrow_reduce_kernel"
FUSED_KERNELS = (FORWARD_KERNEL, BACKWARD_KERNEL, REDUCE_KERNEL)

# Relative Frobenius error allowed against the float64 reference: a few units of
# rounding (2^-11 for float16 and TF32 operands, 2^-9 for bfloat16) compounded
# over the rounded intermediates z, H, G_Z. Either path must meet it.
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-2}

# (leading shape of x, d, h, q): tails of every size against 16-row strips and
# tiles of up to 128 rows, every width from 16 to 128, leading dimensions.
SHAPES = [
    ((1,), 16, 16, 16),
    ((15,), 32, 64, 16),
    ((17,), 128, 16, 128),
    ((129,), 48, 80, 112),
    ((1000,), 64, 64, 64),
    ((4099,), 128, 128, 128),
    ((3, 37), 96, 112, 80),
    ((2053,), 16, 128, 32),
    ((513,), 112, 32, 64),
    ((127,), 64, 128, 96),
    ((300,), 80, 48, 16),
    ((8191,), 32, 32, 32),
]

# float32 goes through the fused kernels only as TF32: "tf32" is float32 with
# torch.set_float32_matmul_precision("high").
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "tf32": torch.float32}


@pytest.fixture
def path(monkeypatch):
    """path("on" | "off" | "auto") selects the path for the calls that follow."""
    return lambda mode: monkeypatch.setenv("MLP_EXT_NARROW", mode)


@contextlib.contextmanager
def matmul_precision(precision):
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def precision_for(dtype_name):
    return matmul_precision("high" if dtype_name == "tf32" else "highest")


def profiled(fn):
    """(fn(), the set of fused kernels (names above) that ran on the GPU meanwhile)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    names = [event.name for event in prof.events()]
    return result, {kernel for kernel in FUSED_KERNELS if any(kernel in name for name in names)}


def make_problem(lead, d, h, q, dtype, *, bias=True, seed=None, activation=None):
    """x, w1, w2, b1, b2 (initialized like nn.Linear), grad_o, grad_s on CUDA in dtype.

    relu'(z) jumps at z = 0, where rounding z (float32 accumulation, the dtype) can
    flip it against the float64 reference and move one row's gradient by O(1). For
    activation="relu" the rows with a pre-activation within 1e-5 of 0 (a few in
    10^3) get a zero upstream gradient, so that they add nothing to any gradient.
    float32 products may run as TF32 (11 significant bits), which moves z by ~1e-4,
    far outside that band: float32 x and w1 are drawn with bfloat16's 8 significant
    bits, exact in TF32, so that z is exact up to float32 accumulation on any path.
    """
    gen = torch.Generator(device="cuda")
    gen.manual_seed(seed if seed is not None else secrets.randbits(62))

    def uniform(*size, bound):
        return (torch.rand(*size, device="cuda", generator=gen, dtype=torch.float64) * 2 - 1) * bound

    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    # float32: through bfloat16 first (TF32-exact, see above).
    cast_tf32_exact = (lambda t: t.to(torch.bfloat16).to(dtype)) if dtype == torch.float32 else cast
    x = cast_tf32_exact(torch.randn(*lead, d, device="cuda", generator=gen, dtype=torch.float64))
    w1, w2 = cast_tf32_exact(uniform(h, d, bound=d**-0.5)), cast(uniform(q, h, bound=h**-0.5))
    b1, b2 = (cast(uniform(h, bound=d**-0.5)), cast(uniform(q, bound=h**-0.5))) if bias else (None, None)
    grad_o = torch.randn(*lead, q, device="cuda", generator=gen, dtype=torch.float64)
    grad_s = torch.rand((), device="cuda", generator=gen, dtype=torch.float64) + 0.5
    if activation == "relu":
        z = x.double() @ w1.double().T + (0 if b1 is None else b1.double())
        grad_o[z.abs().amin(dim=-1) < 1e-5] = 0
    return [x, w1, w2, b1, b2], cast(grad_o), cast(grad_s)


def forward_backward(inputs, grad_o, grad_s, activation, weight_decay, fn=mlp_ext.fused_mlp):
    """(o, s, *gradients of every input given) for J = <grad_o, o> + grad_s * s."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in inputs]
    params = [t for t in leaves if t is not None]
    o, s = fn(*leaves, activation=activation, weight_decay=weight_decay)
    grads = torch.autograd.grad((o, s), params, (grad_o, grad_s))
    return [o.detach(), s.detach(), *grads]


def float64_reference(inputs, grad_o, grad_s, activation, weight_decay):
    """forward_backward of reference.fused_mlp (torch ops) on float64 copies."""
    return forward_backward([None if t is None else t.double() for t in inputs], grad_o.double(),
                            grad_s.double(), activation, weight_decay, fn=reference.fused_mlp)


def relative_error(actual, expected):
    expected = expected.double()
    denominator = expected.norm().clamp_min(1e-30)
    return ((actual.double() - expected).norm() / denominator).item()


def assert_close_to(name, actual, expected, tol, features=None):
    """Relative Frobenius error <= tol, over the whole tensor and, for (*, features)
    tensors, over the last 37 rows alone (where a tail-masking bug would show)."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    error = relative_error(actual, expected)
    assert error <= tol, f"{name}: relative error {error:.3g} > {tol}"  # NaN fails too
    if features is not None and actual.numel() > 0:
        a, e = actual.reshape(-1, features)[-37:], expected.reshape(-1, features)[-37:]
        tail = relative_error(a, e)
        assert tail <= tol, f"{name}: relative error of the last rows {tail:.3g} > {tol}"


NAMES = ["o", "s", "dx", "dw1", "dw2", "db1", "db2"]


def features_of(name, d, h, q):
    return {"o": q, "dx": d}.get(name)


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_fused_and_gemm_paths_match_float64_reference(path, dtype_name, bias, weight_decay,
                                                      activation):
    """Forward and every gradient, on both paths, over SHAPES, against float64."""
    dtype, tol = DTYPES[dtype_name], TOLERANCE[DTYPES[dtype_name]]
    names = NAMES if bias else NAMES[:5]
    for lead, d, h, q in SHAPES:
        seed = secrets.randbits(62)
        inputs, grad_o, grad_s = make_problem(lead, d, h, q, dtype, bias=bias, seed=seed,
                                              activation=activation)
        where = f"shape {(*lead, d)} -> {h} -> {q}, seed {seed}"
        expected = float64_reference(inputs, grad_o, grad_s, activation, weight_decay)
        for mode in ("on", "off"):
            path(mode)
            with precision_for(dtype_name):
                actual, kernels = profiled(
                    lambda: forward_backward(inputs, grad_o, grad_s, activation, weight_decay))
            assert kernels == (set(FUSED_KERNELS) if mode == "on" else set()), (mode, where)
            for name, a, e in zip(names, actual, expected):
                assert a.dtype == dtype, f"{name} ({mode}): dtype {a.dtype}"
                assert_close_to(f"{name} ({mode}, {where})", a, e, tol, features_of(name, d, h, q))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_many_tiles_per_block(path, dtype_name):
    """A batch far larger than one tile per block: the persistent loop, the cp.async
    double buffer and the cross-block reduction, with a tail."""
    dtype = DTYPES[dtype_name]
    inputs, grad_o, grad_s = make_problem((2**17 + 3,), 64, 64, 64, dtype)
    expected = float64_reference(inputs, grad_o, grad_s, "gelu", 0.1)
    path("on")
    with precision_for(dtype_name):
        actual = forward_backward(inputs, grad_o, grad_s, "gelu", 0.1)
    for name, a, e in zip(NAMES, actual, expected):
        assert_close_to(name, a, e, TOLERANCE[dtype], features_of(name, 64, 64, 64))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_fused_backward_is_deterministic(path, dtype_name):
    """Bitwise equal gradients run to run (fixed-order sums, no atomics)."""
    inputs, grad_o, grad_s = make_problem((50_001,), 64, 128, 32, DTYPES[dtype_name])
    path("on")
    with precision_for(dtype_name):
        first = forward_backward(inputs, grad_o, grad_s, "tanh", 0.2)
        second = forward_backward(inputs, grad_o, grad_s, "tanh", 0.2)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("needs", [("x",), ("w1",), ("w2",), ("b1", "b2"), ("w1", "b1"),
                                   ("x", "w2", "b2")])
def test_only_requested_gradients(path, needs):
    """Any subset of inputs requiring grad: the fused backward computes those, right."""
    names = ["x", "w1", "w2", "b1", "b2"]
    inputs, grad_o, grad_s = make_problem((777,), 48, 96, 32, torch.float16)
    leaves = [t.detach().requires_grad_(n in needs) for n, t in zip(names, inputs)]
    leaves64 = [t.detach().double().requires_grad_(n in needs) for n, t in zip(names, inputs)]
    path("on")

    def run():
        o, s = mlp_ext.fused_mlp(*leaves, activation="silu", weight_decay=0.5)
        return torch.autograd.grad((o, s), [t for t in leaves if t.requires_grad], (grad_o, grad_s))

    grads, kernels = profiled(run)
    assert BACKWARD_KERNEL in kernels
    o64, s64 = reference.fused_mlp(*leaves64, activation="silu", weight_decay=0.5)
    expected = torch.autograd.grad((o64, s64), [t for t in leaves64 if t.requires_grad],
                                   (grad_o.double(), grad_s.double()))
    for name, a, e in zip(needs, grads, expected):
        assert_close_to(name, a, e, TOLERANCE[torch.float16])


UNCOVERED = {  # (d, h, q, dtype): outside the fused kernels' coverage
    "d=20": (20, 64, 64, torch.float16),
    "h=144": (64, 144, 64, torch.bfloat16),
    "q=8": (64, 64, 8, torch.float16),
    "float64": (64, 64, 64, torch.float64),
    "float32 without TF32": (64, 64, 64, torch.float32),
}


@pytest.mark.parametrize("case", list(UNCOVERED))
def test_uncovered_problems_take_the_gemm_path(path, case):
    """Forced on, problems the fused kernels do not cover still run (GEMM path), right."""
    d, h, q, dtype = UNCOVERED[case]
    inputs, grad_o, grad_s = make_problem((333,), d, h, q, dtype, activation="relu")
    expected = float64_reference(inputs, grad_o, grad_s, "relu", 0.1)
    path("on")
    with matmul_precision("highest"):
        actual, kernels = profiled(lambda: forward_backward(inputs, grad_o, grad_s, "relu", 0.1))
    assert kernels == set()
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, TOLERANCE.get(dtype))
    for name, a, e in zip(NAMES, actual, expected):
        assert_close_to(name, a, e, tol)


def test_float32_uses_fused_path_only_with_tf32(path):
    inputs, grad_o, grad_s = make_problem((256,), 32, 32, 32, torch.float32)
    path("on")
    step = lambda: forward_backward(inputs, grad_o, grad_s, "relu", 0.0)  # noqa: E731
    with matmul_precision("highest"):
        assert profiled(step)[1] == set()
    with matmul_precision("high"):
        assert profiled(step)[1] == set(FUSED_KERNELS)


def test_off_and_auto(path):
    """"off" never runs a fused kernel; "auto" gives the results of one of the paths."""
    inputs, grad_o, grad_s = make_problem((4096,), 64, 64, 64, torch.bfloat16)
    expected = float64_reference(inputs, grad_o, grad_s, "gelu_tanh", 0.0)
    for mode in ("off", "auto"):
        path(mode)
        actual, kernels = profiled(
            lambda: forward_backward(inputs, grad_o, grad_s, "gelu_tanh", 0.0))
        if mode == "off":
            assert kernels == set()
        for name, a, e in zip(NAMES, actual, expected):
            assert_close_to(f"{name} ({mode})", a, e, TOLERANCE[torch.bfloat16])


def test_misaligned_and_strided_inputs(path):
    """x at an odd element offset (not 16-byte aligned) and transposed weights: right
    results (the op copies or falls back; the kernels never see a misaligned pointer)."""
    d, h, q, n = 64, 32, 48, 300
    inputs, grad_o, grad_s = make_problem((n,), d, h, q, torch.float16)
    x, w1, w2, b1, b2 = inputs
    storage = torch.empty(n * d + 1, dtype=x.dtype, device="cuda")
    storage[1:].copy_(x.reshape(-1))
    x_odd = storage[1:].view(n, d)
    assert x_odd.data_ptr() % 16 != 0
    w1_t = w1.t().contiguous().t()  # same values, column-major
    expected = float64_reference(inputs, grad_o, grad_s, "sigmoid", 0.0)
    path("on")
    actual = forward_backward([x_odd, w1_t, w2, b1, b2], grad_o, grad_s, "sigmoid", 0.0)
    for name, a, e in zip(NAMES, actual, expected):
        assert_close_to(name, a, e, TOLERANCE[torch.float16])


def test_empty_batch(path):
    """n = 0: o is empty, the weight gradients are the decay term, bias gradients 0."""
    inputs, _, _ = make_problem((0,), 32, 64, 16, torch.float16)
    grad_o = torch.empty(0, 16, dtype=torch.float16, device="cuda")
    grad_s = torch.tensor(2.0, dtype=torch.float16, device="cuda")
    path("on")
    o, s, dx, dw1, dw2, db1, db2 = forward_backward(inputs, grad_o, grad_s, "relu", 0.25)
    assert o.shape == (0, 16) and dx.shape == (0, 32)
    torch.testing.assert_close(dw1, 0.5 * inputs[1])
    torch.testing.assert_close(dw2, 0.5 * inputs[2])
    assert not db1.any() and not db2.any()


def test_non_default_stream(path):
    """Kernels run on the current stream: results right when it is not the default."""
    inputs, grad_o, grad_s = make_problem((5000,), 64, 64, 64, torch.float16)
    expected = float64_reference(inputs, grad_o, grad_s, "tanh", 0.1)
    path("on")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        actual = forward_backward(inputs, grad_o, grad_s, "tanh", 0.1)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for name, a, e in zip(NAMES, actual, expected):
        assert_close_to(name, a, e, TOLERANCE[torch.float16])


def test_inference_under_no_grad(path):
    """Under no_grad (no z and H needed) o is the same as with autograd recording."""
    inputs, _, _ = make_problem((3000,), 128, 64, 32, torch.bfloat16)
    path("on")
    with torch.no_grad():
        o_inference, _ = mlp_ext.fused_mlp(*inputs, activation="gelu")
    o_training, _ = mlp_ext.fused_mlp(*[t.requires_grad_() for t in inputs], activation="gelu")
    assert torch.equal(o_inference, o_training.detach())


def test_module_training_step_on_fused_path(path):
    """FusedMLP in float16: a few SGD steps on the fused path track the GEMM path."""
    torch.manual_seed(0)
    x = torch.randn(4096, 32, device="cuda", dtype=torch.float16)
    target = torch.randn(4096, 16, device="cuda", dtype=torch.float16)
    models = {}
    for mode in ("on", "off"):
        path(mode)
        torch.manual_seed(1)
        model = mlp_ext.FusedMLP(32, 64, 16, activation="silu", weight_decay=1e-3,
                                 device="cuda", dtype=torch.float16)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(5):
            opt.zero_grad(set_to_none=True)
            o, s = model(x, return_penalty=True)
            loss = (o.float() - target.float()).square().mean() + s.float()
            loss.backward()
            opt.step()
        models[mode] = model
    for (name, p_on), p_off in zip(models["on"].named_parameters(), models["off"].parameters()):
        assert math.isfinite(p_on.float().abs().max().item()), name
        torch.testing.assert_close(p_on, p_off, rtol=2e-2, atol=2e-3, msg=name)


def test_unset_means_off(monkeypatch):
    """Without MLP_EXT_NARROW the GEMM path runs (the fused kernels are opt-in)."""
    monkeypatch.delenv("MLP_EXT_NARROW", raising=False)
    inputs, grad_o, grad_s = make_problem((512,), 64, 64, 64, torch.float16)
    _, kernels = profiled(lambda: forward_backward(inputs, grad_o, grad_s, "relu", 0.1))
    assert kernels == set()


def test_invalid_mode_is_a_clear_error(path):
    inputs, _, _ = make_problem((8,), 16, 16, 16, torch.float16)
    path("yes")
    with pytest.raises(ValueError, match=r'MLP_EXT_NARROW.*"off", "on" or "auto".*"yes"'):
        mlp_ext.fused_mlp(*inputs)
