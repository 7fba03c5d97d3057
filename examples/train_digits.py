"""Train a digit classifier with FusedMLP and with the nn.Linear MLP it replaces.

The data set is scikit-learn's handwritten digits (1797 images of 8x8 pixels,
10 classes; shipped with scikit-learn, no download). Both models start from the
same weights and see the same mini-batches; both minimize

    J = cross_entropy(o, y) + s,   s = weight_decay/2 (||W1||^2 + ||W2||^2)

with plain SGD. FusedMLP returns s from the same fused call; the nn.Linear
Sequential computes s from its weights. The steps run in lockstep (one step of
each, alternately, each timed), so the two loss curves can be compared step by
step and the two times are taken under the same machine load.

    python examples/train_digits.py                  # about 10 s on 2 CPU cores
    python examples/train_digits.py --plot digits.png
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn

try:
    import mlp_ext
except ModuleNotFoundError:  # not installed: the checkout this script is in (an in-place build)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import mlp_ext
from mlp_ext import FusedMLP


def load_data(seed: int, dtype: torch.dtype):
    """Standardized digits, split 80/20 into training and test tensors."""
    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.2, random_state=seed, stratify=labels)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=dtype)
    as_y = lambda a: torch.tensor(a, dtype=torch.long)
    return as_x(x_train), as_y(y_train), as_x(x_test), as_y(y_test)


def penalty(seq: nn.Sequential, weight_decay: float) -> Tensor:
    """The L2 term the usual way, from the weights (biases are not regularized)."""
    return weight_decay / 2 * (seq[0].weight.square().sum() + seq[2].weight.square().sum())


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def train(args) -> dict:
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    x_train, y_train, x_test, y_test = load_data(args.seed, dtype)

    fused = FusedMLP(x_train.shape[1], args.hidden, 10, activation=args.activation,
                     weight_decay=args.weight_decay, dtype=dtype)
    linear = fused.to_sequential(copy_weights=True)  # same initial weights, own copies
    opt_fused = torch.optim.SGD(fused.parameters(), lr=args.lr)
    opt_linear = torch.optim.SGD(linear.parameters(), lr=args.lr)

    def step_fused(xb, yb):
        opt_fused.zero_grad(set_to_none=True)
        o, s = fused(xb, return_penalty=True)
        loss = F.cross_entropy(o, yb) + s
        loss.backward()
        opt_fused.step()
        return loss

    def step_linear(xb, yb):
        opt_linear.zero_grad(set_to_none=True)
        loss = F.cross_entropy(linear(xb), yb) + penalty(linear, args.weight_decay)
        loss.backward()
        opt_linear.step()
        return loss

    # One untimed step on throwaway copies first: one-time set-up costs (kernel
    # selection, first library calls) are not training time.
    xb, yb = x_train[:args.batch_size], y_train[:args.batch_size]
    fused_copy = copy.deepcopy(fused)
    o, s = fused_copy(xb, return_penalty=True)
    (F.cross_entropy(o, yb) + s).backward()
    linear_copy = copy.deepcopy(linear)
    (F.cross_entropy(linear_copy(xb), yb) + penalty(linear_copy, args.weight_decay)).backward()

    steps = [("fused", step_fused), ("nn.Linear", step_linear)]
    seconds = {name: 0.0 for name, _ in steps}
    losses = {name: [] for name, _ in steps}
    order = torch.Generator().manual_seed(args.seed)
    n = x_train.shape[0]
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=order)
        for i in range(0, n, args.batch_size):
            idx = perm[i:i + args.batch_size]
            xb, yb = x_train[idx], y_train[idx]
            # Alternate which model goes first, so neither is always warmer.
            for name, step in (steps if len(losses["fused"]) % 2 == 0 else steps[::-1]):
                start = time.perf_counter()
                loss = step(xb, yb)
                seconds[name] += time.perf_counter() - start
                losses[name].append(loss.item())

    curve_f, curve_l = torch.tensor(losses["fused"]), torch.tensor(losses["nn.Linear"])
    max_difference = (curve_f - curve_l).abs().max().item()
    return {
        "steps": len(losses["fused"]),
        "losses": losses,
        "max_loss_difference": max_difference,
        "max_relative_loss_difference": ((curve_f - curve_l).abs() / curve_l.abs()).max().item(),
        "seconds": seconds,
        "speedup": seconds["nn.Linear"] / seconds["fused"],
        "test_accuracy": {"fused": accuracy(fused, x_test, y_test),
                          "nn.Linear": accuracy(linear, x_test, y_test)},
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_diff) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    for name, style in (("nn.Linear", "-"), ("fused", "--")):
        ax.plot(result["losses"][name], style, label=f"{name} ({result['seconds'][name]:.2f} s)")
    ax.set_ylabel("J = cross-entropy + s")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"digits: FusedMLP vs nn.Linear, {result['speedup']:.2f}x faster per step")
    diff = [abs(a - b) for a, b in zip(result["losses"]["fused"], result["losses"]["nn.Linear"])]
    ax_diff.plot(diff)
    ax_diff.set_ylabel("|difference|")
    ax_diff.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--activation", default="relu")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=1e-3)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest relative difference allowed between the two loss curves")
    p.add_argument("--plot", type=Path, help="write the two loss curves to this PNG")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = train(args)
    acc = result["test_accuracy"]
    print(f"{result['steps']} SGD steps, batch {args.batch_size}, hidden {args.hidden}, "
          f"{args.activation}, weight decay {args.weight_decay:g}, {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    print(f"final loss     fused {result['losses']['fused'][-1]:.6f}   "
          f"nn.Linear {result['losses']['nn.Linear'][-1]:.6f}")
    print(f"loss curves    largest difference {result['max_loss_difference']:.2e} "
          f"(relative {result['max_relative_loss_difference']:.2e})")
    print(f"test accuracy  fused {acc['fused']:.4f}   nn.Linear {acc['nn.Linear']:.4f}")
    print(f"training time  fused {result['seconds']['fused']:.3f} s   "
          f"nn.Linear {result['seconds']['nn.Linear']:.3f} s   -> {result['speedup']:.2f}x")
    if args.plot:
        plot(result, args.plot)
        print(f"wrote {args.plot}")
    if not math.isfinite(result["max_relative_loss_difference"]) or \
            result["max_relative_loss_difference"] > args.tolerance:
        raise SystemExit(f"the loss curves differ by more than {args.tolerance:g} (relative)")
    return result


if __name__ == "__main__":
    main()
