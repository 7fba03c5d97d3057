"""Hidden-layer dropout (fused_mlp(..., dropout=p), FusedMLP(dropout=p)): exact
gradients given the mask (gradcheck / gradgradcheck with a fixed seed, both
references), the keep rate, reproducibility under torch.manual_seed, eval mode,
p = 0 (today's path: nothing drawn, nothing saved) and p = 1, save_hidden=False,
the loss op, the module against nn.Sequential(..., nn.Dropout, ...), the schema
(opcheck, torch.compile)."""
import math

import pytest
import torch
import torch.nn.functional as F

import mlp_ext
from mlp_ext import reference

from conftest import make_inputs
from helpers import SavedTensors

OPS = torch.ops.mlp_ext
SEED = 1234
P = 0.4


def _seeded(fn, seed, device):
    """fn(*args) with the generators of `device` seeded with `seed` first, and the
    global random state left as it was (gradcheck calls fn many times: each call
    draws the same mask)."""
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []

    def call(*args, **kwargs):
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return fn(*args, **kwargs)
    return call


def _mask(inputs, activation="relu", weight_decay=0.0, p=P, seed=SEED):
    """The mask fused_mlp draws for these inputs right after torch.manual_seed(seed)."""
    x, w1, w2, b1, b2 = [t if t is None else t.detach() for t in inputs]
    forward = _seeded(OPS.fused_mlp_forward, seed, x.device)
    return forward(x, w1, w2, b1, b2, activation, weight_decay, p)[4]


# ---------------------------------------------------------------------------
# Gradients given the mask


@pytest.mark.parametrize("save_hidden", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_and_gradgradcheck_with_a_fixed_seed(device, activation, bias, weight_decay,
                                                       save_hidden):
    inputs = make_inputs(n=5, d=4, h=7, q=3, bias=bias, device=device)
    mask = _mask(inputs, activation, weight_decay)
    assert 0 < mask.sum() < mask.numel()  # some units kept, some dropped

    def fn(*args):
        return mlp_ext.fused_mlp(*args, activation=activation, weight_decay=weight_decay,
                                 save_hidden=save_hidden, dropout=P)

    fn = _seeded(fn, SEED, device)
    args = [t for t in inputs]
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("save_hidden", [True, False])
@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_equal_both_references_given_the_mask(device, activation, bias, weight_decay,
                                                         save_hidden):
    """o, s and every gradient equal autograd on reference.fused_mlp and the hand-applied
    equations of reference.fused_mlp_backward, both given the op's mask."""
    inputs = make_inputs(n=9, d=5, h=11, q=4, bias=bias, device=device)
    params = [t for t in inputs if t is not None]
    grad_o = torch.randn(9, 4, dtype=torch.float64, device=device)
    grad_s = torch.randn((), dtype=torch.float64, device=device)
    mask = _mask(inputs, activation, weight_decay)
    o, s = _seeded(mlp_ext.fused_mlp, SEED, device)(
        *inputs, activation=activation, weight_decay=weight_decay, save_hidden=save_hidden,
        dropout=P)
    ours = torch.autograd.grad((o, s), params, (grad_o, grad_s))

    o_ref, s_ref = reference.fused_mlp(*inputs, activation=activation, weight_decay=weight_decay,
                                       dropout=P, dropout_mask=mask)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)
    autograd_ref = torch.autograd.grad((o_ref, s_ref), params, (grad_o, grad_s))
    by_hand = reference.fused_mlp_backward(
        grad_o, *inputs[:4], activation=activation, weight_decay=weight_decay, grad_s=grad_s,
        dropout=P, dropout_mask=mask)
    by_hand = [g for g, t in zip(by_hand, inputs) if t is not None]
    for mine, ref, hand in zip(ours, autograd_ref, by_hand):
        torch.testing.assert_close(mine, ref)
        torch.testing.assert_close(mine, hand)


def test_cpu_mask_is_torchs_bernoulli_and_nn_dropouts():
    """On CPU the mask is bernoulli_(1 - p) from the CPU generator: the reference
    regenerates it from the seed alone, and it is the mask F.dropout draws for a
    tensor of that shape."""
    inputs = make_inputs(n=13, d=5, h=17, q=4)
    mask = _mask(inputs)
    torch.manual_seed(SEED)
    assert torch.equal(mask, torch.empty(13, 17, dtype=torch.bool).bernoulli_(1 - P))
    torch.manual_seed(SEED)
    assert torch.equal(mask, F.dropout(torch.ones(13, 17, dtype=torch.float64), P) != 0)
    o = _seeded(mlp_ext.fused_mlp, SEED, "cpu")(*inputs, dropout=P)[0]
    o_ref = _seeded(reference.fused_mlp, SEED, "cpu")(*inputs, dropout=P)[0]  # mask regenerated
    torch.testing.assert_close(o, o_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saved_h_is_phi_z_times_d_exactly(device, dtype):
    """The forward's h is phi(z) * mask / (1 - p), bit for bit (z and the undropped h
    from the same inputs without dropout)."""
    x, w1, w2, b1, b2 = make_inputs(n=33, d=7, h=29, q=5, dtype=dtype, device=device,
                                    requires_grad=False)
    _, _, z0, h0, empty = OPS.fused_mlp_forward(x, w1, w2, b1, b2, "gelu", 0.0)
    assert empty.numel() == 0 and empty.dtype == torch.bool
    o, _, z, h, mask = OPS.fused_mlp_forward(x, w1, w2, b1, b2, "gelu", 0.0, P)
    assert mask.shape == (33, 29) and mask.dtype == torch.bool
    assert torch.equal(z, z0)
    expected = h0 * torch.where(mask, torch.tensor(1 / (1 - P), dtype=dtype, device=device), 0)
    assert torch.equal(h, expected)
    torch.testing.assert_close(o, h @ w2.T + b2)


# ---------------------------------------------------------------------------
# The mask: keep rate, reproducibility, eval mode


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate(device, p):
    """The number of kept units of 2**20 is Binomial(2**20, 1 - p): outside 5.5
    standard deviations with probability < 4e-8. Each row's and each column's
    share too (a mask that repeated per row or column would still pass the total)."""
    n, h = 1024, 1024
    x = torch.randn(n, 3, device=device)
    w1, w2 = torch.randn(h, 3, device=device), torch.randn(2, h, device=device)
    mask = OPS.fused_mlp_forward(x, w1, w2, None, None, "relu", 0.0, p)[4]
    kept = mask.sum().item()
    sd = math.sqrt(n * h * p * (1 - p))
    assert abs(kept - n * h * (1 - p)) <= 5.5 * sd, (kept, n * h * (1 - p), sd)
    # Rows and columns: 1024 each of Binomial(1024, 1 - p); 6.5 sd per one of 2048
    # sums fails with probability < 1e-7.
    sd_line = math.sqrt(h * p * (1 - p))
    for sums in (mask.sum(0), mask.sum(1)):
        assert (sums.double() - h * (1 - p)).abs().max().item() <= 6.5 * sd_line
    # Neighbours independent: P(both kept) = (1 - p)^2 for horizontal pairs.
    both = (mask[:, 1:] & mask[:, :-1]).sum().item()
    pairs = n * (h - 1)
    q2 = (1 - p) ** 2
    assert abs(both - pairs * q2) <= 5.5 * math.sqrt(pairs * q2 * (1 - q2)) * 2


def test_reproducible_under_manual_seed(device):
    inputs = make_inputs(n=6, d=4, h=9, q=3, device=device)
    params = [t for t in inputs if t is not None]
    results = []
    for _ in range(2):
        torch.manual_seed(7)
        o, s = mlp_ext.fused_mlp(*inputs, dropout=0.5)
        results.append((o, torch.autograd.grad(o.sum(), params)))
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))
    # The generator advances: the next call draws another mask; another seed another one.
    torch.manual_seed(7)
    first = _mask(inputs, p=0.5, seed=7)
    assert not torch.equal(first, _mask(inputs, p=0.5, seed=8))
    torch.manual_seed(7)
    a = OPS.fused_mlp_forward(*[t.detach() for t in inputs], "relu", 0.0, 0.5)[4]
    b = OPS.fused_mlp_forward(*[t.detach() for t in inputs], "relu", 0.0, 0.5)[4]
    assert torch.equal(a, first) and not torch.equal(a, b)


def _rng_state(device):
    return torch.cuda.get_rng_state() if torch.device(device).type == "cuda" \
        else torch.get_rng_state()


def test_eval_mode_and_training_false_draw_nothing(device):
    mlp = mlp_ext.FusedMLP(4, 16, 3, dropout=0.5, device=device, dtype=torch.float64)
    x = torch.randn(8, 4, device=device, dtype=torch.float64)
    undropped = mlp_ext.fused_mlp(x, mlp.fc1.weight, mlp.fc2.weight, mlp.fc1.bias, mlp.fc2.bias)[0]
    mlp.eval()
    state = _rng_state(device)
    assert torch.equal(mlp(x), undropped)
    assert torch.equal(mlp_ext.fused_mlp(x, mlp.fc1.weight, mlp.fc2.weight, mlp.fc1.bias,
                                         mlp.fc2.bias, dropout=0.5, training=False)[0], undropped)
    assert torch.equal(_rng_state(device), state)
    mlp.train()
    assert not torch.equal(mlp(x), undropped)
    assert not torch.equal(_rng_state(device), state)


def test_dropout_under_no_grad_in_training_mode(device):
    """Without autograd (the inference op) dropout still applies, as F.dropout's does."""
    inputs = make_inputs(n=6, d=4, h=9, q=3, device=device, requires_grad=False)
    mask = _mask(inputs)
    with torch.no_grad():
        o = _seeded(mlp_ext.fused_mlp, SEED, device)(*inputs, dropout=P)[0]
    torch.testing.assert_close(o, reference.fused_mlp(*inputs, dropout=P, dropout_mask=mask)[0])


# ---------------------------------------------------------------------------
# p = 0 and p = 1


def test_p0_is_todays_path(device):
    """dropout=0: the same bits as without the argument, no draw, no mask saved."""
    inputs = make_inputs(n=6, d=4, h=9, q=3, device=device)
    params = [t for t in inputs if t is not None]
    o, s = mlp_ext.fused_mlp(*inputs, weight_decay=0.1)
    grads = torch.autograd.grad((o.sum() + s), params)
    state = _rng_state(device)
    with SavedTensors() as saved:
        o0, s0 = mlp_ext.fused_mlp(*inputs, weight_decay=0.1, dropout=0.0)
    assert torch.equal(_rng_state(device), state)
    assert all(t.dtype != torch.bool for t in saved.tensors)
    assert len(saved.tensors) == len(mlp_ext.memory.saved_for_backward())
    assert torch.equal(o, o0) and torch.equal(s, s0)
    for a, b in zip(grads, torch.autograd.grad((o0.sum() + s0), params)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("save_hidden", [True, False])
def test_p1_drops_everything(device, save_hidden):
    """dropout=1: o = b2, no gradient through the hidden layer (only the decay's), no
    NaN from 1 / (1 - p), and the generator untouched (as nn.Dropout(1.0))."""
    inputs = make_inputs(n=6, d=4, h=9, q=3, device=device)
    x, w1, w2, b1, b2 = inputs
    state = _rng_state(device)
    o, s = mlp_ext.fused_mlp(*inputs, weight_decay=0.2, dropout=1.0, save_hidden=save_hidden)
    assert torch.equal(_rng_state(device), state)
    assert torch.equal(o, b2.expand(6, 3))
    grad_o = torch.randn(6, 3, dtype=torch.float64, device=device)
    dx, dw1, dw2, db1, db2 = torch.autograd.grad((o, s), inputs, (grad_o, torch.ones_like(s)))
    assert torch.equal(dx, torch.zeros_like(x)) and torch.equal(db1, torch.zeros_like(b1))
    torch.testing.assert_close(dw1, 0.2 * w1)
    torch.testing.assert_close(dw2, 0.2 * w2)
    torch.testing.assert_close(db2, grad_o.sum(0))
    fn = _seeded(lambda *a: mlp_ext.fused_mlp(*a, weight_decay=0.2, dropout=1.0), SEED, device)
    assert torch.autograd.gradcheck(fn, inputs) and torch.autograd.gradgradcheck(fn, inputs)


# ---------------------------------------------------------------------------
# save_hidden=False, the module, the loss op


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_save_hidden_false_gives_bitwise_identical_gradients(device, dtype, activation):
    inputs = make_inputs(n=12, d=13, h=37, q=5, dtype=dtype, device=device)
    params = [t for t in inputs if t is not None]
    grad_o = torch.randn(12, 5, dtype=dtype, device=device)
    results = []
    for save_hidden in (True, False):
        o, s = _seeded(mlp_ext.fused_mlp, SEED, device)(
            *inputs, activation=activation, weight_decay=0.1, save_hidden=save_hidden, dropout=P)
        results.append((o, torch.autograd.grad((o * grad_o).sum() + 0.7 * s, params)))
    (o1, g1), (o2, g2) = results
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_module_against_sequential_with_nn_dropout():
    """On CPU the module draws nn.Dropout's mask: FusedMLP(dropout=p) and
    Sequential(Linear, act, Dropout(p), Linear) give the same output and gradients for
    the same seed; from_sequential / to_sequential carry the Dropout."""
    torch.manual_seed(0)
    seq = torch.nn.Sequential(torch.nn.Linear(6, 20), torch.nn.GELU(), torch.nn.Dropout(0.3),
                              torch.nn.Linear(20, 4)).double()
    fused = mlp_ext.FusedMLP.from_sequential(seq)
    assert fused.dropout == 0.3 and "dropout=0.3" in repr(fused)
    back = fused.to_sequential()
    assert isinstance(back[2], torch.nn.Dropout) and back[2].p == 0.3
    x = torch.randn(10, 6, dtype=torch.float64)
    outputs, grads = [], []
    for model in (seq, fused):
        torch.manual_seed(3)
        o = model(x)
        outputs.append(o)
        grads.append(torch.autograd.grad(o.square().sum(), list(seq.parameters())))
    torch.testing.assert_close(outputs[0], outputs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    assert mlp_ext.FusedMLP(3, 4, 2).dropout == 0.0


def test_loss_op_with_dropout(device):
    """fused_mlp_loss(dropout=p) is fused_mlp(dropout=p) + cross-entropy for the same
    seed (same mask); gradcheck and gradgradcheck with a fixed seed."""
    inputs = make_inputs(n=7, d=4, h=8, q=3, device=device)
    target = torch.randint(0, 3, (7,), device=device)
    params = [t for t in inputs if t is not None]
    J = _seeded(mlp_ext.fused_mlp_loss, SEED, device)(*inputs[:1], target, *inputs[1:],
                                                       weight_decay=0.1, dropout=P)
    o, s = _seeded(mlp_ext.fused_mlp, SEED, device)(*inputs, weight_decay=0.1, dropout=P)
    J_ref = F.cross_entropy(o, target) + s
    torch.testing.assert_close(J, J_ref)
    for a, b in zip(torch.autograd.grad(J, params), torch.autograd.grad(J_ref, params)):
        torch.testing.assert_close(a, b)

    def fn(x, w1, w2, b1, b2):
        return mlp_ext.fused_mlp_loss(x, target, w1, w2, b1, b2, weight_decay=0.1, dropout=P,
                                      activation="tanh")

    fn = _seeded(fn, SEED, device)
    assert torch.autograd.gradcheck(fn, inputs) and torch.autograd.gradgradcheck(fn, inputs)


def test_memory_footprint_counts_the_mask():
    n, d, h, q = 64, 16, 256, 8
    mlp = mlp_ext.FusedMLP(d, h, q, dropout=0.5)
    x = torch.randn(n, d)
    with SavedTensors() as saved:
        mlp(x)
    owned = saved.owned_bytes(x, *mlp.parameters())
    assert owned == 2 * n * h * 4 + n * h  # z, h (float32) and the bool mask
    fp = mlp_ext.memory_footprint(n, d, h, q, dropout=0.5)
    assert fp.saved_activations == owned
    names = [t.name for t in mlp_ext.memory.saved_for_backward(dropout=True)]
    assert names[-1] == "mask"


# ---------------------------------------------------------------------------
# The schema: opcheck, torch.compile


def test_opcheck_with_dropout():
    """opcheck with dropout = 1 (a mask output, deterministic: all dropped) and the
    backward op given a mask."""
    x, w1, w2, b1, b2 = make_inputs(n=5, d=4, h=6, q=3, requires_grad=False)
    opcheck = torch.library.opcheck
    opcheck(OPS.fused_mlp_forward.default, (x, w1, w2, b1, b2, "silu", 0.1, 1.0))
    opcheck(OPS.fused_mlp_inference.default, (x, w1, w2, b1, b2, "silu", 0.1, 1.0))
    _, _, z, h, mask = OPS.fused_mlp_forward(x, w1, w2, b1, b2, "silu", 0.1, P)
    grad_o = torch.randn(5, 3, dtype=torch.float64)
    for h_arg in (h, None):
        opcheck(OPS.fused_mlp_backward.default,
                (grad_o, torch.tensor(1.0, dtype=torch.float64), x, w1, w2, z, h_arg, "silu", 0.1,
                 [True] * 5, mask, P))
    target = torch.randint(0, 3, (5,))
    opcheck(OPS.fused_mlp_loss_forward.default,
            (x, target, w1, w2, b1, b2, "silu", 0.1, "cross_entropy", "mean", True, 1.0))


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_compile_fullgraph_matches_eager(backend):
    """torch.compile(fullgraph=True) of a training step with dropout: the same mask
    (same seed) and the same gradients as eager."""
    mlp = mlp_ext.FusedMLP(6, 16, 3, dropout=P, dtype=torch.float64)
    x = torch.randn(9, 6, dtype=torch.float64)

    def step(x):
        o, s = mlp(x, return_penalty=True)
        return o.square().sum() + s

    results = []
    torch._dynamo.reset()
    for fn in (step, torch.compile(step, fullgraph=True, backend=backend)):
        torch.manual_seed(5)
        loss = fn(x)
        results.append((loss, torch.autograd.grad(loss, list(mlp.parameters()))))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------
# CUDA: the mask is Philox4x32-10 as torch draws it (philox.cuh)

_M32 = 0xFFFFFFFF


def _philox4x32_10(counter, key):
    c, (k0, k1) = list(counter), key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & _M32, p1 & _M32, ((p0 >> 32) ^ c[3] ^ k1) & _M32,
             p0 & _M32]
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    return c


def test_python_philox_known_answers():
    """The test's own Philox (used for the CUDA mask below) on Random123's vectors."""
    assert _philox4x32_10([0, 0, 0, 0], (0, 0)) == [0x6627e8d5, 0xe169c58d, 0xbc57ac4c,
                                                    0x9b00dbd8]
    assert _philox4x32_10([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                          (0xa4093822, 0x299f31d0)) == [0xd16cfe09, 0x94fdcceb, 0x5001e420,
                                                        0x24126ea1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_mask_is_philox_from_the_cuda_generator():
    """Element i is kept when curand's uniform of word i % 4 of the Philox block
    (counter = (offset / 4, i / 4), key = seed) is below 1 - p; a second draw takes
    the generator's next offset (+4)."""
    import numpy as np

    n, h = 7, 9
    x = torch.randn(n, 3, device="cuda")
    w1, w2 = torch.randn(h, 3, device="cuda"), torch.randn(2, h, device="cuda")
    seed = 987654321
    torch.cuda.manual_seed(seed)
    masks = [OPS.fused_mlp_forward(x, w1, w2, None, None, "relu", 0.0, P)[4].cpu().flatten()
             for _ in range(2)]
    inv = np.float32(2.3283064e-10)
    for draw, mask in enumerate(masks):
        for i in range(n * h):
            g, v = divmod(i, 4)
            word = _philox4x32_10([draw, 0, g & _M32, g >> 32], (seed & _M32, seed >> 32))[v]
            u = np.float32(np.float32(word) * inv + inv / np.float32(2))
            if abs(float(u) - (1 - P)) > 1e-6:  # (an FMA may round the last bit otherwise)
                assert bool(mask[i]) == (u < np.float32(1 - P)), (draw, i)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("save_hidden", [True, False])
def test_cuda_half_types_against_the_float64_reference_given_the_mask(dtype, save_hidden):
    """Float16 / bfloat16 / float32 on CUDA: o and every gradient near the float64
    reference given the op's mask; save_hidden=False bitwise the same as True."""
    inputs = make_inputs(n=64, d=32, h=48, q=16, dtype=dtype, device="cuda")
    params = [t for t in inputs if t is not None]
    mask = _mask(inputs)
    grad_o = torch.randn(64, 16, device="cuda").to(dtype)
    results = []
    for sh in (True, False):
        o, _ = _seeded(mlp_ext.fused_mlp, SEED, "cuda")(*inputs, dropout=P, save_hidden=sh)
        results.append((o, torch.autograd.grad(o, params, grad_o)))
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    wide = [t.detach().double().requires_grad_() for t in inputs]
    o_ref, _ = reference.fused_mlp(*wide, dropout=P, dropout_mask=mask)
    refs = torch.autograd.grad(o_ref, wide, grad_o.double())
    tol = {torch.float16: 2e-2, torch.bfloat16: 8e-2, torch.float32: 1e-4}[dtype]
    o, grads = results[0] if save_hidden else results[1]
    for mine, ref in zip((o, *grads), (o_ref, *refs)):
        err = (mine.double() - ref).norm() / ref.norm().clamp_min(1e-12)
        assert err <= tol, (dtype, err)
