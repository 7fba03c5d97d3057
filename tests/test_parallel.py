"""Tensor parallel and data parallel FusedMLP on torch.distributed (gloo, loopback).

Each world size starts its processes once (mlp_ext.parallel.run_local: spawn,
127.0.0.1, a port the OS picks, timeouts on the collectives and on the join)
and runs every scenario below in them, in float64, against the single-process
FusedMLP that every rank also computes. A scenario that fails stops its rank
(its later scenarios report "not run"); its traceback is shown by the test of
that scenario.
"""
import contextlib
import copy
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.testing import assert_close

import mlp_ext
from mlp_ext.parallel import TensorParallelFusedMLP, run_local, shard_range, shard_sizes

from helpers import check_scenario, load_module, run_scenarios

DTYPE = torch.float64
D, Q = 5, 3  # in_features, out_features


# ---------------------------------------------------------------------------
# Helpers that run inside the ranks
# ---------------------------------------------------------------------------

@contextlib.contextmanager
def count_collectives():
    """Counts torch.distributed.all_reduce calls (what mlp_ext.parallel issues)."""
    counts = Counter()
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        counts["all_reduce"] += 1
        counts["elements"] += tensor.numel()
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield counts
    finally:
        dist.all_reduce = original


def make_mlp(seed, hidden, **kwargs):
    torch.manual_seed(seed)
    return mlp_ext.FusedMLP(D, hidden, Q, dtype=DTYPE, **kwargs)


def randn(seed, *shape):
    return torch.randn(*shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed))


def shard_grads(mlp, lo, hi):
    """The reference gradients of the parameters a rank holding [lo, hi) has."""
    g = {"fc1.weight": mlp.fc1.weight.grad[lo:hi], "fc2.weight": mlp.fc2.weight.grad[:, lo:hi]}
    if mlp.fc1.bias is not None:
        g["fc1.bias"] = mlp.fc1.bias.grad[lo:hi]
        g["fc2.bias"] = mlp.fc2.bias.grad
    return g


# ---------------------------------------------------------------------------
# Scenarios (each runs on every rank, in this order)
# ---------------------------------------------------------------------------

def tp_matches_single_device(rank, world):
    """o, s, J = L + s and every gradient equal the single-device FusedMLP, with
    one all_reduce forward and one backward (none when x needs no gradient)."""
    configs = [
        dict(hidden=7, activation="relu", bias=True, weight_decay=0.05, x_shape=(6, D)),  # uneven split
        dict(hidden=6, activation="gelu", bias=False, weight_decay=0.0, x_shape=(2, 3, D)),  # even; 3-D x
        dict(hidden=world - 1, activation="tanh", bias=True, weight_decay=0.1, x_shape=(4, D)),  # a rank holds none
        dict(hidden=9, activation="silu", bias=True, weight_decay=0.1, x_shape=(0, D)),  # empty batch
    ]
    for seed, cfg in enumerate(configs):
        cfg = dict(cfg)
        x_shape = cfg.pop("x_shape")
        mlp = make_mlp(seed, **cfg)
        tp = TensorParallelFusedMLP.from_fused(mlp)
        lo, hi = tp.hidden_range
        assert (lo, hi) == shard_range(cfg["hidden"], rank, world)
        x = randn(100 + seed, *x_shape).requires_grad_()
        c = randn(200 + seed, *x_shape[:-1], Q)  # L = <c, o>: every o gets its own gradient
        x_ref = x.detach().clone().requires_grad_()

        with count_collectives() as forward:
            o, s = tp(x, return_penalty=True)
        J = (c * o).sum() + s
        with count_collectives() as backward:
            J.backward()
        o_ref, s_ref = mlp(x_ref, return_penalty=True)
        J_ref = (c * o_ref).sum() + s_ref
        J_ref.backward()

        where = f"config {cfg}"
        assert forward["all_reduce"] == 1, (where, forward)
        assert forward["elements"] == o.numel() + 1, (where, forward)  # o and s in one buffer
        assert backward["all_reduce"] == 1, (where, backward)  # dx only
        assert_close(o, o_ref, msg=lambda m: f"{where}: o\n{m}")
        assert_close(s, s_ref, msg=lambda m: f"{where}: s\n{m}")
        assert_close(J, J_ref, msg=lambda m: f"{where}: J\n{m}")
        assert_close(x.grad, x_ref.grad, msg=lambda m: f"{where}: dJ/dx\n{m}")
        got = {name: p.grad for name, p in tp.named_parameters()}
        want = shard_grads(mlp, lo, hi)
        assert got.keys() == want.keys(), (where, got.keys())
        for name in want:
            assert_close(got[name], want[name], msg=lambda m: f"{where}: dJ/d{name}\n{m}")

        # An input that needs no gradient: no all_reduce in the backward.
        tp.zero_grad()
        o, s = tp(x.detach(), return_penalty=True)
        with count_collectives() as backward:
            ((c * o).sum() + s).backward()
        assert backward["all_reduce"] == 0, (where, backward)
        assert_close(tp.fc1.weight.grad, mlp.fc1.weight.grad[lo:hi], msg=lambda m: f"{where}: no dx\n{m}")


def tp_double_backward(rank, world):
    """A gradient penalty ||dL/dx||^2 (create_graph=True) differentiates through
    f and g like through the single-device operator."""
    mlp = make_mlp(10, 7, activation="tanh", weight_decay=0.1)
    tp = TensorParallelFusedMLP.from_fused(mlp)
    x, c = randn(11, 4, D), randn(12, 4, Q)
    lo, hi = tp.hidden_range

    def penalized(module):
        xr = x.clone().requires_grad_()
        o, s = module(xr, return_penalty=True)
        L = (c * o.tanh()).sum()
        (dx,) = torch.autograd.grad(L, xr, create_graph=True)
        J = L + s + dx.square().sum()
        J.backward()
        return J

    assert_close(penalized(tp), penalized(mlp))
    for name, want in shard_grads(mlp, lo, hi).items():
        assert_close(tp.get_parameter(name).grad, want, msg=lambda m: f"dJ/d{name}\n{m}")


def tp_shard_and_gather(rank, world):
    """from_fused / to_fused round trip, the constructor's initialization, the
    parameter names, and the errors."""
    for hidden, bias in ((7, True), (6, False), (world - 1, True)):
        mlp = make_mlp(20, hidden, bias=bias, activation="sigmoid", weight_decay=0.3)
        tp = TensorParallelFusedMLP.from_fused(mlp)
        assert list(tp.state_dict()) == list(mlp.state_dict())
        back = tp.to_fused()
        assert isinstance(back, mlp_ext.FusedMLP) and back.extra_repr() == mlp.extra_repr()
        for (name, p), q in zip(back.named_parameters(), mlp.parameters()):
            assert torch.equal(p, q) and p.is_leaf and p.requires_grad, name
            assert p.data_ptr() != q.data_ptr(), f"{name} must be a copy"

    # The constructor initializes like FusedMLP under the same seed.
    torch.manual_seed(21)
    tp = TensorParallelFusedMLP(D, 7, Q, activation="gelu", weight_decay=0.1, dtype=DTYPE)
    want = make_mlp(21, 7, activation="gelu", weight_decay=0.1)
    for p, q in zip(tp.to_fused().parameters(), want.parameters()):
        assert torch.equal(p, q)

    # Ranks that hold different models: ValueError on every rank, no hang.
    with pytest.raises(ValueError, match="differs between ranks"):
        TensorParallelFusedMLP.from_fused(make_mlp(22 + rank, 7))
    with pytest.raises(TypeError, match="expected a mlp_ext.FusedMLP"):
        TensorParallelFusedMLP.from_fused(torch.nn.Linear(2, 2))
    # Bad input fails in the local operator on every rank, before any collective.
    tp = TensorParallelFusedMLP.from_fused(make_mlp(23, 7))
    with pytest.raises(RuntimeError, match=r"does not match in_features"):
        tp(randn(24, 4, D + 1))


def tp_training_steps(rank, world):
    """Adam on the shards stays equal to Adam on the single-device model."""
    mlp = make_mlp(30, 7, activation="relu", weight_decay=0.01)
    tp = TensorParallelFusedMLP.from_fused(mlp)
    opt_ref = torch.optim.Adam(mlp.parameters(), lr=0.05)
    opt_tp = torch.optim.Adam(tp.parameters(), lr=0.05)
    for step in range(4):
        x, y = randn(31 + step, 8, D), torch.randint(0, Q, (8,), generator=torch.Generator().manual_seed(step))
        losses = []
        for model, opt in ((tp, opt_tp), (mlp, opt_ref)):
            opt.zero_grad()
            o, s = model(x, return_penalty=True)
            J = F.cross_entropy(o, y) + s
            J.backward()
            opt.step()
            losses.append(J.detach())
        assert_close(losses[0], losses[1], msg=lambda m: f"step {step}: J\n{m}")
    for (name, p), q in zip(tp.to_fused().named_parameters(), mlp.parameters()):
        assert_close(p, q, msg=lambda m: f"{name} after 4 Adam steps\n{m}")


def ddp_training_steps(rank, world):
    """DDP(FusedMLP), each rank on its slice of the batch with a mean loss plus s,
    trains like one process on the whole batch: DDP averages the gradients,
    (1/P) sum_r grad(L_r + s) = grad(L + s), since s is the same on every rank."""
    mlp = make_mlp(40, 7, activation="silu", weight_decay=0.05)
    ddp = DistributedDataParallel(copy.deepcopy(mlp))
    opt_ref = torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9)
    opt_ddp = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    per_rank = 3
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    for step in range(4):
        n = per_rank * world
        x = randn(41 + step, n, D)
        y = torch.randint(0, Q, (n,), generator=torch.Generator().manual_seed(step))

        opt_ddp.zero_grad()
        o, s = ddp(x[mine], return_penalty=True)
        J_rank = F.cross_entropy(o, y[mine]) + s
        J_rank.backward()

        opt_ref.zero_grad()
        o_ref, s_ref = mlp(x, return_penalty=True)
        J_ref = F.cross_entropy(o_ref, y) + s_ref
        J_ref.backward()

        J_mean = J_rank.detach().clone()
        dist.all_reduce(J_mean)
        assert_close(J_mean / world, J_ref.detach(), msg=lambda m: f"step {step}: mean of J over ranks\n{m}")
        assert_close(s, s_ref, msg=lambda m: f"step {step}: s\n{m}")
        for (name, p), q in zip(ddp.module.named_parameters(), mlp.parameters()):
            assert_close(p.grad, q.grad, msg=lambda m: f"step {step}: averaged dJ/d{name}\n{m}")
        opt_ddp.step()
        opt_ref.step()
    for (name, p), q in zip(ddp.module.named_parameters(), mlp.parameters()):
        assert_close(p, q, msg=lambda m: f"{name} after 4 SGD-momentum steps\n{m}")


def tradeoff_formulas_match_a_real_step(rank, world):
    """benchmarks/parallel_tradeoff.py's per-rank formulas (the largest rank)
    equal what a real step saves and communicates, uneven splits included."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "parallel_tradeoff.py"
    tradeoff = load_module("parallel_tradeoff", path)
    sizes = [("tiny", 12, 5, 7, 3), ("tiny, fewer hidden units than ranks", 10, 4, world - 1, 2)]
    measured = [None] * world
    dist.all_gather_object(measured, tradeoff._measure_rank(rank, world, sizes, "float64"))
    for i, (name, n, d, h, q) in enumerate(sizes):
        for j, mode in enumerate(("tensor parallel", "data parallel")):
            rows = [per_rank[2 * i + j] for per_rank in measured]
            assert {row["mode"] for row in rows} == {mode}
            want = vars(tradeoff.analytic(mode, n, d, h, q, world, itemsize=8))
            got = {key: max(row[key] for row in rows) for key in want}
            assert got == want, (name, mode, got, want)


SCENARIOS = [tp_matches_single_device, tp_double_backward, tp_shard_and_gather, tp_training_steps,
             ddp_training_steps, tradeoff_formulas_match_a_real_step]


# ---------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def ranks(request):
    """Per-rank scenario results of one gloo run with this world size."""
    return run_local(run_scenarios, request.param, (SCENARIOS,), timeout=120)


@pytest.mark.parametrize("scenario", [s.__name__ for s in SCENARIOS])
def test_distributed(ranks, scenario):
    check_scenario(ranks, scenario)


def test_shard_sizes_split_evenly_and_cover():
    for hidden in range(0, 12):
        for world in range(1, 6):
            sizes = shard_sizes(hidden, world)
            assert len(sizes) == world and sum(sizes) == hidden
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
            assert sizes == [len(part) for part in torch.arange(hidden).tensor_split(world)]
            stops = [shard_range(hidden, r, world) for r in range(world)]
            assert [lo for lo, _ in stops] == [0] + [hi for _, hi in stops[:-1]] and stops[-1][1] == hidden


def test_shard_errors():
    with pytest.raises(ValueError, match="world_size >= 1, got 0"):
        shard_sizes(4, 0)
    with pytest.raises(ValueError, match="rank < world_size = 2, got rank 2"):
        shard_range(4, 2, 2)


def test_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        TensorParallelFusedMLP.from_fused(make_mlp(0, 4))


def fail_on_rank_1(rank, world):
    dist.barrier()
    if rank == 1:
        raise ArithmeticError("rank 1 went wrong on purpose")
    return rank


def test_run_local_reports_a_failing_rank():
    with pytest.raises(RuntimeError, match=r"(?s)failed on rank 1 of 2 first:.*rank 1 went wrong on purpose"):
        run_local(fail_on_rank_1, 2, timeout=60)


def abort_on_rank_1(rank, world):
    dist.barrier()
    if rank == 1:
        os.abort()  # a native crash: no Python exception reaches run_local
    return rank


def test_run_local_reports_a_native_crash_with_its_stack():
    with pytest.raises(RuntimeError, match=r"(?s)abort_on_rank_1 on 2 processes: .*SIGABRT.*"
                                           r"rank 1:.*in abort_on_rank_1"):
        run_local(abort_on_rank_1, 2, timeout=60)
