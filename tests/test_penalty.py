"""The penalty s of the fused blocks a host model runs (mlp_ext.collect_penalty):
J = L + sum of s trained exactly, eager, under torch.compile(fullgraph=True), with
gradient accumulation, activation checkpointing and DDP (2 gloo ranks)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

import mlp_ext
from mlp_ext import FusedMLP
from mlp_ext.parallel import run_local

D, H, C = 5, 8, 3
LAMBDA = 0.3


class Host(nn.Module):
    """Calls its fused blocks itself and returns one tensor (as transformer layers do);
    block ``skip`` is not run, block 0 runs twice."""

    def __init__(self, weight_decay=LAMBDA):
        super().__init__()
        self.blocks = nn.ModuleList(
            FusedMLP(D, H, D, activation=a, weight_decay=weight_decay, dtype=torch.float64)
            for a in ("quick_gelu", "gelu_tanh", "silu"))
        self.head = nn.Linear(D, C, dtype=torch.float64)

    def forward(self, x, skip: int = 2):
        x = x + self.blocks[0](x)
        x = x + self.blocks[1](x)
        if skip != 2:
            x = x + self.blocks[2](x)
        x = x + self.blocks[0](x)
        return self.head(x)


def expected_objective(model, x, y, skip=2):
    """J = L + s by hand, with reference.fused_mlp and the blocks' weights."""
    def block(i, v):
        b = model.blocks[i]
        o, s = mlp_ext.reference.fused_mlp(v, b.fc1.weight, b.fc2.weight, b.fc1.bias, b.fc2.bias,
                                           activation=b.activation, weight_decay=LAMBDA)
        return o, s

    total = 0
    o, s = block(0, x); x = x + o; total = total + s
    o, s = block(1, x); x = x + o; total = total + s
    if skip != 2:
        o, s = block(2, x); x = x + o; total = total + s
    o, s = block(0, x); x = x + o; total = total + s
    return F.cross_entropy(model.head(x), y) + total, total


def grads(loss, model):
    """d loss / d parameters (None for block 2's, which the default forward skips)."""
    return torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)


def assert_same_grads(got, expected):
    for a, b in zip(got, expected):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def data(seed=0, n=6):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, D, dtype=torch.float64, generator=g),
            torch.randint(0, C, (n,), generator=g))


@pytest.mark.parametrize("skip", [2, 5])
def test_collected_penalty_is_the_sum_over_the_blocks_that_ran(skip):
    torch.manual_seed(0)
    model = Host()
    x, y = data()
    with mlp_ext.collect_penalty() as penalty:
        out = model(x, skip)
    assert len(penalty) == (3 if skip == 2 else 4)       # block 0 twice, block 2 only if run
    loss = F.cross_entropy(out, y) + penalty.total()
    expected, expected_s = expected_objective(model, x, y, skip)
    torch.testing.assert_close(penalty.total(), expected_s, rtol=1e-13, atol=0)
    torch.testing.assert_close(loss, expected, rtol=1e-13, atol=0)
    assert_same_grads(grads(loss, model), grads(expected, model))


def test_outside_a_collector_nothing_is_collected_and_the_output_is_the_same():
    torch.manual_seed(0)
    model = Host()
    x, _ = data()
    out, total = mlp_ext.forward_with_penalty(model, x)
    torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    with mlp_ext.collect_penalty() as outer:
        with mlp_ext.collect_penalty() as inner:
            model(x)
        model.blocks[1](x)
    assert len(inner) == 3 and len(outer) == 1                 # the innermost collects
    with mlp_ext.collect_penalty() as none:
        Host(weight_decay=0.0)(x)
    assert len(none) == 0 and float(none.total()) == 0.0
    assert total.item() > 0


def test_under_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = Host()
    x, y = data()
    expected, _ = expected_objective(model, x, y)
    expected_grads = grads(expected, model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")

    def step(model_fn):
        with mlp_ext.collect_penalty() as penalty:
            out = model_fn(x)
        return F.cross_entropy(out, y) + penalty.total()

    for _ in range(2):   # the second call runs the cached graph: its appends are replayed
        loss = step(compiled)
        torch.testing.assert_close(loss, expected, rtol=1e-13, atol=0)
        assert_same_grads(grads(loss, model), expected_grads)

    # The whole step, collector included, under fullgraph.
    torch._dynamo.reset()
    whole = torch.compile(lambda: step(model), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(whole(), expected, rtol=1e-13, atol=0)


def test_gradient_accumulation_gives_each_micro_batch_its_own_penalty():
    torch.manual_seed(0)
    model = Host()
    twin = copy.deepcopy(model)
    x, y = data(n=8)
    for xb, yb in zip(x.chunk(4), y.chunk(4)):
        with mlp_ext.collect_penalty() as penalty:
            out = model(xb)
        ((F.cross_entropy(out, yb) + penalty.total()) / 4).backward()
    total = sum(expected_objective(twin, xb, yb)[0] for xb, yb in zip(x.chunk(4), y.chunk(4))) / 4
    total.backward()
    assert_same_grads([p.grad for p in model.parameters()], [p.grad for p in twin.parameters()])


def test_with_activation_checkpointing():
    torch.manual_seed(0)
    model = Host()
    x, y = data()
    expected, _ = expected_objective(model, x, y)

    class Checkpointed(nn.Module):
        def forward(self, x):
            x = x + checkpoint(model.blocks[0], x, use_reentrant=False)
            x = x + checkpoint(model.blocks[1], x, use_reentrant=False)
            x = x + checkpoint(model.blocks[0], x, use_reentrant=False)
            return model.head(x)

    with mlp_ext.collect_penalty() as penalty:
        out = Checkpointed()(x)
    loss = F.cross_entropy(out, y) + penalty.total()
    torch.testing.assert_close(loss, expected, rtol=1e-13, atol=0)
    assert_same_grads(grads(loss, model), grads(expected, model))


def ddp_penalty_steps(rank, world):
    """Each rank trains the DDP model on its half of the batch with J = L + s; the
    result must equal one process training on the whole batch with the mean loss."""
    torch.manual_seed(0)
    model = Host()
    single = copy.deepcopy(model)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    single_opt = torch.optim.SGD(single.parameters(), lr=0.1)
    for step in range(3):
        x, y = data(seed=step, n=4 * world)
        with mlp_ext.collect_penalty() as penalty:
            out = ddp(x.chunk(world)[rank], 5)   # every block runs (DDP wants every parameter used)
        opt.zero_grad()
        (F.cross_entropy(out, y.chunk(world)[rank]) + penalty.total()).backward()
        opt.step()
        single_opt.zero_grad()
        expected_objective(single, x, y, 5)[0].backward()
        single_opt.step()
    for a, b in zip(model.parameters(), single.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    return True


def test_ddp_two_ranks():
    assert run_local(ddp_penalty_steps, 2, timeout=120) == [True, True]
