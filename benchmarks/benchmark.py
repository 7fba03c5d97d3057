"""The fused MLP operator against the same MLP built from nn.Linear.

For every case (batch n, in d, hidden h, out q; dtype; activation) it builds
nn.Sequential(nn.Linear(d, h), activation, nn.Linear(h, q)) and a FusedMLP
with a copy of the same weights, checks that both give the same outputs, loss
and gradients, and only then times, in one process:

* inference: o = mlp(x) under torch.no_grad();
* training step: forward, cross-entropy loss plus the L2 term
  s = weight_decay/2 (||W1||^2 + ||W2||^2) (the fused side gets s from the same
  fused call, the nn.Linear side computes it from the weights), backward;
* the GEMM floor: the bare matrix products of that step (no dX: the batch
  needs no gradient), each timed with torch.mm and, for float32 on CPU, with
  oneDNN (torch's mkldnn inner product), the faster of the two counted;
* the bare step (training only): the same loss, backward and gradient reset
  with the MLP replaced by two leaf tensors standing for o and s, i.e. what
  the step costs outside the MLP;
* the fused operator alone (training only): its forward and its backward from
  fixed gradients of o and s, no loss, i.e. what the step costs inside the MLP;
  op/floor (that time over the GEMM floor; in inference the fused call itself)
  is how close the operator comes to its matrix products;
* optionally (--compile, or --compile-shapes for some shapes only) torch.compile
  of the nn.Linear side the way a user compiles it: the forward for inference,
  and the training step's forward and loss as one function (its backward is
  compiled with it), each a fresh function compiled with fullgraph=True after
  torch._dynamo.reset(), so that no case or mode reuses another's cache or runs
  past dynamo's recompile limit into eager fallback. Dynamo's counters are
  checked after the timing (one graph per function, no graph break, no
  recompilation, no frame left to eager); the first calls' time is reported as
  the compile time.

From these, the bound eager / (bare step + GEMM floor): the ratio that an
operator costing nothing beyond its matrix products (run by the faster of
torch's GEMM libraries) would reach. A target above the bound is out of reach
of any operator built on those libraries, on that machine. Where the fused
operator runs products of its own that beat those libraries (on CPU, those
with a short side), op/floor drops below 1 and the ratio can pass the bound.

Times are medians over interleaved rounds taken after warm-up: every round
runs each side once (a block of calls long enough to time), in alternating
order, so that a load change on a shared machine hits both sides alike; the
ratio eager/fused is the median of the per-round ratios. Their spread (the
lowest and highest per-round ratio, and the interquartile range) is reported
too, and a case whose rounds disagree (interquartile range over 25% of the
median: the machine's load changed under it) is flagged "noisy".

Output: a Markdown table on stdout, and <out>/<stem>.json (every figure,
with the machine, torch version, thread count and date), <out>/<stem>.md
(the table) and <out>/<stem>.png (a plot of the ratios). The stem is "cpu", or
"cuda-<GPU>" with the GPU's name as a slug (cuda-nvidia-h200: the results of
different GPUs side by side); --stem chooses another.

    python benchmarks/benchmark.py                      # the default sweep
    python benchmarks/benchmark.py --quick              # a fast smoke run
    python benchmarks/benchmark.py --shapes 64x64x64x64 --dtype float32 --activation gelu
    python benchmarks/benchmark.py --device cuda --tf32 off --compile
    python benchmarks/benchmark.py --dtype bfloat16 --stem cpu-bf16    # both sides in bfloat16
    python benchmarks/benchmark.py --autocast bfloat16 --stem cpu-autocast  # float32 models

--autocast DTYPE runs every timed call of both sides (and the verification in
their dtype) under torch.autocast(device, dtype=DTYPE), the models kept in
--dtype (float32); the GEMM floor is then timed in DTYPE, the dtype autocast
gives the products.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

try:
    import mlp_ext
except ModuleNotFoundError:  # not installed: the checkout this script is in (an in-place build)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import mlp_ext
from mlp_ext import FusedMLP

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, also when loaded by path
from common import Clock, gpu_slug, interleaved, medians, parse_shape, saved_bytes  # noqa: E402

DEFAULT_SHAPES = [(1, 16, 16, 16), (64, 64, 64, 64), (32, 784, 256, 10), (256, 784, 256, 10),
                  (4096, 1024, 1024, 1024)]
DEFAULT_DTYPES = ["float32", "float64"]
DEFAULT_ACTIVATIONS = ["relu", "gelu"]
QUICK_SHAPES = [(1, 16, 16, 16), (32, 64, 48, 10)]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}
ACTIVATION_MODULES = {
    "identity": nn.Identity, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
    "gelu": lambda: nn.GELU(approximate="none"), "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU, "quick_gelu": mlp_ext.activations.QuickGELU,
}
MODES = ("inference", "train")


# --------------------------------------------------------------------------- the two MLPs

@dataclasses.dataclass
class Side:
    """One implementation of the MLP: o = forward(x), (o, s) = with_penalty(x);
    where objective is given, (J, o, s) = objective(x, y) is the training step's
    forward and loss in one call (the compiled side's)."""
    name: str
    forward: Callable[[Tensor], Tensor]
    with_penalty: Callable[[Tensor], Tuple[Tensor, Tensor]]
    params: List[Tensor]  # w1, b1, w2, b2
    module: Optional[nn.Module] = None  # for train() / eval()
    objective: Optional[Callable[[Tensor, Tensor], Tuple[Tensor, Tensor, Tensor]]] = None


def objective_of(side: Side, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """J = cross_entropy(o, y) + s, o and s of one forward of side."""
    if side.objective is not None:
        return side.objective(x, y)
    o, s = side.with_penalty(x)
    return F.cross_entropy(o, y) + s, o, s


def make_sequential(shape, dtype, activation, device, dropout: float = 0.0) -> nn.Sequential:
    """Linear, activation, [Dropout(dropout) when > 0,] Linear."""
    _, d, h, q = shape
    layers = [nn.Linear(d, h), ACTIVATION_MODULES[activation]()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    seq = nn.Sequential(*layers, nn.Linear(h, q))
    return seq.to(device=device, dtype=dtype)


def make_sides(seq: nn.Sequential, weight_decay: float, compile_eager: bool = False) -> List[Side]:
    """The nn.Linear Sequential seq ("eager"), a FusedMLP with a copy of its
    weights ("fused") and, if asked, torch.compile of another copy of seq."""

    def linear_side(name, module, layers):
        w1, w2 = layers[0].weight, layers[-1].weight

        def with_penalty(x):
            # The usual way to add L2 regularization to the loss.
            return module(x), weight_decay / 2 * (w1.square().sum() + w2.square().sum())

        params = [layers[0].weight, layers[0].bias, layers[-1].weight, layers[-1].bias]
        return Side(name, module, with_penalty, params, module)

    # (An nn.Dropout in seq becomes the fused module's dropout.)
    fused = FusedMLP.from_sequential(seq, weight_decay=weight_decay, copy_weights=True)
    sides = [
        linear_side("eager", seq, seq),
        Side("fused", fused, lambda x: fused(x, return_penalty=True),
             [fused.fc1.weight, fused.fc1.bias, fused.fc2.weight, fused.fc2.bias], fused),
    ]
    if compile_eager:
        sides.append(compiled_side(copy.deepcopy(seq), weight_decay))
    return sides


def compiled_side(twin: nn.Sequential, weight_decay: float) -> Side:
    """torch.compile of the nn.Linear side, as a user would write it: the forward
    (inference) and the forward with its loss (the training step; its backward
    is compiled along), each a function of its own compiled with fullgraph=True.

    Dynamo is reset first: each case and each mode then gets a fresh cache, never
    hitting torch._dynamo.config.recompile_limit, past which dynamo would run the
    later cases eagerly and the benchmark would time that fallback."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    w1, w2 = twin[0].weight, twin[-1].weight

    def forward(x):
        return twin(x)

    def objective(x, y):
        o = twin(x)
        s = weight_decay / 2 * (w1.square().sum() + w2.square().sum())
        return F.cross_entropy(o, y) + s, o, s

    def with_penalty(x):  # not compiled, and not used for this side (objective is)
        return twin(x), weight_decay / 2 * (w1.square().sum() + w2.square().sum())

    params = [twin[0].weight, twin[0].bias, twin[-1].weight, twin[-1].bias]
    return Side("compiled", torch.compile(forward, fullgraph=True), with_penalty, params, twin,
                torch.compile(objective, fullgraph=True))


def compile_first_calls(side: Side, x: Tensor, y: Tensor) -> dict:
    """Compiles the compiled side's two functions by their first calls, timed:
    the compile time of each mode, in seconds."""
    seconds = {}
    start = time.perf_counter()
    with torch.no_grad():
        side.forward(x)
    seconds["inference"] = time.perf_counter() - start
    start = time.perf_counter()
    train_step(side, x, y)()  # the forward graph, then the backward's on the first backward
    seconds["train"] = time.perf_counter() - start
    return seconds


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)


def check_compiled(case: str, graphs_before_timing: int) -> dict:
    """Dynamo's counters since compiled_side: at least the two graphs (inference,
    training step), no graph break, every frame and AOTAutograd graph compiled,
    and no graph compiled while the side was timed (a recompilation there, or a
    cache past its limit, would have timed something else than the compiled
    program; the timing itself runs with error_on_recompile)."""
    counters = torch._dynamo.utils.counters
    graphs, breaks = compiled_graphs(), dict(counters["graph_break"])
    frames, aot = dict(counters["frames"]), dict(counters["aot_autograd"])
    problems = []
    if breaks:
        problems.append(f"graph breaks {breaks}")
    if graphs < 2:
        problems.append(f"{graphs} graphs compiled, expected 2 (inference, training step)")
    if graphs != graphs_before_timing:
        problems.append(f"{graphs - graphs_before_timing} graphs compiled during the timing")
    if frames.get("ok", 0) != frames.get("total", 0):
        problems.append(f"frames {frames}: some ran eagerly")
    if aot.get("ok", 0) != aot.get("total", 0):
        problems.append(f"AOTAutograd {aot}: some graphs failed")
    if problems:
        raise VerificationError(f"{case}: the compiled side did not run compiled: "
                                + "; ".join(problems))
    return {"graphs": graphs, "frames": frames, "graph_breaks": 0}


def make_batch(shape, dtype, device, generator):
    n, d, _, q = shape
    x = torch.randn(n, d, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    y = torch.randint(0, q, (n,), generator=generator).to(device)
    return x, y


def train_step(side: Side, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    """One training step: gradients reset, J = cross_entropy(o, y) + s, backward."""
    params = side.params

    if side.objective is not None:
        objective = side.objective

        def compiled_step():
            for p in params:
                p.grad = None
            loss = objective(x, y)[0]
            loss.backward()
            return loss

        return compiled_step

    def step():
        for p in params:
            p.grad = None
        o, s = side.with_penalty(x)
        loss = F.cross_entropy(o, y) + s
        loss.backward()
        return loss

    return step


def bare_step(shape, dtype, device, y: Tensor) -> Callable[[], Tensor]:
    """The training step without the MLP: o and s are leaves, so the step is the
    loss, its backward and the gradient bookkeeping, nothing else."""
    n, _, _, q = shape
    o = torch.randn(n, q, dtype=dtype, device=device, requires_grad=True)
    s = torch.zeros((), dtype=dtype, device=device, requires_grad=True)

    def step():
        o.grad = s.grad = None
        loss = F.cross_entropy(o, y) + s
        loss.backward()
        return loss

    return step


def operator_alone(side: Side, x: Tensor, generator) -> Callable[[], None]:
    """The fused side's forward and backward without a loss: o and s get fixed
    gradients (random, and 1 for s), the parameters get their gradients."""
    params = side.params
    o, s = side.with_penalty(x)
    grads = (torch.randn(o.shape, generator=generator, dtype=torch.float64)
             .to(device=o.device, dtype=o.dtype) / o.shape[0], torch.ones_like(s))

    def step():
        for p in params:
            p.grad = None
        torch.autograd.backward(side.with_penalty(x), grads)

    return step


def inference(side: Side, x: Tensor) -> Callable[[], Tensor]:
    forward = side.forward
    return lambda: forward(x)


# --------------------------------------------------------------------------- verification

class VerificationError(AssertionError):
    pass


def tolerance(dtype: torch.dtype) -> float:
    """Norm-wise relative tolerance of the check in each dtype.

    Loose in float32: a few z land within rounding of ReLU's kink, where the
    two sides take different branches of phi'(z), and each such element moves
    a whole row of dW1 (at 4096x1024x1024 ~1e-3 of dW1's norm). The math
    itself is checked in float64 (see run_case), where that cannot happen."""
    return {torch.float64: 1e-9, torch.float32: 1e-2}.get(dtype, 5e-2)


def check_close(what: str, actual: Tensor, expected: Tensor, tol: float) -> None:
    """||actual - expected|| <= tol * ||expected|| (Frobenius), NaN where NaN."""
    if actual.shape != expected.shape:
        raise VerificationError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    a, e = actual.detach().double(), expected.detach().double()
    if not torch.equal(a.isnan(), e.isnan()):
        raise VerificationError(f"{what}: NaN in different places")
    a, e = a.nan_to_num(0.0), e.nan_to_num(0.0)
    error, scale = (a - e).norm().item(), e.norm().item()
    if not error <= tol * scale:  # also catches inf - inf
        raise VerificationError(
            f"{what}: differs by {error:.3g} in norm, more than {tol:g} x {scale:.3g} "
            f"(largest element difference {(a - e).abs().max().item():.3g})")


def verify(sides: Sequence[Side], x: Tensor, y: Tensor, eval_mode: bool = False,
           seed: int = 0, tol: Optional[float] = None) -> None:
    """Outputs, s, loss and all four gradients of every side equal the first side's.

    With dropout in the MLP: eval_mode=True verifies with dropout off (every side
    in eval mode); otherwise each side's calls start from the same seed, which
    gives the fused side nn.Dropout's masks on CPU (bernoulli_ from the CPU
    generator, drawn in the same order). tol: tolerance(x.dtype) unless given
    (under autocast, that of the autocast dtype)."""
    tol = tolerance(x.dtype) if tol is None else tol
    results = []
    for side in sides:
        if eval_mode and side.module is not None:
            side.module.eval()
        try:
            torch.manual_seed(seed)
            with torch.no_grad():
                o_inference = side.forward(x)
            torch.manual_seed(seed + 1)
            loss = train_step(side, x, y)()
            torch.manual_seed(seed + 1)
            _, o, s = objective_of(side, x, y)
        finally:
            if side.module is not None:
                side.module.train()
        results.append((o_inference, o, s, loss, [p.grad for p in side.params]))
    ref_name = sides[0].name
    for side, result in zip(sides[1:], results[1:]):
        names = ("inference output", "output", "penalty s", "loss")
        for name, actual, expected in zip(names, result[:4], results[0][:4]):
            check_close(f"{side.name} vs {ref_name}: {name}", actual, expected, tol)
        for name, actual, expected in zip(("w1", "b1", "w2", "b2"), result[4], results[0][4]):
            if actual is None or expected is None:
                raise VerificationError(f"{side.name} vs {ref_name}: gradient of {name} missing")
            check_close(f"{side.name} vs {ref_name}: gradient of {name}", actual, expected, tol)


# --------------------------------------------------------------------------- the GEMM floor

def gemm_products(shape, mode) -> List[Tuple[str, int, int, int, bool, bool]]:
    """The matrix products of the step: (name, m, k, n, A transposed, B transposed)
    for C (m x n) = A (m x k) B (k x n), operands laid out as the step has them."""
    n, d, h, q = shape
    forward = [("Z = X W1^T", n, d, h, False, True), ("O = H W2^T", n, h, q, False, True)]
    if mode == "inference":
        return forward
    # x needs no gradient (a batch of data), so there is no dX = G_Z W1.
    return forward + [("dW2 = G_O^T H", q, n, h, True, False),
                      ("G_H = G_O W2", n, q, h, False, False),
                      ("dW1 = G_Z^T X", h, n, d, True, False)]


def gemm_backends(device: torch.device, dtype: torch.dtype) -> List[str]:
    backends = ["torch.mm"]
    if (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        backends.append("oneDNN")
    return backends


def gemm_closure(backend, m, k, n, a_t, b_t, dtype, device, generator):
    def operand(rows, cols, transposed):
        t = torch.randn(cols, rows, generator=generator, dtype=torch.float64).t() if transposed \
            else torch.randn(rows, cols, generator=generator, dtype=torch.float64)
        return t.to(device=device, dtype=dtype)  # keeps the transposed layout

    a, b = operand(m, k, a_t), operand(k, n, b_t)
    # Each product allocates its result, as nn.Linear and the fused op do (a
    # large fresh CPU buffer costs page faults, part of any step's time).
    if backend == "torch.mm":
        return lambda: torch.mm(a, b)
    # oneDNN's inner product computes A W^T with W (n x k) row-major; laid out
    # so beforehand, outside the timing.
    a, w = a.contiguous(), b.t().contiguous()
    linear = torch.ops.mkldnn._linear_pointwise
    return lambda: linear(a, w, None, "none", [], None)


# --------------------------------------------------------------------------- memory

def train_step_saved_bytes(side: Side, x: Tensor, y: Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward of one training
    step beyond the parameters and the batch (which exist anyway), each storage
    counted once."""
    for p in side.params:
        p.grad = None

    def forward():
        o, s = side.with_penalty(x)
        return F.cross_entropy(o, y) + s

    loss, size = saved_bytes(forward, exclude=(*side.params, x, y))
    loss.backward()
    return size


def cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory allocated during one call beyond what was allocated before."""
    torch.cuda.synchronize(device)
    gc.collect()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


# --------------------------------------------------------------------------- one case

def flops(shape, mode) -> int:
    return sum(2 * m * k * n for _, m, k, n, _, _ in gemm_products(shape, mode))


def autocast_context(args):
    """torch.autocast for --autocast (a context that does nothing without it)."""
    if args.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(args.device).type, dtype=DTYPES[args.autocast])


def under_autocast(fn: Callable, args) -> Callable:
    if args.autocast is None:
        return fn

    def call():
        with autocast_context(args):
            return fn()

    return call


def run_case(shape, dtype_name, activation, args, clock, generator, progress) -> List[dict]:
    device, dtype = torch.device(args.device), DTYPES[dtype_name]
    # The dtype of the products: autocast's under --autocast.
    compute_dtype = DTYPES[args.autocast] if args.autocast else dtype
    torch.manual_seed(args.seed)
    seq = make_sequential(shape, dtype, activation, device, args.dropout)
    x, y = make_batch(shape, dtype, device, generator)
    # Before anything is timed: the math, on float64 copies of the same weights
    # and batch (tight), then the sides that are timed, in their dtype. With
    # dropout: the math with dropout off, and on CPU (where the fused side draws
    # nn.Dropout's masks) eager against fused in training mode too.
    dropout = args.dropout > 0
    verify(make_sides(copy.deepcopy(seq).double(), args.weight_decay), x.double(), y,
           eval_mode=dropout)
    if dropout and device.type == "cpu":
        verify(make_sides(copy.deepcopy(seq).double(), args.weight_decay), x.double(), y)
    sides = make_sides(seq, args.weight_decay, args.compile and (
        args.compile_shapes is None or tuple(shape) in args.compile_shapes))
    with autocast_context(args):  # compiled and verified in the precision it is timed in
        compile_seconds = compile_first_calls(sides[2], x, y) if len(sides) > 2 else None
        verify(sides, x, y, eval_mode=dropout, tol=tolerance(compute_dtype))
    graphs_before_timing = compiled_graphs()

    results = []
    for mode in MODES:
        closures = {}
        for side in sides:
            closures[side.name] = under_autocast(
                inference(side, x) if mode == "inference" else train_step(side, x, y), args)
        if mode == "train":
            closures["bare step"] = under_autocast(bare_step(shape, compute_dtype, device, y), args)
            with autocast_context(args):
                closures["fused op"] = under_autocast(operator_alone(sides[1], x, generator), args)
        products = []
        for name, m, k, n, a_t, b_t in gemm_products(shape, mode):
            for backend in gemm_backends(device, compute_dtype):
                key = f"floor: {name} [{backend}]"
                closures[key] = gemm_closure(backend, m, k, n, a_t, b_t, compute_dtype, device,
                                             generator)
                products.append((name, backend, key))
        # With a compiled side, a recompilation while timing is an error, not a
        # silent switch to another graph or to eager.
        with torch.no_grad() if mode == "inference" else torch.enable_grad(), \
                torch._dynamo.config.patch(error_on_recompile=len(sides) > 2):
            times = interleaved(closures, clock, args.rounds, args.block_seconds, progress=progress)
        median = medians(times)

        floor_products = {}
        for name, backend, key in products:
            entry = floor_products.setdefault(name, {"seconds": {}})
            entry["seconds"][backend] = median[key]
        for entry in floor_products.values():
            entry["best"] = min(entry["seconds"], key=entry["seconds"].get)
        floor = sum(e["seconds"][e["best"]] for e in floor_products.values())

        bare = median.get("bare step", 0.0)
        operator = median.get("fused op", median["fused"])
        fl = flops(shape, mode)
        result = {
            "shape": dict(zip("ndhq", shape)),
            "dtype": dtype_name + (f"+autocast({args.autocast})" if args.autocast else ""),
            "activation": activation,
            "mode": mode, "flops": fl,
            "seconds": {s.name: median[s.name] for s in sides},
            "rounds": {name: times[name] for name in (*(s.name for s in sides), "fused op")
                       if name in times},
            # Per round, eager and fused ran back to back: the median of the
            # per-round ratios is robust to load that drifts between rounds.
            "ratio": statistics.median(e / f for e, f in zip(times["eager"], times["fused"])),
            "ratio_of_medians": median["eager"] / median["fused"],
            "gflops": {s.name: fl / median[s.name] / 1e9 for s in sides},
            "floor_seconds": floor,
            "floor_products": floor_products,
            "fused_over_floor": median["fused"] / floor,
            "operator_seconds": operator,
            "operator_over_floor": operator / floor,
            "bare_step_seconds": bare,
            "bound": median["eager"] / (bare + floor),
        }
        result["spread"] = spread([e / f for e, f in zip(times["eager"], times["fused"])])
        if "compiled" in median:
            result["ratio_compiled"] = statistics.median(
                c / f for c, f in zip(times["compiled"], times["fused"]))
            result["spread_compiled"] = spread([c / f for c, f in zip(times["compiled"], times["fused"])])
            result["compile_seconds"] = compile_seconds[mode]
            result["compile_check"] = check_compiled(
                f"{'x'.join(map(str, shape))} {dtype_name} {activation} {mode}", graphs_before_timing)
        if mode == "train":  # (not the compiled side's: dynamo would trace the hooks)
            with autocast_context(args):
                result["saved_bytes"] = {s.name: train_step_saved_bytes(s, x, y) for s in sides
                                         if s.objective is None}
        if device.type == "cuda":
            with torch.no_grad() if mode == "inference" else torch.enable_grad():
                result["cuda_peak_bytes"] = {s.name: cuda_peak_bytes(closures[s.name], device)
                                             for s in sides}
        results.append(result)
    return results


NOISY_IQR = 0.25  # interquartile range of the per-round ratios, over their median


def spread(ratios: List[float]) -> dict:
    """The per-round ratios' lowest, quartiles and highest; noisy when the
    interquartile range exceeds NOISY_IQR of the median (the rounds disagree)."""
    ordered = sorted(ratios)
    q1, median, q3 = (statistics.quantiles(ordered, n=4, method="inclusive") if len(ordered) > 1
                      else ordered * 3)
    return {"min": ordered[0], "q1": q1, "median": median, "q3": q3, "max": ordered[-1],
            "noisy": (q3 - q1) > NOISY_IQR * median}


def fmt_spread(sp: dict) -> str:
    return f"{sp['min']:.2f}–{sp['max']:.2f}" + (" noisy" if sp["noisy"] else "")


# --------------------------------------------------------------------------- reports

def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "–"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def markdown_table(results: List[dict]) -> str:
    compiled = any("ratio_compiled" in r for r in results)
    cuda = any("cuda_peak_bytes" in r for r in results)
    head = ["n×d×h×q", "dtype", "act", "mode", "eager", "fused", "**eager/fused**", "rounds"]
    if compiled:
        head += ["compiled", "compiled/fused", "rounds", "compile"]
    head += ["GEMM floor", "op/floor", "bound", "GFLOP/s eager", "GFLOP/s fused", "saved eager",
             "saved fused"]
    if cuda:
        head += ["peak eager", "peak fused"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        s = r["shape"]
        row = ["×".join(str(s[k]) for k in "ndhq"), r["dtype"], r["activation"], r["mode"],
               fmt_time(r["seconds"]["eager"]), fmt_time(r["seconds"]["fused"]),
               f"**{r['ratio']:.2f}×**", fmt_spread(r["spread"]) if "spread" in r else "–"]
        if compiled and "ratio_compiled" in r:
            row += [fmt_time(r["seconds"]["compiled"]), f"{r['ratio_compiled']:.2f}×",
                    fmt_spread(r["spread_compiled"]) if "spread_compiled" in r else "–",
                    f"{r['compile_seconds']:.1f} s" if "compile_seconds" in r else "–"]
        elif compiled:  # a case outside --compile-shapes
            row += ["–", "–", "–", "–"]
        saved = r.get("saved_bytes", {})
        row += [fmt_time(r["floor_seconds"]), f"{r['operator_over_floor']:.2f}", f"{r['bound']:.2f}×",
                f"{r['gflops']['eager']:.3g}", f"{r['gflops']['fused']:.3g}",
                fmt_bytes(saved.get("eager")), fmt_bytes(saved.get("fused"))]
        if cuda:
            row += [fmt_bytes(r["cuda_peak_bytes"]["eager"]), fmt_bytes(r["cuda_peak_bytes"]["fused"])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def result_stem(device: torch.device) -> str:
    """The name of the result files: "cpu", or "cuda-" and a slug of the GPU's name
    ("NVIDIA H200" -> "cuda-nvidia-h200")."""
    if device.type != "cuda":
        return device.type
    return f"cuda-{gpu_slug(torch.cuda.get_device_name(device))}"


def machine_info(device: torch.device, args) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mlp_ext": mlp_ext.__version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "mkldnn_enabled": torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "weight_decay": args.weight_decay,
        "dropout": args.dropout,
        "rounds": args.rounds,
        "block_seconds": args.block_seconds,
        "compile": args.compile,
        "autocast": args.autocast,
        "compile_shapes": args.compile_shapes and ["x".join(map(str, s)) for s in args.compile_shapes],
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        # torch's CPU allocator madvises huge pages for large buffers when set:
        # fewer page faults in both sides' fresh buffers.
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = os.getloadavg()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        info["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
    return info


def plot(results: List[dict], meta: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, ratios, bounds = [], {mode: [] for mode in MODES}, []
    for r in results:
        if r["mode"] == MODES[0]:
            s = r["shape"]
            labels.append(f"{s['n']}×{s['d']}×{s['h']}×{s['q']}\n{r['dtype']} {r['activation']}")
        ratios[r["mode"]].append(r["ratio"])
        if r["mode"] == "train":
            bounds.append(r["bound"])
    width = 0.4
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(labels) + 2), 4.8))
    positions = range(len(labels))
    for i, mode in enumerate(MODES):
        bars = ax.bar([p + (i - 0.5) * width for p in positions], ratios[mode], width,
                      label="training step" if mode == "train" else "inference")
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.scatter([p + 0.5 * width for p in positions], bounds, marker="_", s=200, color="black",
               zorder=3, label="bound of the training step (no cost beyond the GEMMs)")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    # Ratios on a log axis: 2x faster and 2x slower are the same distance from 1.
    ax.set_yscale("log")
    ax.set_xticks(list(positions))
    ax.set_xticklabels(labels, fontsize=7, rotation=45, ha="right")
    ax.set_ylabel("speed-up: time nn.Linear / time fused")
    ax.set_title(f"mlp_ext fused MLP vs nn.Linear on {meta['device']} ({meta['cpu'] if meta['device'] == 'cpu' else meta.get('gpu', '')})\n"
                 f"torch {meta['torch']}, {meta['threads']} threads, {meta['date'][:10]}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time the fused MLP operator against nn.Linear (inference and training step).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", type=lambda s: [parse_shape(x) for x in s.split(",")],
                   help="comma-separated NxDxHxQ (batch x in x hidden x out); default: "
                        + ",".join("x".join(map(str, s)) for s in DEFAULT_SHAPES))
    p.add_argument("--dtype", type=lambda s: s.split(","), help="comma-separated, of "
                   + ", ".join(DTYPES) + f"; default: {','.join(DEFAULT_DTYPES)}")
    p.add_argument("--activation", type=lambda s: s.split(","), help="comma-separated, of "
                   + ", ".join(ACTIVATION_MODULES) + f"; default: {','.join(DEFAULT_ACTIVATIONS)}")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--quick", action="store_true",
                   help="a fast smoke run: two small shapes, float32, relu, few short rounds")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the nn.Linear Sequential")
    p.add_argument("--compile-shapes", type=lambda s: [parse_shape(x) for x in s.split(",")],
                   help="like --compile, for these of the shapes only (compiling is the slow "
                        "part of a CUDA run: two graphs per case)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per case (default 15; 3 with --quick)")
    p.add_argument("--block-seconds", type=float,
                   help="length of one side's timed block in a round (default 0.05 s; 0.005 with --quick)")
    p.add_argument("--weight-decay", type=float, default=1e-3, help="lambda of the L2 term s")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="hidden-layer dropout p: nn.Dropout(p) between the activation and the "
                        "second Linear on the eager side, FusedMLP(dropout=p) on the fused side "
                        "(both in training mode, so inference draws masks too; default 0)")
    p.add_argument("--autocast", choices=("bfloat16", "float16"),
                   help="run both sides under torch.autocast(device, dtype=...) (models in "
                        "--dtype, float32 by default; the GEMM floor in the autocast dtype)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's default)")
    p.add_argument("--tf32", choices=("on", "off"), default="off",
                   help="CUDA: allow TF32 in float32 matrix products (set for both sides alike)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="directory of <stem>.json, <stem>.md and <stem>.png")
    p.add_argument("--stem", help="name of the result files (default: cpu, or cuda-<GPU name "
                                  "slug> such as cuda-nvidia-h200)")
    args = p.parse_args(argv)
    args.shapes = args.shapes or (QUICK_SHAPES if args.quick else DEFAULT_SHAPES)
    if args.compile_shapes is not None:
        missing = [s for s in args.compile_shapes if s not in args.shapes]
        if missing:
            p.error("--compile-shapes: not among the shapes timed: "
                    + ",".join("x".join(map(str, s)) for s in missing))
        args.compile = True
    args.dtype = args.dtype or (["float32"] if args.quick or args.autocast else DEFAULT_DTYPES)
    args.activation = args.activation or (["relu"] if args.quick else DEFAULT_ACTIVATIONS)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 15
    if args.block_seconds is None:
        args.block_seconds = 0.005 if args.quick else 0.05
    for name in args.dtype:
        if name not in DTYPES:
            p.error(f"--dtype: unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    if args.autocast and any(name != "float32" for name in args.dtype):
        p.error("--autocast: the models must be float32 (--dtype float32), which autocast casts")
    for name in args.activation:
        if name not in ACTIVATION_MODULES:
            p.error(f"--activation: unknown activation {name!r}; expected one of "
                    f"{', '.join(ACTIVATION_MODULES)}")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        p.error(f"--device: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device: expected cpu or cuda[:N], got {args.device!r}")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout: expected a probability in [0, 1), got {args.dropout:g}")
    if args.rounds < 1 or args.block_seconds <= 0:
        p.error("--rounds must be >= 1 and --block-seconds > 0")
    if args.stem is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", args.stem):
        p.error(f"--stem: expected a file name of letters, digits, '.', '_' and '-', got {args.stem!r}")
    return args


def main(argv=None) -> dict:
    from tqdm import tqdm

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        # Global settings: whatever they are, both sides run under the same ones.
        torch.backends.cuda.matmul.allow_tf32 = args.tf32 == "on"
        torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    meta = machine_info(device, args)
    cases = [(s, dt, act) for dt in args.dtype for act in args.activation for s in args.shapes]
    generator = torch.Generator().manual_seed(args.seed)
    clock = Clock(device)
    results = []
    with tqdm(total=len(cases) * len(MODES) * args.rounds, unit="round", file=sys.stderr,
              dynamic_ncols=True) as progress:
        try:
            for shape, dtype_name, activation in cases:
                progress.set_description(f"{'x'.join(map(str, shape))} {dtype_name} {activation}")
                results += run_case(shape, dtype_name, activation, args, clock, generator, progress)
        except KeyboardInterrupt:  # Ctrl-C, or a time limit's SIGINT: keep the cases done
            meta["interrupted"] = f"after {len(results) // len(MODES)} of {len(cases)} cases"
            print(f"\ninterrupted {meta['interrupted']}: writing those", file=sys.stderr)
    if hasattr(os, "getloadavg"):
        meta["load_average_at_end"] = os.getloadavg()

    table = markdown_table(results)
    settings = (f"{meta['device']}" + (f" ({meta['gpu']}, CUDA {meta['cuda']}, TF32 {args.tf32})"
                                        if device.type == "cuda" else f" ({meta['cpu']})")
                + f", torch {meta['torch']}, {meta['threads']} threads, {meta['date']}; "
                f"medians of {args.rounds} interleaved rounds; weight decay {args.weight_decay:g}"
                + (f"; dropout {args.dropout:g}" if args.dropout else "")
                + (f"; under torch.autocast({args.autocast})" if args.autocast else ""))
    if "load_average_at_start" in meta:
        settings += ("; load average {:.2f} at start, {:.2f} at end".format(
            meta["load_average_at_start"][0], meta["load_average_at_end"][0]))
    if "interrupted" in meta:
        settings += f"; INTERRUPTED {meta['interrupted']}"
    print(f"{settings}\n\n{table}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.stem or result_stem(device)
    report = {"meta": meta, "results": results}
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(f"{settings}\n\n{table}\n")
    if results:
        plot(results, meta, args.out / f"{stem}.png")
    print(f"\nwrote {args.out / stem}.json, .md and .png", file=sys.stderr)
    return report


if __name__ == "__main__":
    sys.exit(130 if "interrupted" in main()["meta"] else 0)
