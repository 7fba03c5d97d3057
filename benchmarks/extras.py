"""Costs of the extras: save_hidden=False, second derivatives, and the fused loss.

    python benchmarks/extras.py                       # CPU, default shapes
    python benchmarks/extras.py --device cuda --dtype bfloat16
    python benchmarks/extras.py --shapes 256x784x256x10 --rounds 30

Three comparisons, each on the same inputs, outputs verified before timing,
variants timed in interleaved rounds after a warm-up (medians reported):

1. save_hidden: a training step (forward, J = cross-entropy + s, backward) with
   h saved (default) against h recomputed in backward; with the bytes autograd
   saves in each mode, measured with saved_tensors_hooks (and the peak memory
   of the step on CUDA).
2. second derivatives: forward + backward, forward + backward with
   create_graph=True, and forward + a Hessian-vector product w.r.t. the
   parameters (two backward passes); the same HVP through the reference
   (nn.Linear-like torch ops) for scale; the bytes the create_graph backward saves.
3. fused loss: mlp_ext.fused_mlp_loss (J in one forward and one backward op)
   against fused_mlp + F.cross_entropy + s, training step and forward alone.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

import mlp_ext
from mlp_ext import reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, also when loaded by path
from common import Clock, interleaved, medians, parse_shape, saved_bytes  # noqa: E402

DEFAULT_SHAPES = ["64x64x64x64", "32x784x256x10", "256x784x256x10", "1024x1024x1024x1024"]


def timed(variants, args, device):
    """{name: median seconds per call}: interleaved rounds, each timing every variant
    over enough calls to last args.min_time seconds."""
    return medians(interleaved(variants, Clock(device), args.rounds, args.min_time))


def make_problem(shape, dtype, device, activation, weight_decay):
    n, d, h, q = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    mlp = mlp_ext.FusedMLP(d, h, q, activation=activation, weight_decay=weight_decay,
                           dtype=dtype, device=device)
    x = torch.randn(n, d, generator=g).to(dtype=dtype, device=device)
    y = torch.randint(0, q, (n,), generator=g).to(device)
    return mlp, x, y


def bench_save_hidden(shape, args, device):
    mlp, x, y = make_problem(shape, args.dtype, device, args.activation, args.weight_decay)
    params = list(mlp.parameters())

    def step(save_hidden):
        mlp.save_hidden = save_hidden
        o, s = mlp(x, return_penalty=True)
        return torch.autograd.grad(F.cross_entropy(o, y) + s, params)

    grads = {mode: step(mode) for mode in (True, False)}
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False])), \
        "save_hidden=False changed the gradients"
    measured = {}
    for mode in (True, False):
        mlp.save_hidden = mode
        _, measured[mode] = saved_bytes(lambda: mlp(x), exclude=[x, *params])
    peaks = {}
    if device.type == "cuda":
        for mode in (True, False):
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step(mode)
            torch.cuda.synchronize(device)
            peaks[mode] = torch.cuda.max_memory_allocated(device) - base
    times = timed({"saved": lambda: step(True), "recomputed": lambda: step(False)}, args, device)
    row = {"shape": shape, "saved_B": measured[True], "recomputed_B": measured[False],
           "saved_ms": 1e3 * times["saved"], "recomputed_ms": 1e3 * times["recomputed"]}
    if peaks:
        row.update(peak_saved_B=peaks[True], peak_recomputed_B=peaks[False])
    return row


def bench_second_order(shape, args, device):
    mlp, x, y = make_problem(shape, args.dtype, device, args.activation, args.weight_decay)
    params = list(mlp.parameters())
    v = [torch.randn_like(p) for p in params]
    w1, b1, w2, b2 = params

    def J(fn):
        o, s = fn(x, w1, w2, b1, b2, activation=args.activation, weight_decay=args.weight_decay)
        return F.cross_entropy(o, y) + s

    def first():
        return torch.autograd.grad(J(mlp_ext.fused_mlp), params)

    def create_graph():
        return torch.autograd.grad(J(mlp_ext.fused_mlp), params, create_graph=True)

    def hvp(fn):
        def run():
            g = torch.autograd.grad(J(fn), params, create_graph=True)
            return torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, v)), params)
        return run

    for a, b in zip(hvp(mlp_ext.fused_mlp)(), hvp(reference.fused_mlp)()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    loss = J(mlp_ext.fused_mlp)
    # What autograd keeps beyond references to x and the parameters.
    _, forward_saved = saved_bytes(lambda: J(mlp_ext.fused_mlp), exclude=[x, *params])
    _, create_graph_saved = saved_bytes(
        lambda: torch.autograd.grad(loss, params, retain_graph=True, create_graph=True),
        exclude=[x, *params])
    times = timed({"first": first, "create_graph": create_graph,
                   "hvp": hvp(mlp_ext.fused_mlp), "hvp_reference": hvp(reference.fused_mlp)},
                  args, device)
    return {"shape": shape, "forward_saved_B": forward_saved,
            "create_graph_saved_B": create_graph_saved,
            **{f"{k}_ms": 1e3 * t for k, t in times.items()}}


def bench_fused_loss(shape, args, device):
    mlp, x, y = make_problem(shape, args.dtype, device, args.activation, args.weight_decay)
    params = list(mlp.parameters())
    w1, b1, w2, b2 = params
    kw = dict(activation=args.activation, weight_decay=args.weight_decay)

    def fused():
        return mlp_ext.fused_mlp_loss(x, y, w1, w2, b1, b2, **kw)

    def composed():
        o, s = mlp_ext.fused_mlp(x, w1, w2, b1, b2, **kw)
        return F.cross_entropy(o, y) + s

    torch.testing.assert_close(fused(), composed())
    for a, b in zip(torch.autograd.grad(fused(), params), torch.autograd.grad(composed(), params)):
        torch.testing.assert_close(a, b)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    times = timed({
        "fused_step": lambda: torch.autograd.grad(fused(), params),
        "composed_step": lambda: torch.autograd.grad(composed(), params),
        "fused_forward": no_grad(fused), "composed_forward": no_grad(composed)}, args, device)
    return {"shape": shape, **{f"{k}_ms": 1e3 * t for k, t in times.items()}}


def fmt_shape(shape):
    return "×".join(map(str, shape))


def report(title, rows, columns):
    print(f"\n### {title}\n")
    print("| " + " | ".join(header for header, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(fn(row) for _, fn in columns) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32",
                        choices=("float32", "float64", "float16", "bfloat16"))
    parser.add_argument("--shapes", nargs="+", type=parse_shape,
                        default=[parse_shape(s) for s in DEFAULT_SHAPES],
                        help="batch x in x hidden x out (default: %(default)s)")
    parser.add_argument("--activation", default="gelu", choices=mlp_ext.ACTIVATIONS)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--min-time", type=float, default=0.02,
                        help="seconds per variant per round")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--only", choices=("save_hidden", "second_order", "fused_loss"))
    args = parser.parse_args()
    args.dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"mlp_ext extras: torch {torch.__version__}, {machine}, {args.dtype}, "
          f"{args.activation}, weight_decay={args.weight_decay}; medians of {args.rounds} "
          "interleaved rounds")
    ms = "{:.3f}".format

    if args.only in (None, "save_hidden"):
        rows = [bench_save_hidden(s, args, device) for s in args.shapes]
        columns = [("n×d×h×q", lambda r: fmt_shape(r["shape"])),
                   ("saved, h kept", lambda r: f"{r['saved_B']:,} B"),
                   ("saved, h recomputed", lambda r: f"{r['recomputed_B']:,} B"),
                   ("step, h kept (ms)", lambda r: ms(r["saved_ms"])),
                   ("step, h recomputed (ms)", lambda r: ms(r["recomputed_ms"])),
                   ("time ratio", lambda r: f"{r['recomputed_ms'] / r['saved_ms']:.2f}")]
        if device.type == "cuda":
            columns += [("peak, kept", lambda r: f"{r['peak_saved_B']:,} B"),
                        ("peak, recomputed", lambda r: f"{r['peak_recomputed_B']:,} B")]
        report("save_hidden=False: activations saved by autograd and training-step time",
               rows, columns)

    if args.only in (None, "second_order"):
        rows = [bench_second_order(s, args, device) for s in args.shapes]
        report("Second derivatives: forward + first backward vs create_graph vs HVP", rows, [
            ("n×d×h×q", lambda r: fmt_shape(r["shape"])),
            ("fwd+bwd (ms)", lambda r: ms(r["first_ms"])),
            ("fwd+bwd create_graph (ms)", lambda r: ms(r["create_graph_ms"])),
            ("fwd+HVP (ms)", lambda r: ms(r["hvp_ms"])),
            ("HVP / fwd+bwd", lambda r: f"{r['hvp_ms'] / r['first_ms']:.2f}"),
            ("HVP, reference ops (ms)", lambda r: ms(r["hvp_reference_ms"])),
            ("saved by forward", lambda r: f"{r['forward_saved_B']:,} B"),
            ("saved by create_graph bwd", lambda r: f"{r['create_graph_saved_B']:,} B")])

    if args.only in (None, "fused_loss"):
        rows = [bench_fused_loss(s, args, device) for s in args.shapes]
        report("fused_mlp_loss vs fused_mlp + F.cross_entropy + s", rows, [
            ("n×d×h×q", lambda r: fmt_shape(r["shape"])),
            ("step fused (ms)", lambda r: ms(r["fused_step_ms"])),
            ("step composed (ms)", lambda r: ms(r["composed_step_ms"])),
            ("step speed-up", lambda r: f"{r['composed_step_ms'] / r['fused_step_ms']:.2f}"),
            ("fwd fused (ms)", lambda r: ms(r["fused_forward_ms"])),
            ("fwd composed (ms)", lambda r: ms(r["composed_forward_ms"])),
            ("fwd speed-up", lambda r: f"{r['composed_forward_ms'] / r['fused_forward_ms']:.2f}")])


if __name__ == "__main__":
    main()
