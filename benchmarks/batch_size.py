"""Exercise 5(b): what partitioning the graph over devices gains over training
on a smaller minibatch. Three measurements on this machine:

1. Hardware efficiency against batch size: a training step of the fused op
   (forward, backward of J = cross_entropy + s, an SGD step) for the D2L MNIST
   MLP (784 -> 256 -> 10, float32): time per step and per example, GFLOP/s, and
   the memory a step holds (mlp_ext.memory_footprint: parameters, gradients,
   input, saved Z and H, output).
2. Gradient accumulation: a batch of 1024 as k micro-batches (the same
   gradients, tests/test_accumulation.py): time per example and memory.
3. Smaller batches without accumulation: loss curves of the digits example
   (examples/train_digits.py's data and model size) at several batch sizes and
   learning rates, the same number of examples seen.

    python benchmarks/batch_size.py [--quick] [--plot PATH]

writes benchmarks/results/batch_size.json (and the plot, default
benchmarks/results/batch_size.png).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
try:
    import mlp_ext
except ModuleNotFoundError:
    sys.path.insert(0, str(ROOT))
    import mlp_ext
sys.path.insert(0, str(ROOT / "examples"))

D, H, Q = 784, 256, 10


def flops_per_step(n, d=D, h=H, q=Q):
    """Multiply-adds x 2 of a training step without dx: forward 2n(dh + hq);
    backward dW2 2nqh, G_H 2nqh, dW1 2nhd."""
    return 2 * n * (d * h + h * q) + 2 * n * (2 * q * h + h * d)


def time_step(step, budget=0.4, min_calls=3):
    """Median seconds per call over rounds filling `budget` seconds."""
    step()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < budget:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
        if len(times) >= 2000:
            break
    return statistics.median(times)


def make(dtype=torch.float32):
    torch.manual_seed(0)
    mlp = mlp_ext.FusedMLP(D, H, Q, weight_decay=1e-4, dtype=dtype)
    return mlp, torch.optim.SGD(mlp.parameters(), lr=0.01)


def efficiency(batches, budget):
    mlp, opt = make()
    rows = []
    for n in batches:
        x, y = torch.randn(n, D), torch.randint(0, Q, (n,))

        def step():
            opt.zero_grad()
            o, s = mlp(x, return_penalty=True)
            (F.cross_entropy(o, y) + s).backward()
            opt.step()

        t = time_step(step, budget)
        mem = mlp_ext.memory_footprint(n, D, H, Q, dtype=torch.float32)
        rows.append(dict(batch=n, step_s=t, per_example_us=t / n * 1e6, gflops=flops_per_step(n) / t / 1e9,
                         memory_bytes=mem.total, saved_activation_bytes=mem.saved_activations))
        print(f"batch {n:5d}: {t * 1e3:8.3f} ms/step  {t / n * 1e6:8.2f} us/example  "
              f"{rows[-1]['gflops']:6.2f} GFLOP/s  {mem.total / 2**20:7.2f} MiB", flush=True)
    return rows


def accumulation(total, micro_counts, budget):
    mlp, opt = make()
    x, y = torch.randn(total, D), torch.randint(0, Q, (total,))
    rows = []
    for k in micro_counts:
        xs, ys = x.chunk(k), y.chunk(k)

        def step():
            opt.zero_grad()
            for xi, yi in zip(xs, ys):
                o, s = mlp(xi, return_penalty=True)
                (F.cross_entropy(o, yi) * (len(xi) / total) + s / k).backward()
            opt.step()

        t = time_step(step, budget)
        mem = mlp_ext.memory_footprint(total // k, D, H, Q, dtype=torch.float32)
        rows.append(dict(micro_batches=k, micro_batch=total // k, step_s=t, per_example_us=t / total * 1e6,
                         memory_bytes=mem.total, saved_activation_bytes=mem.saved_activations))
        print(f"{k:3d} x {total // k:5d}: {t * 1e3:8.3f} ms/step  {t / total * 1e6:7.2f} us/example  "
              f"{mem.total / 2**20:7.2f} MiB", flush=True)
    return rows


def digits_curves(batches, lrs, epochs, hidden=64, weight_decay=1e-4):
    from train_digits import load_data

    x_train, y_train, x_test, y_test = load_data(0, torch.float32)
    n = len(x_train)
    total = epochs * n
    curves = []
    for b in batches:
        for lr in lrs:
            torch.manual_seed(0)
            mlp = mlp_ext.FusedMLP(x_train.shape[1], hidden, 10, weight_decay=weight_decay)
            opt = torch.optim.SGD(mlp.parameters(), lr=lr)
            g = torch.Generator().manual_seed(1)
            seen, points, order, pos = 0, [], torch.randperm(n, generator=g), 0
            next_mark = 0
            start = time.perf_counter()
            while seen < total:
                if seen >= next_mark:
                    with torch.no_grad():
                        o, s = mlp(x_train, return_penalty=True)
                        points.append((seen, (F.cross_entropy(o, y_train) + s).item()))
                    next_mark += n // 4
                if pos + b > n:
                    order, pos = torch.randperm(n, generator=g), 0
                idx = order[pos:pos + b]
                pos += b
                opt.zero_grad()
                o, s = mlp(x_train[idx], return_penalty=True)
                (F.cross_entropy(o, y_train[idx]) + s).backward()
                opt.step()
                seen += b
            seconds = time.perf_counter() - start
            with torch.no_grad():
                o, s = mlp(x_train, return_penalty=True)
                points.append((seen, (F.cross_entropy(o, y_train) + s).item()))
                acc = (mlp(x_test).argmax(1) == y_test).double().mean().item()
            curves.append(dict(batch=b, lr=lr, examples=seen, steps=seen // b, final_J=points[-1][1],
                               test_accuracy=acc, seconds=seconds, curve=points))
            print(f"batch {b:4d} lr {lr:5.2f}: {seen // b:6d} steps  J {points[-1][1]:.4f}  "
                  f"test accuracy {acc:.4f}  {seconds:.1f} s", flush=True)
    return curves


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    eff = result["efficiency"]
    ax = axes[0]
    ax.loglog([r["batch"] for r in eff], [r["gflops"] for r in eff], "o-", label="GFLOP/s")
    ax.set_xlabel("batch size")
    ax.set_ylabel("GFLOP/s (training step)")
    ax2 = ax.twinx()
    ax2.semilogx([r["batch"] for r in eff], [r["memory_bytes"] / 2**20 for r in eff], "s--", color="C1",
               label="memory (MiB)")
    ax2.set_ylabel("memory of a step (MiB)")
    ax.set_title(f"fused op, {D}-{H}-{Q} float32: efficiency vs batch")
    ax.legend(loc="upper left")
    ax2.legend(loc="lower right")

    acc = result["accumulation"]
    ax = axes[1]
    ax.semilogx([r["micro_batch"] for r in acc], [r["per_example_us"] for r in acc], "o-", base=2,
                label="time per example (us)")
    ax.set_xlabel(f"micro-batch size (batch {result['accumulation_batch']} accumulated)")
    ax.set_ylabel("us per example")
    ax2 = ax.twinx()
    ax2.semilogx([r["micro_batch"] for r in acc], [r["memory_bytes"] / 2**20 for r in acc], "s--", base=2,
                 color="C1", label="memory (MiB)")
    ax2.set_ylabel("memory of a micro-step (MiB)")
    ax.set_title("gradient accumulation: same gradients")
    ax.legend(loc="upper right")
    ax2.legend(loc="center right")

    ax = axes[2]
    best = {}
    for c in result["digits"]:
        if c["batch"] not in best or c["final_J"] < best[c["batch"]]["final_J"]:
            best[c["batch"]] = c
    for b, c in sorted(best.items()):
        xs, ys = zip(*c["curve"])
        ax.semilogy(xs, ys, label=f"batch {b}, lr {c['lr']} ({c['steps']} steps)")
    ax.set_xlabel("examples seen")
    ax.set_ylabel("training J = L + s")
    ax.set_title("digits: best learning rate per batch size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes, shorter timing (a smoke run)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "batch_size.json"))
    p.add_argument("--plot", default=str(ROOT / "benchmarks" / "results" / "batch_size.png"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = 0.05 if args.quick else 0.5
    batches = [1, 16, 256] if args.quick else [1, 4, 16, 64, 256, 1024, 4096]
    micro = [1, 4] if args.quick else [1, 2, 4, 8, 16, 32, 64, 256, 1024]
    result = dict(
        machine=dict(platform=platform.platform(), processor=platform.processor(), cpus=os.cpu_count(),
                     threads=torch.get_num_threads(), torch=torch.__version__),
        layer=dict(in_features=D, hidden_features=H, out_features=Q, dtype="float32"),
        efficiency=efficiency(batches, budget),
        accumulation_batch=1024,
        accumulation=accumulation(1024, micro, budget),
        digits=digits_curves([8, 32] if args.quick else [4, 16, 64, 256],
                             [0.1] if args.quick else [0.03, 0.1, 0.3, 1.0],
                             1 if args.quick else 10),
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
