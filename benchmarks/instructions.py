"""Instructions per call, counted by callgrind: the deterministic view of the
per-call cost that timing on a shared machine cannot give.

For each shape it counts, with torch.utils.benchmark's Timer.collect_callgrind
(valgrind runs a subprocess; only the statement is counted, not the set-up):

* the training step of benchmarks/benchmark.py, eager (nn.Linear) and fused;
* the bare step (the loss and its backward with the MLP taken out);
* inference (o = mlp(x) under no_grad), eager and fused;

and splits the fused training step's instructions into phases by the
inclusive counts of the functions that run them:

* kernels: the operator's forward and backward (csrc/mlp.cpp: checks,
  allocations, products, elementwise passes);
* autograd node: the op's autograd entry (fused_mlp_autograd) minus the
  forward kernel (creating the node, saving tensors);
* engine: the autograd engine's run minus the kernels it calls (nodes,
  thread-local state, AccumulateGrad);
* rest: everything else — the Python call into the op (the module,
  keyword arguments parsed against the schema, the boxed call) and the loss.

Output: a Markdown table on stdout and <out>/instructions.json. Needs valgrind
(`apt-get install valgrind`); float32, one thread, like the README's figures.

    python benchmarks/instructions.py                       # the issue's three shapes
    python benchmarks/instructions.py --shapes 1x16x16x16 --number 50
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import parse_shape  # noqa: E402

SHAPES = ["1x16x16x16", "64x64x64x64", "32x784x256x10"]

# Run in the valgrind subprocess: the sides of benchmark.py, built from one
# seed so every count sees the same data.
SETUP = """
import sys, torch
sys.path.insert(0, {here!r})
torch.manual_seed(0)
torch.set_num_threads(1)
import benchmark as b
shape = {shape!r}
seq = b.make_sequential(shape, torch.float32, {activation!r}, "cpu")
eager, fused = b.make_sides(seq, {weight_decay!r})
x, y = b.make_batch(shape, torch.float32, "cpu", torch.Generator().manual_seed(1))
steps = dict(eager=b.train_step(eager, x, y), fused=b.train_step(fused, x, y),
             bare=b.bare_step(shape, torch.float32, "cpu", y))
infer = dict(eager=b.inference(eager, x), fused=b.inference(fused, x))
for f in list(steps.values()) * 3:
    f()
with torch.no_grad():
    for f in list(infer.values()) * 3:
        f()
"""

STATEMENTS = {
    "eager step": "steps['eager']()",
    "fused step": "steps['fused']()",
    "bare step": "steps['bare']()",
    "eager inference": "with torch.no_grad(): infer['eager']()",
    "fused inference": "with torch.no_grad(): infer['fused']()",
}

# Inclusive counts of these functions (matched on the demangled name) give the phases.
KERNELS = ("mlp_ext::fused_mlp_forward(", "mlp_ext::fused_mlp_backward(", "mlp_ext::fused_mlp_inference(")
AUTOGRAD_FORWARD = "mlp_ext::(anonymous namespace)::fused_mlp_autograd("
ENGINE = "torch::autograd::Engine::execute("


def inclusive(stats, needle: str) -> int:
    """The largest inclusive count among the functions whose name contains needle
    (the outermost frame of a recursive or overloaded name)."""
    counts = [c.count for c in stats if needle in c.function]
    return max(counts, default=0)


def count(shape, activation: str, weight_decay: float, number: int) -> dict:
    setup = SETUP.format(here=str(HERE), shape=shape, activation=activation, weight_decay=weight_decay)
    result = {}
    for name, stmt in STATEMENTS.items():
        stats = Timer(stmt, setup=setup).collect_callgrind(number=number)
        total = stats.counts(denoise=True) / number
        result[name] = {"instructions": total}
        if name == "fused step":
            functions = stats.as_standardized().stats(inclusive=True)
            kernels = sum(inclusive(functions, k) for k in KERNELS[:2]) / number
            node = inclusive(functions, AUTOGRAD_FORWARD) / number
            engine = inclusive(functions, ENGINE) / number
            forward_kernel = inclusive(functions, KERNELS[0]) / number
            backward_kernel = inclusive(functions, KERNELS[1]) / number
            result[name]["phases"] = {
                "kernels": kernels,
                "autograd node": node - forward_kernel,
                "engine": engine - backward_kernel,
                "rest": total - kernels - (node - forward_kernel) - (engine - backward_kernel),
            }
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--number", type=int, default=20, help="calls counted per statement")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        sys.exit("instructions.py needs valgrind (Debian: apt-get install valgrind)")
    # Timer.collect_callgrind starts `python` from PATH: make it this interpreter (a venv's).
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

    rows, report = [], {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                        "activation": args.activation, "weight_decay": args.weight_decay,
                        "number": args.number, "shapes": {}}
    print("| shape | eager step | fused step | bare step | eager/fused | kernels | node | engine | rest "
          "| eager inf. | fused inf. | eager/fused |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for text in args.shapes:
        shape = parse_shape(text)
        r = count(shape, args.activation, args.weight_decay, args.number)
        report["shapes"][text] = r
        k = lambda name: r[name]["instructions"] / 1e3  # noqa: E731
        p = {key: v / 1e3 for key, v in r["fused step"]["phases"].items()}
        print(f"| {text} | {k('eager step'):.0f}K | {k('fused step'):.0f}K | {k('bare step'):.0f}K "
              f"| {k('eager step') / k('fused step'):.2f} | {p['kernels']:.0f}K | {p['autograd node']:.0f}K "
              f"| {p['engine']:.0f}K | {p['rest']:.0f}K | {k('eager inference'):.0f}K "
              f"| {k('fused inference'):.0f}K | {k('eager inference') / k('fused inference'):.2f} |",
              flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "instructions.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
