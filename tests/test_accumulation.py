"""Gradient accumulation over micro-batches (the section's exercise 5(b):
what a smaller batch costs instead of partitioning the graph over devices).

Accumulating the gradients of k micro-batches gives the gradients of the whole
batch to float64 rounding, weight decay included, when each micro-batch's
mean loss is weighted by its share of the examples and s enters once in all
(either whole in one micro-batch, or s/k in each): J = sum_i (n_i/n) L_i + s.
The saved activations (Z, H) of one micro-batch are all that is alive at a
time, n_i/n of the whole batch's.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import mlp_ext

DTYPE = torch.float64


def batch(seed, n, d=6, q=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, dtype=DTYPE, generator=g), torch.randint(0, q, (n,), generator=g)


def whole_batch_grads(mlp, x, y):
    mlp.zero_grad()
    o, s = mlp(x, return_penalty=True)
    (F.cross_entropy(o, y) + s).backward()
    return [p.grad.clone() for p in mlp.parameters()]


@pytest.mark.parametrize("sizes", [(4, 4, 4, 4), (5, 7, 1, 3), (16,), (1,) * 16])
@pytest.mark.parametrize("penalty", ["once", "spread"])
def test_accumulated_micro_batches_give_the_whole_batch_gradients(sizes, penalty):
    torch.manual_seed(0)
    mlp = mlp_ext.FusedMLP(6, 9, 4, activation="gelu", weight_decay=0.05, dtype=DTYPE)
    x, y = batch(1, sum(sizes))
    want = whole_batch_grads(mlp, x, y)

    mlp.zero_grad()
    n, k = sum(sizes), len(sizes)
    for i, (xi, yi) in enumerate(zip(x.split(sizes), y.split(sizes))):
        o, s = mlp(xi, return_penalty=True)
        share = s if (penalty == "spread" or i == 0) else 0 * s
        weight = 1 / k if penalty == "spread" else 1.0
        (len(xi) / n * F.cross_entropy(o, yi) + weight * share).backward()
    for (name, p), g in zip(mlp.named_parameters(), want):
        assert_close(p.grad, g, msg=lambda m: f"{name}, micro-batches {sizes}, s {penalty}\n{m}")


def test_accumulation_trains_like_the_whole_batch():
    """SGD with momentum: 3 steps, each on 12 examples as 3 micro-batches of 4,
    equal 3 steps on the 12 examples at once."""
    torch.manual_seed(1)
    whole = mlp_ext.FusedMLP(6, 9, 4, activation="tanh", weight_decay=0.1, dtype=DTYPE)
    micro = mlp_ext.FusedMLP(6, 9, 4, activation="tanh", weight_decay=0.1, dtype=DTYPE)
    micro.load_state_dict(whole.state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.2, momentum=0.9) for m in (whole, micro)]
    for step in range(3):
        x, y = batch(10 + step, 12)
        opts[0].zero_grad()
        o, s = whole(x, return_penalty=True)
        (F.cross_entropy(o, y) + s).backward()
        opts[0].step()
        opts[1].zero_grad()
        for j, (xi, yi) in enumerate(zip(x.split(4), y.split(4))):
            o, s = micro(xi, return_penalty=True)
            (F.cross_entropy(o, yi) / 3 + s / 3).backward()
        opts[1].step()
    for (name, p), q in zip(micro.named_parameters(), whole.parameters()):
        assert_close(p, q, msg=lambda m: f"{name} after 3 steps\n{m}")


def test_micro_batches_save_a_share_of_the_activations():
    """What accumulation saves: the activations alive at a time (memory_footprint)."""
    whole = mlp_ext.memory_footprint(1024, 784, 256, 10, dtype=torch.float32)
    micro = mlp_ext.memory_footprint(256, 784, 256, 10, dtype=torch.float32)
    assert micro.saved_activations * 4 == whole.saved_activations
    assert micro.parameters == whole.parameters and micro.gradients == whole.gradients


def test_batch_size_benchmark_runs(tmp_path):
    """benchmarks/batch_size.py --quick (a smoke run of the exercise 5(b) script)
    writes its JSON and plot; its FLOP count is the step's matrix products."""
    from pathlib import Path

    from helpers import load_module

    script = load_module("batch_size", Path(__file__).resolve().parents[1] / "benchmarks" / "batch_size.py")
    # forward 2n(dh + hq); backward dW2, G_H: 2nqh each; dW1: 2nhd (no dx)
    assert script.flops_per_step(3, d=5, h=7, q=2) == 2 * 3 * (35 + 14) + 2 * 3 * (2 * 14 + 35)
    result = script.main(["--quick", "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")])
    assert (tmp_path / "r.json").stat().st_size > 0 and (tmp_path / "r.png").stat().st_size > 0
    assert [r["batch"] for r in result["efficiency"]] == [1, 16, 256]
    assert all(r["gflops"] > 0 for r in result["efficiency"])
    assert all(c["examples"] >= 1437 for c in result["digits"])
