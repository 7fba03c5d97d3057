"""The gated feed-forward block (SwiGLU) of mlp_ext.GatedFusedMLP against the same
block from nn.Linear (LLaMA's: down(silu(gate(x)) * up(x))), eager and under
torch.compile, training step and inference, with the GEMM floor (the block's
matrix products alone, each the faster of torch.mm and oneDNN).

    python benchmarks/gated.py                       # the issue's shapes, float32
    python benchmarks/gated.py --shapes 64x64x172x64 --rounds 3 --no-compile

Shapes are n x d x h x q (batch rows, model width, hidden width, output width).
The training step: x requires grad (a block inside a model), J = mean(o^2) + s
with s = weight_decay/2 (sum of the three weights' squares), backward. The
compiled side is the eager block's step (and forward) under torch.compile,
compiled afresh per case after torch._dynamo.reset(); dynamo's counters must
show a compiled frame, or the case fails. Results: benchmarks/results/gated-<device>.{json,md}.
"""
import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import mlp_ext  # noqa: E402

SHAPES = [(1, 64, 172, 64), (2048, 512, 1376, 512), (4096, 1024, 2752, 1024)]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
RESULTS = Path(__file__).resolve().parent / "results"


class LinearGatedBlock(nn.Module):
    """transformers' LlamaMLP, written out: the eager side."""

    def __init__(self, d, h, q, **factory):
        super().__init__()
        self.gate_proj = nn.Linear(d, h, bias=False, **factory)
        self.up_proj = nn.Linear(d, h, bias=False, **factory)
        self.down_proj = nn.Linear(h, q, bias=False, **factory)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def eager_penalty(block, weight_decay):
    return weight_decay / 2 * sum(p.square().sum() for p in block.parameters())


def make_sides(shape, dtype, weight_decay, generator):
    n, d, h, q = shape
    block = LinearGatedBlock(d, h, q, dtype=dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * p.shape[1] ** -0.5)
    fused = mlp_ext.GatedFusedMLP.from_linears(
        nn.Linear(d, h, bias=False, dtype=dtype), nn.Linear(d, h, bias=False, dtype=dtype),
        nn.Linear(h, q, bias=False, dtype=dtype), "silu", weight_decay=weight_decay)
    fused.load_state_dict(block.state_dict())

    def eager_forward(x):
        return block(x), eager_penalty(block, weight_decay)

    def fused_forward(x):
        return fused(x, return_penalty=True)

    return block, fused, eager_forward, fused_forward


def train_step(forward, params, x):
    def step():
        for p in params:
            p.grad = None
        x.grad = None
        o, s = forward(x)
        loss = o.square().mean() + s
        loss.backward()
        return loss
    return step


def inference(forward_o, x):
    def run():
        with torch.no_grad():
            return forward_o(x)
    return run


def gemm_floor(shape, mode, dtype, generator):
    """One closure running the block's products (fresh results, as the ops allocate)
    on the faster backend per product."""
    n, d, h, q = shape
    # (m, k, n) of C = A B: Z = X [W_g; W_u]^T, O = H W_down^T, then the backward's
    # dW_down = G_O^T H, G_H = G_O W_down, dW_g and dW_u = G_Z^T X (one 2h-row
    # product), dX = G_Z [W_g; W_u].
    products = [(n, d, 2 * h), (n, h, q)]
    if mode == "train":
        products += [(q, n, h), (n, q, h), (2 * h, n, d), (n, 2 * h, d)]
    clock = common.Clock("cpu")
    closures = []
    for m, k, cols in products:
        a = torch.randn(m, k, generator=generator, dtype=torch.float64).to(dtype)
        b = torch.randn(k, cols, generator=generator, dtype=torch.float64).to(dtype)
        options = [lambda a=a, b=b: torch.mm(a, b)]
        if dtype == torch.float32 and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            w = b.t().contiguous()
            options.append(lambda a=a, w=w: torch.ops.mkldnn._linear_pointwise(a, w, None, "none", [], None))
        best = min(options, key=lambda f: min(clock.block(f, 1) for _ in range(3)))
        closures.append(best)

    def run():
        for f in closures:
            f()
    return run


def flops(shape, mode):
    n, d, h, q = shape
    forward = 2 * n * d * 2 * h + 2 * n * h * q
    return forward if mode == "inference" else 3 * forward


def run_case(shape, dtype, args, generator, progress=print):
    n, d, h, q = shape
    block, fused, eager_forward, fused_forward = make_sides(shape, dtype, args.weight_decay, generator)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    # Verify: o, s and every gradient of the fused side equal the eager side's.
    losses = []
    for forward, params in ((eager_forward, list(block.parameters())), (fused_forward, list(fused.parameters()))):
        losses.append((train_step(forward, params, x)(), x.grad.clone(), [p.grad.clone() for p in params]))
    tol = {torch.float32: 1e-3, torch.float64: 1e-9, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(losses[1][0], losses[0][0], rtol=tol, atol=tol)
    for a, b in zip([losses[1][1], *losses[1][2]], [losses[0][1], *losses[0][2]]):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())

    clock = common.Clock("cpu")
    results = []
    for mode in ("train", "inference"):
        closures = {}
        if mode == "train":
            closures["eager"] = train_step(eager_forward, list(block.parameters()), x)
            closures["fused"] = train_step(fused_forward, list(fused.parameters()), x)
        else:
            closures["eager"] = inference(block, x)
            closures["fused"] = inference(fused, x)
        closures["floor"] = gemm_floor(shape, mode, dtype, generator)
        compiled_ok = None
        if args.compile:
            # A fresh function per case: dynamo's caches start empty, and no case
            # runs into its recompile limit.
            torch._dynamo.reset()
            from torch._dynamo.utils import counters
            counters.clear()
            compiled_forward = torch.compile(lambda x: eager_forward(x))
            if mode == "train":
                closures["compiled"] = train_step(compiled_forward, list(block.parameters()), x)
            else:
                closures["compiled"] = inference(lambda x: compiled_forward(x)[0], x)
            closures["compiled"]()  # compiles
            compiled_ok = counters["stats"]["unique_graphs"] > 0
            if not compiled_ok:
                raise RuntimeError(f"torch.compile did not compile the {mode} case {shape}: "
                                   f"{dict(counters['stats'])}")
        times = common.medians(common.interleaved(closures, clock, args.rounds, args.block_seconds,
                                                  max_calls=args.max_calls))
        row = {"shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""),
               "mode": mode, **{f"{k}_s": v for k, v in times.items()},
               "eager_over_fused": times["eager"] / times["fused"],
               "fused_over_floor": times["fused"] / times["floor"],
               "gflops_fused": flops(shape, mode) / times["fused"] / 1e9}
        if "compiled" in times:
            row["compiled_over_fused"] = times["compiled"] / times["fused"]
            row["compiled_graphs_seen"] = compiled_ok
        results.append(row)
        progress(row)
    return results


def fmt_time(seconds):
    for unit, scale in (("s", 1), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-6:.3g} µs"


def markdown(results, meta):
    lines = [f"{meta['cpu']}, torch {meta['torch']}, {meta['threads']} threads, {meta['date']}; "
             f"medians of {meta['rounds']} interleaved rounds; weight decay {meta['weight_decay']}; "
             f"load average {meta['load_average_at_start'][0]:.2f} at start, "
             f"{meta.get('load_average_at_end', [float('nan')])[0]:.2f} at end", "",
             "| n×d×h×q | dtype | mode | eager | compiled | fused | GEMM floor | **eager/fused** | "
             "compiled/fused | fused/floor | GFLOP/s fused |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        compiled = fmt_time(r["compiled_s"]) if "compiled_s" in r else "–"
        ratio = f"{r['compiled_over_fused']:.2f}×" if "compiled_over_fused" in r else "–"
        lines.append(f"| {r['shape'].replace('x', '×')} | {r['dtype']} | {r['mode']} | "
                     f"{fmt_time(r['eager_s'])} | {compiled} | {fmt_time(r['fused_s'])} | "
                     f"{fmt_time(r['floor_s'])} | **{r['eager_over_fused']:.2f}×** | {ratio} | "
                     f"{r['fused_over_floor']:.2f} | {r['gflops_fused']:.3g} |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=common.parse_shape, nargs="+", default=SHAPES)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="float32 (default), float64 or bfloat16 (every side in that dtype)")
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--block-seconds", type=float, default=0.5)
    p.add_argument("--max-calls", type=int, default=None)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--out", type=Path, default=None,
                   help="result stem (default benchmarks/results/gated-cpu); '-' writes nothing")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    generator = torch.Generator().manual_seed(0)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), "torch": torch.__version__, "mlp_ext": mlp_ext.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "rounds": args.rounds, "block_seconds": args.block_seconds,
            "weight_decay": args.weight_decay, "compile": args.compile,
            "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
            "load_average_at_start": os.getloadavg()}
    try:
        with open("/proc/cpuinfo") as f:
            meta["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    results = []
    for shape in args.shapes:
        results += run_case(shape, dtype, args, generator,
                            progress=lambda r: print(json.dumps(r), flush=True))
    meta["load_average_at_end"] = os.getloadavg()
    table = markdown(results, meta)
    print(table)
    if str(args.out) != "-":
        stem = args.out or RESULTS / "gated-cpu"
        stem.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
        Path(f"{stem}.md").write_text(table)
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()
