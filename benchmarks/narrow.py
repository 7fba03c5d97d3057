"""Narrow MLPs on CUDA: the fully fused kernels against eager nn.Linear, torch.compile
and mlp_ext's own GEMM path.

For each dtype x width (d = h = q) x batch it times, on the same weights:

    eager    nn.Sequential(nn.Linear(w, w), act, nn.Linear(w, w))
    compile  torch.compile of that Sequential (default settings)
    gemm     mlp_ext.FusedMLP with MLP_EXT_NARROW=off (cuBLAS products, our elementwise
             kernels between them)
    fused    mlp_ext.FusedMLP with MLP_EXT_NARROW=on (the fully fused kernels)

in two modes: inference (forward under torch.no_grad) and a training step (forward,
then backward from a fixed upstream gradient; x does not require grad, as data does
not, and weight_decay is 0 so that every variant does the same work). Every
variant's output (and, for the training step, its gradients) is checked against a
float64 reference before it is timed. Timings are medians over interleaved rounds
(each round times every variant once, the order alternating) after warm-up, each
sample a burst of calls long enough (~2 ms) for the CUDA event resolution.

Achieved bandwidth is reported for the bytes the fused algorithm must move
(inference: x and o; training: x, o, z, H forward, and grad_o, z, H, x backward;
weights are negligible) and set against the device's measured copy bandwidth.

    python benchmarks/narrow.py                          # everything (long: see --help)
    python benchmarks/narrow.py --dtypes float16 --widths 64 --batches 18 21
    python benchmarks/narrow.py --no-compile --out benchmarks/results/narrow-quick.json
    python benchmarks/narrow.py --dtypes float16 bfloat16 float32 --widths 64 --batches 18 \
        --no-compile --rounds 10 --merge-into benchmarks/results/cuda-nvidia-h200.json
                                                         # what scripts/gpu_run.sh runs

--merge-into adds these results to the JSON that benchmarks/benchmark.py wrote (under
"narrow") and their Markdown table to the .md beside it (either is created if missing).

float32 runs with torch.set_float32_matmul_precision("high") (TF32) for every
variant, since the fused kernels take float32 only as TF32 (--fp32-precision).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # in-place builds
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # common.py, also when loaded by path
import mlp_ext  # noqa: E402
from common import Clock, gpu_slug, interleaved, medians  # noqa: E402
from mlp_ext import reference  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float32: 1e-2}  # relative Frobenius
ACTIVATIONS = {
    "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "silu": nn.SiLU,
    "identity": nn.Identity,
}
VARIANTS = ("eager", "compile", "gemm", "fused")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    p.add_argument("--widths", nargs="+", type=int, default=[32, 64, 128])
    p.add_argument("--batches", nargs="+", type=int, default=[14, 18, 21],
                   help="log2 of the batch sizes (default: 14 18 21)")
    p.add_argument("--modes", nargs="+", default=["inference", "training"],
                   choices=["inference", "training"])
    p.add_argument("--activation", default="relu", choices=list(ACTIVATIONS))
    p.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--fp32-precision", default="high", choices=["high", "highest"],
                   help="float32 matmul precision for every variant (fused needs 'high')")
    p.add_argument("--out", default=None,
                   help="JSON output (default: benchmarks/results/narrow-cuda-<gpu>.json)")
    p.add_argument("--merge-into", metavar="JSON", default=None,
                   help="also add the results to this JSON of benchmarks/benchmark.py (key "
                        "'narrow') and their table to the .md beside it")
    return p.parse_args(argv)


def sync():
    torch.cuda.synchronize()


def copy_bandwidth(nbytes=1 << 30, repeats=10):
    """Device-to-device copy bandwidth in GB/s (bytes read + written)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").fill_(1.0)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * nbytes / statistics.median(times) / 1e9


def relative_error(actual, expected):
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


class Problem:
    """Weights shared by every variant, inputs, and the float64 reference."""

    def __init__(self, dtype, width, batch, activation):
        self.dtype, self.width, self.batch, self.activation = dtype, width, batch, activation
        self.seq = nn.Sequential(nn.Linear(width, width), ACTIVATIONS[activation](),
                                 nn.Linear(width, width)).to(device="cuda", dtype=dtype)
        self.fused = mlp_ext.FusedMLP.from_sequential(self.seq)  # shares the weights
        self.params = list(self.seq.parameters())
        self.x = torch.randn(batch, width, device="cuda", dtype=dtype)
        self.grad_o = torch.randn(batch, width, device="cuda", dtype=dtype)

    def reference(self, mode):
        """float64 o (inference) or [o, dW1, db1, dW2, db2] (training step)."""
        fc1, fc2 = self.seq[0], self.seq[2]
        w1, b1, w2, b2 = params = [t.detach().double().requires_grad_() for t in
                                   (fc1.weight, fc1.bias, fc2.weight, fc2.bias)]
        with torch.enable_grad():
            o, _ = reference.fused_mlp(self.x.double(), w1, w2, b1, b2, activation=self.activation)
            if mode == "inference":
                return [o.detach()]
            return [o.detach(), *torch.autograd.grad(o, params, self.grad_o.double())]

    def make_step(self, variant, mode, compiled):
        """A function running one inference / training step of `variant`, and a
        function returning what the last step computed (same order as reference())."""
        env = {"gemm": "off", "fused": "on"}.get(variant)
        module = {"eager": self.seq, "compile": compiled, "gemm": self.fused, "fused": self.fused}[variant]
        state = {}

        def run():
            if env is not None and os.environ.get("MLP_EXT_NARROW") != env:
                os.environ["MLP_EXT_NARROW"] = env  # read by the op at each call
            if mode == "inference":
                with torch.no_grad():
                    state["o"] = module(self.x)
            else:
                for p in self.params:
                    p.grad = None
                o = module(self.x)
                o.backward(self.grad_o)
                state["o"] = o.detach()

        def outputs():
            if mode == "inference":
                return [state["o"]]
            fc1, fc2 = self.seq[0], self.seq[2]
            return [state["o"], fc1.weight.grad, fc1.bias.grad, fc2.weight.grad, fc2.bias.grad]

        return run, outputs

    def bytes_moved(self, mode):
        """Bytes the fused algorithm must move (weights negligible)."""
        size = torch.empty((), dtype=self.dtype).element_size()
        n, w = self.batch, self.width
        if mode == "inference":
            return n * 2 * w * size                    # x, o
        return n * (4 * w + 4 * w) * size              # x, o, z, H; grad_o, z, H, x

    def flops(self, mode):
        n, w = self.batch, self.width
        forward = 2 * n * 2 * w * w
        # backward without dX: G_H, dW2, dW1 (bias sums negligible)
        return forward if mode == "inference" else forward + 2 * n * 3 * w * w


def peak_memory_mb(run):
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def fused_kernels_ran(run):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run()
        sync()
    return any("narrow_forward_kernel" in e.name for e in prof.events())


def bench_problem(problem, mode, args, copy_bw):
    variants = [v for v in VARIANTS if not (v == "compile" and args.no_compile)]
    compiled = None
    if "compile" in variants:
        torch._dynamo.reset()
        compiled = torch.compile(problem.seq)
    expected = problem.reference(mode)
    rows, runs = [], {}
    for variant in variants:
        run, outputs = problem.make_step(variant, mode, compiled)
        row = {"dtype": str(problem.dtype).replace("torch.", ""), "width": problem.width,
               "batch": problem.batch, "mode": mode, "variant": variant,
               "activation": problem.activation}
        try:
            start = time.perf_counter()
            run()
            sync()
            if variant == "compile":
                row["compile_s"] = round(time.perf_counter() - start, 2)  # first call compiles
            errors = [relative_error(a, e) for a, e in zip(outputs(), expected)]
            row["max_relative_error"] = max(errors)
            row["verified"] = all(e <= TOLERANCE[problem.dtype] for e in errors)
            if variant == "fused":
                row["fused_kernels_ran"] = fused_kernels_ran(run)
            if row["verified"]:
                runs[variant] = run
            row["peak_memory_MB"] = round(peak_memory_mb(run), 1)
        except Exception as e:  # noqa: BLE001 - recorded in the results, the run goes on
            row["verified"], row["error"] = False, f"{type(e).__name__}: {e}"
        rows.append(row)
    times = {}
    if runs:  # medians in ms; a sample is a burst of calls (~2 ms, at most 200) timed by CUDA events
        clock = Clock("cuda", cuda_events=True)
        times = {name: 1e3 * t for name, t in
                 medians(interleaved(runs, clock, args.rounds, 2e-3, max_calls=200)).items()}
    eager = times.get("eager")
    for row in rows:
        ms = times.get(row["variant"])
        if ms is None:
            continue
        row["ms"] = ms
        row["speedup_vs_eager"] = eager / ms if eager else None
        row["GBps"] = problem.bytes_moved(mode) / (ms / 1e3) / 1e9
        row["fraction_of_copy_bandwidth"] = row["GBps"] / copy_bw
        row["TFLOPs"] = problem.flops(mode) / (ms / 1e3) / 1e12
    fused = times.get("fused")
    if fused:
        for row in rows:
            if row["variant"] == "fused":
                row.update({f"fused_speedup_vs_{v}": times[v] / fused for v in times if v != "fused"})
    return rows


def markdown_table(results):
    """One row per (dtype, width, batch, mode): each variant's time and the fused
    kernels' speed-ups, bandwidth, error and whether they ran."""
    def ms(row):
        return f"{row['ms']:.4f}" if row and "ms" in row else ("–" if not row else "FAIL")

    def ratio(value):
        return f"{value:.2f}×" if value else "–"

    head = ["dtype", "width", "batch", "mode", *(f"{v} ms" for v in VARIANTS),
            "fused/eager", "fused/compile", "fused/gemm", "fused GB/s", "% copy BW",
            "fused kernels ran", "max rel. error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    groups = {}
    for row in results:
        groups.setdefault((row["dtype"], row["width"], row["batch"], row["mode"]), {})[row["variant"]] = row
    for (dtype, width, batch, mode), rows in groups.items():
        fused = rows.get("fused", {})
        errors = [r["max_relative_error"] for r in rows.values() if "max_relative_error" in r]
        cells = [dtype, str(width), str(batch), mode, *(ms(rows.get(v)) for v in VARIANTS),
                 ratio(fused.get("fused_speedup_vs_eager")), ratio(fused.get("fused_speedup_vs_compile")),
                 ratio(fused.get("fused_speedup_vs_gemm")),
                 f"{fused['GBps']:.0f}" if "GBps" in fused else "–",
                 f"{100 * fused['fraction_of_copy_bandwidth']:.0f}%" if "GBps" in fused else "–",
                 {True: "yes", False: "**no**"}.get(fused.get("fused_kernels_ran"), "–"),
                 f"{max(errors):.2g}" if errors else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merge_into(path, meta, results):
    """Adds the results to benchmark.py's JSON at path (key "narrow") and their table
    to the .md beside it; creates either if missing."""
    report = {"meta": meta}
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
    report["narrow"] = {"meta": meta, "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    md = os.path.splitext(path)[0] + ".md"
    section = (f"\n## Narrow MLPs: the fully fused kernels (MLP_EXT_NARROW=on) against the GEMM path "
               f"(off) and nn.Linear\n\n{meta['device']}, torch {meta['torch']}, CUDA {meta['cuda']}; "
               f"{meta['activation']}, float32 matmul precision {meta['fp32_precision']}, medians of "
               f"{meta['rounds']} interleaved rounds; device copy bandwidth "
               f"{meta['copy_bandwidth_GBps']:.0f} GB/s. Training step = forward + backward from a "
               f"fixed grad_o (x without grad, weight_decay 0)."
               + (f" INTERRUPTED {meta['interrupted']}." if meta.get("interrupted") else "")
               + f"\n\n{markdown_table(results)}\n")
    with open(md, "a") as f:
        f.write(section)
    print(f"merged into {path} and {md}")


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/narrow.py needs a CUDA device")
    device = torch.cuda.get_device_name()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"narrow-cuda-{gpu_slug(device)}.json")
    copy_bw = copy_bandwidth()
    print(f"{device}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
          f"device copy bandwidth {copy_bw:.0f} GB/s", flush=True)
    old_env = os.environ.get("MLP_EXT_NARROW")
    old_precision = torch.get_float32_matmul_precision()
    results = []
    header = (f"{'dtype':9} {'w':>4} {'batch':>8} {'mode':9} " +
              " ".join(f"{v + ' ms':>11}" for v in VARIANTS) +
              f" {'x eager':>8} {'x compile':>9} {'x gemm':>7} {'fused GB/s':>11} {'% copy':>7}")
    print(header)
    interrupted = None
    try:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            torch.set_float32_matmul_precision(args.fp32_precision if dtype == torch.float32 else "highest")
            for width in args.widths:
                for log_batch in args.batches:
                    problem = Problem(dtype, width, 2**log_batch, args.activation)
                    for mode in args.modes:
                        rows = bench_problem(problem, mode, args, copy_bw)
                        results.extend(rows)
                        by_variant = {r["variant"]: r for r in rows}
                        fused = by_variant.get("fused", {})

                        def cell(v):
                            r = by_variant.get(v, {})
                            return f"{r['ms']:11.4f}" if "ms" in r else f"{'-' if v not in by_variant else 'FAIL':>11}"

                        def ratio(key):
                            value = fused.get(key)
                            return f"{value:.2f}" if value else "-"

                        print(f"{dtype_name:9} {width:4d} {2**log_batch:8d} {mode:9} " +
                              " ".join(cell(v) for v in VARIANTS) +
                              f" {ratio('fused_speedup_vs_eager'):>8} {ratio('fused_speedup_vs_compile'):>9}"
                              f" {ratio('fused_speedup_vs_gemm'):>7}"
                              f" {fused.get('GBps', float('nan')):11.0f}"
                              f" {100 * fused.get('fraction_of_copy_bandwidth', float('nan')):6.0f}%",
                              flush=True)
                    del problem
                    torch.cuda.empty_cache()
    except KeyboardInterrupt:  # Ctrl-C, or a time limit's SIGINT: keep the problems done
        interrupted = f"after {len(results)} result rows"
        print(f"interrupted {interrupted}: writing those", flush=True)
    finally:
        torch.set_float32_matmul_precision(old_precision)
        if old_env is None:
            os.environ.pop("MLP_EXT_NARROW", None)
        else:
            os.environ["MLP_EXT_NARROW"] = old_env
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    meta = {
        "device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "copy_bandwidth_GBps": copy_bw,
        "fp32_precision": args.fp32_precision, "activation": args.activation,
        "rounds": args.rounds, "command": " ".join(sys.argv),
        "notes": "training step = forward + backward from a fixed grad_o, x without grad, "
                 "weight_decay 0; GBps counts the bytes the fused algorithm must move",
    }
    if interrupted:
        meta["interrupted"] = interrupted
    with open(out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"wrote {out}")
    if args.merge_into:
        merge_into(args.merge_into, meta, results)
    print("\n" + markdown_table(results))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
