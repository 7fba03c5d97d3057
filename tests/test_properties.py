"""Property-based tests (hypothesis) of the CPU operator against the float64 reference.

Every example draws a whole call: sizes around the kernels' vector widths and
register tiles, 0 to 3 leading dimensions of x (n = 0 included), a memory
layout per tensor (contiguous, permuted / transposed, step-sliced, at a storage
offset, stride-0 expanded, or a view into one storage that several arguments
share, overlapping), float32 or float64, every activation, biases or not,
weight decay 0 or not, any subset of inputs requiring grad or no_grad,
save_hidden True / False, and gradient outputs in any of those layouts. It
compares o, s and every gradient the op returns with the reference
(mlp_ext.reference.fused_mlp in float64, differentiated by autograd) under a
per-element bound derived below (error_bounds).

The GEMM path (MLP_EXT_CPU_GEMM) and the instruction set (ATEN_CPU_CAPABILITY)
are read once per process, so test_every_gemm_path_and_instruction_set reruns
the core property in one fresh interpreter per path and per instruction set.

Profiles (tests/conftest.py): "ci" (the default: derandomized, a bounded
number of examples) and "long" for a local run:

    .venv/bin/python -m pytest tests/test_properties.py --hypothesis-profile=long
"""
import contextlib
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional, Tuple

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import mlp_ext  # noqa: E402
from mlp_ext import reference  # noqa: E402

# ---------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------
# Vector widths: 4 doubles / 8 floats per AVX2 vector, 8 / 16 per AVX-512
# vector. The short-side kernels (csrc/cpu/gemm_impl.h) tile out in 6 rows x 2
# (AVX2) or 4 (AVX-512) vectors (8, 16, 32, 64 columns) and their dot products
# in 2 or 4 rows x 4 columns, 16-column blocks; the split path blocks out in 16
# rows; the column sums of the backward form row blocks from 2048 rows (1025,
# 2049). Sizes at, one below and one above each multiple, and 0 (empty widths
# are valid too: the k == 0 path of the products). tests/test_size_regimes.py
# covers the larger thresholds.
WIDTHS = tuple(sorted({0, 1, 2, 3, 5, 6, 7, 100, 129} |
                      {m + e for m in (4, 8, 16, 32, 64) for e in (-1, 0, 1)}))
ROWS = tuple(sorted({0, 1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 18, 23, 24, 25, 193, 257, 1025, 2049} |
                    {m + e for m in (16, 32, 48, 64, 96, 128) for e in (-1, 0, 1)}))
widths = st.one_of(st.sampled_from(WIDTHS), st.integers(1, 80))


@st.composite
def leading_shapes(draw):
    """x.shape[:-1]: 0 to 3 leading dimensions (0: x is one example of shape (d,))."""
    ndim = draw(st.integers(0, 3))
    if ndim == 1:
        return (draw(st.one_of(st.sampled_from(ROWS), st.integers(0, 70))),)
    small = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17) if ndim == 2 else (0, 1, 2, 3, 5, 6, 7)
    return tuple(draw(st.lists(st.sampled_from(small), min_size=ndim, max_size=ndim)))


# ---------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Layout:
    """How a tensor of a given shape is laid out in memory.

    contiguous; permuted (perm: a base tensor of the permuted shape, permuted
    back; the reversed order is the transpose); sliced (every step-th entry of
    a longer base along dim, from start); offset (a contiguous view at storage
    offset `offset`); expanded (size 1 along dim, expanded: stride 0); pool (a
    view with contiguous or reversed strides at `offset` into a storage that
    every pool tensor of the call shares: arguments alias, and may overlap).
    """
    kind: str
    perm: Tuple[int, ...] = ()
    dim: int = 0
    step: int = 1
    start: int = 0
    offset: int = 0
    reversed_strides: bool = False


@st.composite
def layouts(draw, ndim, pool=True):
    kinds = ["contiguous", "permuted", "sliced", "offset", "expanded"] + (["pool"] if pool else [])
    kind = draw(st.sampled_from(kinds)) if ndim > 0 else draw(st.sampled_from(["contiguous", "offset"]))
    if kind == "permuted":
        return Layout(kind, perm=tuple(draw(st.permutations(range(ndim)))))
    if kind == "sliced":
        step = draw(st.integers(2, 3))
        return Layout(kind, dim=draw(st.integers(0, ndim - 1)), step=step,
                      start=draw(st.integers(0, step - 1)))
    if kind == "offset":
        return Layout(kind, offset=draw(st.integers(1, 17)))
    if kind == "expanded":
        return Layout(kind, dim=draw(st.integers(0, ndim - 1)))
    if kind == "pool":
        return Layout(kind, offset=draw(st.integers(0, 64)), reversed_strides=draw(st.booleans()))
    return Layout(kind)


def make_tensor(shape, layout, dtype, gen, scale=1.0, pool=None):
    """A tensor of `shape` and `dtype` (values N(0, scale^2), drawn in float64
    and rounded, so that the reference sees exactly the same numbers) in `layout`."""
    def randn(size):
        return torch.randn(size, generator=gen, dtype=torch.float64).mul_(scale).to(dtype)

    shape = tuple(shape)
    if layout.kind == "permuted":
        inverse = [layout.perm.index(i) for i in range(len(shape))]
        return randn([shape[p] for p in layout.perm]).permute(inverse)
    if layout.kind == "sliced":
        size = list(shape)
        size[layout.dim] = layout.start + shape[layout.dim] * layout.step
        index = [slice(None)] * len(shape)
        index[layout.dim] = slice(layout.start, None, layout.step)
        t = randn(size)[tuple(index)]
        assert t.shape == shape
        return t
    if layout.kind == "offset":
        return randn([math.prod(shape) + layout.offset])[layout.offset:].view(shape)
    if layout.kind == "expanded":
        size = list(shape)
        size[layout.dim] = 1
        return randn(size).expand(shape)
    if layout.kind == "pool":
        strides, step = [0] * len(shape), 1
        for i in (range(len(shape)) if layout.reversed_strides else reversed(range(len(shape)))):
            strides[i], step = step, step * max(shape[i], 1)
        return pool.as_strided(shape, strides, layout.offset)
    return randn(shape)


def pool_size(shape, layout):
    return layout.offset + max(math.prod(shape), 1)


# ---------------------------------------------------------------------------
# One call
# ---------------------------------------------------------------------------
ARGS = ("x", "w1", "w2", "b1", "b2")


@dataclasses.dataclass
class Case:
    dtype: torch.dtype
    activation: str
    lead: Tuple[int, ...]
    d: int
    h: int
    q: int
    bias1: bool
    bias2: bool
    weight_decay: float
    requires_grad: Tuple[bool, ...]  # for x, w1, w2, b1, b2
    no_grad: bool
    save_hidden: bool
    layouts: Tuple[Layout, ...]      # for x, w1, w2, b1, b2
    grad_o_layout: Layout
    grad_s: Optional[float]          # None: s gets no gradient (only o does)
    seed: int

    def shapes(self):
        return ((*self.lead, self.d), (self.h, self.d), (self.q, self.h), (self.h,), (self.q,))

    def inputs(self):
        """(x, w1, w2, b1, b2), each in its layout; b1 / b2 None without biases."""
        gen = torch.Generator().manual_seed(self.seed)
        present = (True, True, True, self.bias1, self.bias2)
        shapes = self.shapes()
        size = max([pool_size(s, l) for s, l, p in zip(shapes, self.layouts, present)
                    if p and l.kind == "pool"], default=0)
        pool = torch.randn(size, generator=gen, dtype=torch.float64).mul_(0.5).to(self.dtype)
        scales = (1.0, 1 / math.sqrt(max(self.d, 1)), 1 / math.sqrt(max(self.h, 1)), 0.5, 0.5)
        out = []
        for shape, layout, scale, p, rg in zip(shapes, self.layouts, scales, present,
                                               self.requires_grad):
            if not p:
                out.append(None)
                continue
            t = make_tensor(shape, layout, self.dtype, gen, scale, pool)
            assert t.shape == shape and not t.requires_grad
            out.append(t.requires_grad_(rg))
        grad_o = make_tensor((*self.lead, self.q), self.grad_o_layout, self.dtype, gen)
        return out, grad_o


@st.composite
def cases(draw, dtypes=(torch.float32, torch.float64)):
    lead = draw(leading_shapes())
    d, h, q = draw(widths), draw(widths), draw(widths)
    ndims = (len(lead) + 1, 2, 2, 1, 1)
    return Case(
        dtype=draw(st.sampled_from(dtypes)),
        activation=draw(st.sampled_from(mlp_ext.ACTIVATIONS)),
        lead=lead, d=d, h=h, q=q,
        bias1=draw(st.booleans()), bias2=draw(st.booleans()),
        weight_decay=draw(st.sampled_from((0.0, 0.0, 0.1, 1.5))),
        requires_grad=tuple(draw(st.lists(st.booleans(), min_size=5, max_size=5))),
        no_grad=draw(st.sampled_from((False, False, False, True))),
        save_hidden=draw(st.booleans()),
        layouts=tuple(draw(layouts(nd)) for nd in ndims),
        grad_o_layout=draw(layouts(len(lead) + 1, pool=False)),
        grad_s=draw(st.sampled_from((None, 1.0, -0.5, 3.0))),
        seed=draw(st.integers(0, 2**32 - 1)),
    )


# ---------------------------------------------------------------------------
# The bound
# ---------------------------------------------------------------------------
# max |phi'| (Lipschitz constant of phi) and max |phi''| (of phi'), rounded up:
# gelu' peaks at 1.13, silu' at 1.10, sigmoid' at 0.25; |phi''| peaks at 0.80
# (gelu, gelu_tanh: 2 pdf(0)), 0.77 (tanh), 0.5 (silu), 0.1 (sigmoid); quick_gelu's
# phi'(z) = silu'(1.702 z) peaks at 1.10 and |phi''| at 1.702 * 0.5 = 0.85 (within the
# defaults 1.2 and 1.0 below). relu's derivative jumps at 0; handled apart.
LIPSCHITZ = {"identity": 1.0, "relu": 1.0, "sigmoid": 0.25}
CURVATURE = {"identity": 0.0}
# Error of phi and phi' as the kernels evaluate them (at::vec's exp / tanh / erf
# approximations, a few ulp), in units of u * (1 + |z|): generous.
ACTIVATION_ULPS = 64


def unit_roundoff(dtype):
    return torch.finfo(dtype).eps / 2


def worst_case_growth(k):
    """gamma_k / u for a sum of k products, rounded up: |fl(sum) - sum| <= (k + 2) u sum|terms|
    in any summation order (blocked, pairwise, FMA or not; the +2 covers the
    addend and gamma_k's 1 / (1 - k u))."""
    return k + 2


def error_bounds(args, inputs64, grad_o64, growth=worst_case_growth):
    """Per-element bounds on |op - reference| for o, s and every gradient.

    The op's result in precision u (2^-24 for float32, 2^-53 for float64) and
    the float64 reference differ by at most the sum of their rounding errors,
    so u below is u(dtype) + u(float64). For a dot product the classic bound
    is |fl(sum_i a_i b_i) - sum_i a_i b_i| <= gamma_k * sum_i |a_i b_i|, so every
    product's bound is growth(k) * u times its "sum of |terms|" matrix, the same
    product on absolute values (e.g. |X| |W1|^T + |b1| for Z): per element, not
    one tolerance for the whole tensor, so entries that are sums of small
    terms are held to a small error, and a wrong or missing term shows as soon
    as it exceeds the rounding of its own entry. Errors carried in from an
    earlier step propagate to first order: through phi by max|phi'|, through a
    product by the same product on absolute values (e.g. e_H |W2|^T), through
    phi' by max|phi''| (relu: phi' may flip where |z| is within z's error).
    """
    dtype, act, lam, g_s = args
    x, w1, w2, b1, b2 = inputs64
    d, h, q = w1.shape[1], w1.shape[0], w2.shape[0]
    n = math.prod(x.shape[:-1])
    u = unit_roundoff(dtype) + unit_roundoff(torch.float64)
    lip, curv = LIPSCHITZ.get(act, 1.2), CURVATURE.get(act, 1.0)
    X, G = x.reshape(n, d), grad_o64.reshape(n, q)
    aX, aW1, aW2, aG = X.abs(), w1.abs(), w2.abs(), G.abs()

    z = X @ w1.T + (b1 if b1 is not None else 0)
    hid = reference.phi(act)(z)
    deriv = reference._PHI_DERIVATIVE[act](z)
    e_z = growth(d + 1) * u * (aX @ aW1.T + (b1.abs() if b1 is not None else 0))
    e_act = ACTIVATION_ULPS * u * (1 + z.abs())
    e_h = lip * e_z + e_act
    e_o = (growth(h + 1) * u * (hid.abs() @ aW2.T + (b2.abs() if b2 is not None else 0))
           + e_h @ aW2.T)
    s = lam / 2 * (w1.square().sum() + w2.square().sum())
    e_s = growth(w1.numel() + w2.numel()) * u * s.abs()

    decay = abs(g_s or 0.0) * lam
    e_dw2 = growth(n + 1) * u * (aG.T @ hid.abs() + decay * aW2) + aG.T @ e_h
    e_db2 = growth(n) * u * aG.sum(0)
    g_h = G @ w2
    e_gh = growth(q) * u * (aG @ aW2)
    if act == "relu":
        e_deriv = (z.abs() <= e_z).to(z.dtype)
    else:
        e_deriv = curv * e_z + (0 if act == "identity" else e_act)
    g_z = g_h * deriv
    e_gz = e_gh * (deriv.abs() + e_deriv) + g_h.abs() * e_deriv + u * g_z.abs()
    a_gz = g_z.abs() + e_gz
    e_db1 = growth(n) * u * a_gz.sum(0) + e_gz.sum(0)
    e_dw1 = growth(n + 1) * u * (a_gz.T @ aX + decay * aW1) + e_gz.T @ aX
    e_dx = growth(h) * u * (a_gz @ aW1) + e_gz @ aW1
    return {"o": e_o.reshape(*x.shape[:-1], q), "s": e_s, "x": e_dx.reshape(x.shape),
            "w1": e_dw1, "w2": e_dw2, "b1": e_db1, "b2": e_db2}


# Both sides of each bound are first-order estimates; a factor 2 covers the
# second-order terms. Entries whose bound is 0 are exact sums of exact zeros
# (e.g. relu rows cut off entirely): they must match to a few subnormals.
SAFETY = 2.0


def within(got, want, bound, dtype):
    """The mask of entries of got (any dtype) within SAFETY * bound of want (float64)."""
    tiny = 16 * torch.finfo(dtype).tiny
    return (got.double() - want).abs() <= SAFETY * bound + tiny


def assert_within(name, got, want, bound, dtype, context=""):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    ok = within(got, want, bound, dtype)
    if not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist() if got.dim() else []
        idx = tuple(bad)
        err = (got.double() - want).abs()
        raise AssertionError(
            f"{name}: {int((~ok).sum())} of {got.numel()} entries outside the bound; first at "
            f"{idx}: got {got[idx].item()!r}, reference {want[idx].item()!r}, |error| "
            f"{err[idx].item():.3e} > {SAFETY} x {bound[idx].item():.3e}; max |error| "
            f"{err.max().item():.3e}{context}")


def reference_run(inputs, grad_o, case_args, need):
    """The float64 reference's o, s and the gradients named in `need` (with the
    same gradient outputs), and the error bounds."""
    dtype, act, lam, g_s = case_args
    ref_in = [t.detach().double().requires_grad_() if t is not None else None for t in inputs]
    go = grad_o.double()
    o, s = reference.fused_mlp(*ref_in, activation=act, weight_decay=lam)
    grads = {}
    if need:
        outs, gouts = [o], [go]
        if g_s is not None:
            outs.append(s)
            gouts.append(torch.tensor(g_s, dtype=torch.float64))
        wanted = [ref_in[ARGS.index(a)] for a in need]
        grads = dict(zip(need, torch.autograd.grad(outs, wanted, gouts)))
    with torch.no_grad():
        bounds = error_bounds(case_args, [t.detach() if t is not None else None for t in ref_in], go)
    return o.detach(), s.detach(), grads, bounds


def run_op(inputs, grad_o, case):
    """The op's o, s and the gradients of the inputs that require grad."""
    ctx = torch.no_grad() if case.no_grad else contextlib.nullcontext()
    with ctx:
        o, s = mlp_ext.fused_mlp(*inputs, activation=case.activation,
                                 weight_decay=case.weight_decay, save_hidden=case.save_hidden)
    need = [a for a, t in zip(ARGS, inputs) if t is not None and t.requires_grad]
    grads = {}
    if case.no_grad or not need:
        assert not o.requires_grad and not s.requires_grad and o.grad_fn is None
        return o, s, [], grads
    assert o.requires_grad and s.grad_fn is o.grad_fn  # one node for both outputs
    outs, gouts = [o], [grad_o]
    if case.grad_s is not None:
        outs.append(s)
        gouts.append(torch.tensor(case.grad_s, dtype=case.dtype))
    grads = dict(zip(need, torch.autograd.grad(outs, [inputs[ARGS.index(a)] for a in need], gouts)))
    return o, s, need, grads


def check_case(case):
    inputs, grad_o = case.inputs()
    before = [t.clone() if t is not None else None for t in inputs]
    o, s, need, grads = run_op(inputs, grad_o, case)

    # Contract: o is (*, q), x's dtype, contiguous; s is 0-dim; inputs untouched.
    assert o.shape == (*case.lead, case.q) and o.dtype == case.dtype and o.is_contiguous()
    assert s.shape == () and s.dtype == case.dtype
    for a, t, t0 in zip(ARGS, inputs, before):
        if t is not None:
            assert torch.equal(t, t0), f"{a} was written to"

    args = (case.dtype, case.activation, case.weight_decay, case.grad_s)
    ro, rs, rgrads, bounds = reference_run(inputs, grad_o, args, need)
    assert_within("o", o.detach(), ro, bounds["o"], case.dtype)
    assert_within("s", s.detach(), rs, bounds["s"], case.dtype)
    for a in need:
        g = grads[a]
        assert g is not None and g.dtype == case.dtype, f"grad of {a}: {g!r}"
        assert_within(f"d{a}", g, rgrads[a], bounds[a], case.dtype)


# The subprocess runs below bound the example count through this variable.
_EXAMPLES = os.environ.get("MLP_EXT_HYPOTHESIS_EXAMPLES")


def bounded(test):
    return settings(max_examples=int(_EXAMPLES))(test) if _EXAMPLES else test


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------
@bounded
@given(case=cases())
def test_fused_mlp_matches_reference(case):
    """The core property: o, s and every requested gradient within the bound."""
    check_case(case)


@bounded
@given(case=cases(), data=st.data())
def test_repeatable_and_independent_of_save_hidden(case, data):
    """The same call twice gives bitwise the same results (column sums are
    summed in a fixed order), and save_hidden=False (h recomputed from z by the
    forward's own kernel) gives bitwise the gradients of save_hidden=True."""
    case = dataclasses.replace(case, no_grad=False,
                               requires_grad=(True,) * 5 if data.draw(st.booleans())
                               else case.requires_grad)

    def run(save_hidden):
        inputs, grad_o = case.inputs()
        c = dataclasses.replace(case, save_hidden=save_hidden)
        o, s, need, grads = run_op(inputs, grad_o, c)
        return [o.detach(), s.detach()] + [grads[a] for a in need]

    first = run(True)
    for again in (run(True), run(False)):
        assert len(again) == len(first)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@bounded
@given(case=cases(dtypes=(torch.float32,)),
       kind=st.sampled_from(("h x 1", "h x 2", "1 x h", "h + 1", "h + 8")))
def test_bias_of_wrong_shape_is_refused(case, kind):
    """b1 must be exactly (h,): a 2-D b1 with h rows or h columns, or a 1-D b1
    of another length, raises a RuntimeError naming b1."""
    h = case.h
    shape = {"h x 1": (h, 1), "h x 2": (h, 2), "1 x h": (1, h), "h + 1": (h + 1,),
             "h + 8": (h + 8,)}[kind]
    inputs, _ = case.inputs()
    inputs[3] = torch.randn(shape, dtype=case.dtype)
    with pytest.raises(RuntimeError, match="b1"):
        mlp_ext.fused_mlp(*inputs, activation=case.activation, weight_decay=case.weight_decay)


def test_bound_is_tight_enough_to_see_a_lost_row():
    """The bound is not so loose that a lost row of db1 / db2 / dW1 passes:
    with 257 rows of float32 the last row's share of each column sum exceeds
    the bound (here the worst-case bound, (n + 2) u per |term|, ~1.5e-5 of the
    column's sum of |terms| against the row's ~1 / 257 = 3.9e-3 of it)."""
    case = Case(torch.float32, "tanh", (257,), 33, 17, 9, True, True, 0.1, (True,) * 5,
                False, True, (Layout("contiguous"),) * 5, Layout("contiguous"), 1.0, 7)
    inputs, grad_o = case.inputs()
    args = (case.dtype, case.activation, case.weight_decay, case.grad_s)
    ro, rs, rgrads, bounds = reference_run(inputs, grad_o, args, list(ARGS))
    x64, w1, w2, b1 = (t.detach().double() for t in inputs[:4])
    g_z = (grad_o.double() @ w2) * reference._PHI_DERIVATIVE["tanh"](x64 @ w1.T + b1)
    lost = {"b1": rgrads["b1"] - g_z[-1], "b2": rgrads["b2"] - grad_o[-1].double(),
            "w1": rgrads["w1"] - g_z[-1:].T @ x64[-1:]}
    for name, mutant in lost.items():
        caught = ~within(mutant, rgrads[name], bounds[name], case.dtype)
        assert caught.float().mean() > 0.5, name


# ---------------------------------------------------------------------------
# Every GEMM path and instruction set, one fresh interpreter each
# ---------------------------------------------------------------------------
def _cpu_has(isa):
    """Whether ATen runs `isa` here (it falls back to a lower one silently)."""
    order = ["DEFAULT", "AVX2", "AVX512"]
    have = torch.backends.cpu.get_cpu_capability()
    return have in order and order.index(have) >= order.index(isa.upper())


SUBPROCESS_RUNS = [("MLP_EXT_CPU_GEMM", p) for p in ("blas", "onednn", "split", "short")] + [
    ("ATEN_CPU_CAPABILITY", c) for c in ("default", "avx2", "avx512")]


def test_runs_where_asked():
    """In the subprocesses below: the instruction set asked for is the one ATen runs."""
    asked = os.environ.get("ATEN_CPU_CAPABILITY")
    if asked:
        assert torch.backends.cpu.get_cpu_capability() == asked.upper()
    assert os.environ.get("MLP_EXT_CPU_GEMM", "") in ("", "blas", "onednn", "split", "short")


@pytest.mark.parametrize("variable, value", SUBPROCESS_RUNS,
                         ids=[f"{v}={x}" for v, x in SUBPROCESS_RUNS])
def test_every_gemm_path_and_instruction_set(variable, value):
    """The core property in a fresh interpreter with MLP_EXT_CPU_GEMM (every
    product forced to one library where it can take it: oneDNN needs AVX-512
    and float32, split two threads, short an AVX2 / AVX-512 build; otherwise
    the BLAS) or ATEN_CPU_CAPABILITY (the elementwise and short-side kernels of
    that instruction set) set; a bounded number of examples each."""
    if variable == "ATEN_CPU_CAPABILITY" and not _cpu_has(value):
        pytest.skip(f"this CPU has no {value}")
    examples = max(10, settings.default.max_examples // 8)
    root = Path(mlp_ext.__file__).resolve().parents[1]
    env = dict(os.environ, **{variable: value}, MLP_EXT_HYPOTHESIS_EXAMPLES=str(examples),
               OMP_NUM_THREADS=str(max(2, torch.get_num_threads())),  # split needs two
               PYTHONPATH=os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p))
    env.pop("MLP_EXT_CPU_GEMM" if variable == "ATEN_CPU_CAPABILITY" else "ATEN_CPU_CAPABILITY", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
           "-k", "test_fused_mlp_matches_reference or test_runs_where_asked"]
    cmd.append(f"--hypothesis-profile={settings.get_current_profile_name()}")
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    tail = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, tail
    assert "2 passed" in done.stdout, tail
