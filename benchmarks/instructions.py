"""Instructions per call, counted by callgrind: the deterministic view of the
per-call cost that timing on a shared machine cannot give.

For each shape it counts, with callgrind (valgrind runs a subprocess; only the
statements are counted, not the set-up):

* the training step of benchmarks/benchmark.py, eager (nn.Linear) and fused;
* the fused loss step: the same step with the loss fused too
  (mlp_ext.fused_mlp_loss on the fused module's parameters, cross-entropy);
* the bare step (the loss and its backward with the MLP taken out);
* inference (o = mlp(x) under no_grad), eager and fused;
* the fused forward alone with grad on (the module call that builds the node;
  its outputs, and with them the node, freed at once) and the fused operator
  alone (that forward and its backward from fixed gradients, no loss);

and splits the fused training step's instructions into phases, by the
inclusive counts of the functions that run them (callgrind) and by
difference between the statements:

* kernels: the operator's forward and backward (csrc/mlp.cpp: checks,
  allocations, products, elementwise passes);
* python entry: the fused forward statement minus the op's autograd entry
  (fused_mlp_autograd): the module, the arguments parsed against the schema,
  the boxed call, the outputs handed back to Python and freed;
* autograd node: fused_mlp_autograd minus the forward kernel (creating the
  node, saving tensors);
* engine: the autograd engine's run minus the kernels it calls, minus the
  bare step's own engine run (the node, two more AccumulateGrads, and the
  engine's per-node thread-local state);
* rest: the step minus all of the above (the loss and the gradient reset, as
  in the bare step, which is also given).

and the fused loss step's likewise: kernels (fused_mlp_loss_forward and
_backward), autograd node (fused_mlp_loss_autograd minus its forward kernel),
engine (its whole run minus the backward kernel: the step has no loss nodes
of torch's, only the fused node and the AccumulateGrads), rest (the Python
call and the gradient reset).

With --calls it also counts ways of calling the op from Python under no_grad at
the first shape (the OpOverload `.default` against the overload packet,
keyword against default arguments), to choose the cheapest entry.

One valgrind run counts everything (callgrind's collection is switched on
around each statement's calls and its counts dumped per statement), so the
slow start of Python and torch under valgrind is paid once.

Output: a Markdown table on stdout and <out>/<stem>.json. Needs valgrind
(`apt-get install valgrind`); float32, one thread, like the README's figures.

    python benchmarks/instructions.py                       # the issue's three shapes
    python benchmarks/instructions.py --shapes 1x16x16x16 --number 50
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Tuple

import torch

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
forward = lambda: fused.with_penalty(x)
op_alone = b.operator_alone(fused, x, torch.Generator().manual_seed(2))
w1, b1, w2, b2 = fused.params
import mlp_ext

def fused_loss_step():
    for p in fused.params:
        p.grad = None
    J, o = mlp_ext.fused_mlp_loss(x, y, w1, w2, b1, b2, weight_decay={weight_decay!r},
                                  loss="cross_entropy", return_output=True)
    J.backward()
    return J

steps["fused loss"] = fused_loss_step
packet = torch.ops.mlp_ext.fused_mlp
default = packet.default
for f in list(steps.values()) * 3 + [forward, op_alone] * 3:
    f()
with torch.no_grad():
    for f in list(infer.values()) * 3:
        f()
"""

STATEMENTS = {
    "eager step": "steps['eager']()",
    "fused step": "steps['fused']()",
    "fused loss step": "steps['fused loss']()",
    "bare step": "steps['bare']()",
    "eager inference": "with torch.no_grad(): infer['eager']()",
    "fused inference": "with torch.no_grad(): infer['fused']()",
    "fused forward": "forward()",
    "fused op": "op_alone()",
}

# Ways of calling the op (no_grad: the inference path, so the difference is the entry).
CALLS = {
    "FusedMLP module": "with torch.no_grad(): fused.module(x)",
    ".default, every option by keyword": (
        "with torch.no_grad(): default(x, w1, w2, b1, b2, activation='relu', weight_decay=0.0, "
        "save_hidden=True, dropout=0.0)"),
    "packet, every option by keyword": (
        "with torch.no_grad(): packet(x, w1, w2, b1, b2, activation='relu', weight_decay=0.0, "
        "save_hidden=True, dropout=0.0)"),
    ".default, tensors only (defaults)": "with torch.no_grad(): default(x, w1, w2, b1, b2)",
    "packet, tensors only (defaults)": "with torch.no_grad(): packet(x, w1, w2, b1, b2)",
    "no_grad alone": "with torch.no_grad(): pass",
}

# Inclusive counts of these functions (matched on the demangled name) give the phases.
KERNELS = ("mlp_ext::fused_mlp_forward(", "mlp_ext::fused_mlp_backward(", "mlp_ext::fused_mlp_inference(")
AUTOGRAD_FORWARD = "fused_mlp_autograd("
LOSS_KERNELS = ("::fused_mlp_loss_forward(", "::fused_mlp_loss_backward(")
LOSS_AUTOGRAD_FORWARD = "fused_mlp_loss_autograd("
ENGINE = "torch::autograd::Engine::execute("


def inclusive(functions: dict, needle: str) -> int:
    """The largest inclusive count among the functions whose name contains needle
    (the outermost frame of a recursive or overloaded name)."""
    return max((c for name, c in functions.items() if needle in name), default=0)


def worker(spec_path: str) -> None:
    """Run under callgrind (collection off at the start): for each shape, the set-up,
    then each statement once to warm up, then `number` times with collection on,
    each statement's counts dumped to a file of its own (in the order of spec)."""
    with open(spec_path) as f:
        spec = json.load(f)
    for case in spec["cases"]:
        namespace = {}
        exec(SETUP.format(here=str(HERE), shape=tuple(case["shape"]), activation=spec["activation"],
                          weight_decay=spec["weight_decay"]), namespace)
        for stmt in case["statements"]:
            body = "\n".join("        " + line for line in stmt.splitlines())
            exec(f"def _run(number):\n    for _ in range(number):\n{body}\n", namespace)
            run = namespace["_run"]
            run(2)
            torch._C._valgrind_toggle()
            run(spec["number"])
            torch._C._valgrind_toggle_and_dump_stats()


def annotate(path: str) -> Tuple[int, dict]:
    """(total instructions, {function: inclusive instructions}) of a callgrind dump."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", "--auto=no",
                          path], check=True, capture_output=True, text=True).stdout
    total, functions = 0, {}
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(.*)$", line)
        if not m:
            continue
        value, name = int(m.group(1).replace(",", "")), m.group(2).strip()
        if name.startswith("PROGRAM TOTALS"):
            total = value
        else:
            functions[name] = max(value, functions.get(name, 0))
    return total, functions


def count_all(shapes, activation: str, weight_decay: float, number: int, calls: bool) -> dict:
    """Every statement of every shape, counted in one valgrind run."""
    cases = [{"shape": list(shape),
              "statements": list(STATEMENTS.values()) + (list(CALLS.values()) if calls and i == 0 else [])}
             for i, shape in enumerate(shapes)]
    with tempfile.TemporaryDirectory() as tmp:
        spec = os.path.join(tmp, "spec.json")
        with open(spec, "w") as f:
            json.dump({"cases": cases, "activation": activation, "weight_decay": weight_decay,
                       "number": number}, f)
        out = os.path.join(tmp, "callgrind.out")
        subprocess.run(["valgrind", "--tool=callgrind", "--collect-atstart=no", "--dump-instr=no",
                        f"--callgrind-out-file={out}", sys.executable, __file__, "--worker", spec],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dumps = sorted((p for p in os.listdir(tmp) if re.fullmatch(r"callgrind\.out\.\d+", p)),
                       key=lambda p: int(p.rsplit(".", 1)[1]))
        parsed = [annotate(os.path.join(tmp, p)) for p in dumps]
    expected = sum(len(c["statements"]) for c in cases)
    if len(parsed) != expected:
        sys.exit(f"instructions.py: expected {expected} callgrind dumps, got {len(parsed)}")
    results, k = [], 0
    for i, case in enumerate(cases):
        names = list(STATEMENTS) + (list(CALLS) if calls and i == 0 else [])
        counts = {}
        for name in names:
            counts[name] = (parsed[k][0] / number, {f: c / number for f, c in parsed[k][1].items()})
            k += 1
        results.append(phases(counts))
    return results


def phases(counts: dict) -> dict:
    """The per-statement totals, and the phases of the fused step and inference."""
    result = {name: {"instructions": total} for name, (total, _) in counts.items()}

    def inc(statement, needle):
        return inclusive(counts[statement][1], needle)

    step = result["fused step"]["instructions"]
    forward_kernel, backward_kernel = inc("fused step", KERNELS[0]), inc("fused step", KERNELS[1])
    phases = {
        "kernels": forward_kernel + backward_kernel,
        "python entry": result["fused forward"]["instructions"] - inc("fused forward", AUTOGRAD_FORWARD),
        "autograd node": inc("fused step", AUTOGRAD_FORWARD) - forward_kernel,
        "engine": inc("fused step", ENGINE) - backward_kernel - inc("bare step", ENGINE),
    }
    phases["rest"] = step - sum(phases.values())
    result["fused step"]["phases"] = phases
    result["fused step"]["bare step engine"] = inc("bare step", ENGINE)
    loss_step = result["fused loss step"]["instructions"]
    loss_forward, loss_backward = (inc("fused loss step", LOSS_KERNELS[0]),
                                   inc("fused loss step", LOSS_KERNELS[1]))
    loss_phases = {
        "kernels": loss_forward + loss_backward,
        "autograd node": inc("fused loss step", LOSS_AUTOGRAD_FORWARD) - loss_forward,
        "engine": inc("fused loss step", ENGINE) - loss_backward,
    }
    loss_phases["rest"] = loss_step - sum(loss_phases.values())
    result["fused loss step"]["phases"] = loss_phases
    result["fused inference"]["phases"] = {
        "kernel": inc("fused inference", KERNELS[2]),
        "entry": result["fused inference"]["instructions"] - inc("fused inference", KERNELS[2]),
    }
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--activation", default="relu")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--number", type=int, default=20, help="calls counted per statement")
    parser.add_argument("--calls", action="store_true",
                        help="also count ways of calling the op, at the first shape")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--stem", default="instructions", help="name of the JSON file in --out")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the process valgrind runs
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if shutil.which("valgrind") is None or shutil.which("callgrind_annotate") is None:
        sys.exit("instructions.py needs valgrind (Debian: apt-get install valgrind)")

    report = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "activation": args.activation, "weight_decay": args.weight_decay, "number": args.number,
              "dtype": "float32", "threads": 1, "shapes": {}}
    results = count_all([parse_shape(t) for t in args.shapes], args.activation, args.weight_decay,
                        args.number, args.calls)
    print("| shape | eager step | fused step | fused loss step | bare step | eager/fused | kernels "
          "| python entry | node | engine | rest | fused op | eager inf. | fused inf. (kernel) "
          "| eager/fused |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for text, r in zip(args.shapes, results):
        report["shapes"][text] = r
        k = lambda name: r[name]["instructions"] / 1e3  # noqa: E731
        p = {key: v / 1e3 for key, v in r["fused step"]["phases"].items()}
        kernel = r["fused inference"]["phases"]["kernel"] / 1e3
        print(f"| {text} | {k('eager step'):.0f}K | {k('fused step'):.0f}K "
              f"| {k('fused loss step'):.0f}K | {k('bare step'):.0f}K "
              f"| {k('eager step') / k('fused step'):.2f} | {p['kernels']:.0f}K | {p['python entry']:.0f}K "
              f"| {p['autograd node']:.0f}K | {p['engine']:.0f}K | {p['rest']:.0f}K | {k('fused op'):.0f}K "
              f"| {k('eager inference'):.0f}K | {k('fused inference'):.0f}K ({kernel:.0f}K) "
              f"| {k('eager inference') / k('fused inference'):.2f} |", flush=True)
    print("\nThe fused loss step (mlp_ext.fused_mlp_loss) by phase:\n\n"
          "| shape | fused loss step | eager/fused loss | kernels | node | engine | rest |\n"
          "|---|---|---|---|---|---|---|")
    for text, r in zip(args.shapes, results):
        step = r["fused loss step"]
        p = {key: v / 1e3 for key, v in step["phases"].items()}
        print(f"| {text} | {step['instructions'] / 1e3:.0f}K "
              f"| {r['eager step']['instructions'] / step['instructions']:.2f} | {p['kernels']:.0f}K "
              f"| {p['autograd node']:.0f}K | {p['engine']:.0f}K | {p['rest']:.0f}K |", flush=True)
    if args.calls:
        r = results[0]
        print(f"\nCalls of the op at {args.shapes[0]} under no_grad:\n\n| call | instructions |\n|---|---|")
        for name in CALLS:
            print(f"| {name} | {r[name]['instructions'] / 1e3:.1f}K |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.stem}.json"), "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
