"""mlp_ext.fuse on structural replicas of the MLP blocks of well-known libraries
(transformers' CLIPMLP / SiglipMLP: fc1, activation_fn, fc2; timm's Mlp: fc1, act,
drop1, norm, fc2, drop2; OPT's decoder layer, whose fc1 / fc2 sit in the layer
itself), and on blocks it must refuse. tests/test_fuse_libraries.py runs the real
libraries' models."""
import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import mlp_ext
from mlp_ext import FusedMLP


class QuickGELUActivation(nn.Module):   # as transformers writes it
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class NewGELUActivation(nn.Module):     # transformers' gelu_new
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class CLIPMLP(nn.Module):
    def __init__(self, d, h, act):
        super().__init__()
        self.activation_fn = act
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)

    def forward(self, hidden_states):
        hidden_states = self.fc1(hidden_states)
        hidden_states = self.activation_fn(hidden_states)
        return self.fc2(hidden_states)


class TimmMlp(nn.Module):
    def __init__(self, d, h, act_layer=nn.GELU, drop=0.0, norm_layer=None, bias=True):
        super().__init__()
        drop1, drop2 = drop if isinstance(drop, tuple) else (drop, drop)   # timm's to_2tuple
        self.fc1 = nn.Linear(d, h, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop1)
        self.norm = norm_layer(h) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(h, d, bias=bias)
        self.drop2 = nn.Dropout(drop2)

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        return self.drop2(x)


class Layer(nn.Module):
    """A pre-norm transformer-like layer around an MLP block."""

    def __init__(self, d, mlp):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.Linear(d, d)
        self.mlp = mlp

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.mlp(self.norm(x))


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):
        return self.out_proj(x)


class OPTLikeLayer(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.self_attn = Attention(d)
        self.final_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)
        self.activation_fn = nn.ReLU()

    def forward(self, x):
        x = x + self.self_attn(x)
        return x + self.fc2(self.activation_fn(self.fc1(self.final_layer_norm(x))))


class Residual(CLIPMLP):
    def forward(self, x):
        return self.fc2(self.activation_fn(self.fc1(x))) + x


class IgnoresItsActivation(CLIPMLP):
    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Swapped(CLIPMLP):   # square: fc2 then fc1 would chain too; the probe tells
    def forward(self, x):
        return self.fc1(self.activation_fn(self.fc2(x)))


D, H = 6, 10


def build_model():
    torch.manual_seed(0)
    return nn.Sequential(
        Layer(D, CLIPMLP(D, H, QuickGELUActivation())),
        Layer(D, TimmMlp(D, H)),
        Layer(D, TimmMlp(D, H, act_layer=NewGELUActivation, bias=False)),
        Layer(D, nn.Sequential(nn.Linear(D, H), nn.SiLU(), nn.Linear(H, D))),
        Layer(D, Residual(D, H, nn.GELU())),
        Layer(D, IgnoresItsActivation(D, H, nn.GELU())),
        Layer(D, TimmMlp(D, H, drop=0.1)),
        Layer(D, TimmMlp(D, H, norm_layer=nn.LayerNorm)),
        Layer(D, CLIPMLP(D, H, nn.PReLU())),
        OPTLikeLayer(D, H),
        nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, D)),
    ).double()


def test_fuse_replaces_what_it_can_prove_and_reports_the_rest():
    model = build_model()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    rng = torch.get_rng_state()
    report = mlp_ext.fuse(model)
    assert torch.equal(torch.get_rng_state(), rng)          # no random numbers consumed
    replaced = {r.name: r for r in report.replaced}
    assert set(replaced) == {"0.mlp", "1.mlp", "2.mlp", "3.mlp"}
    assert replaced["0.mlp"].activation == "quick_gelu" and replaced["0.mlp"].block == "CLIPMLP"
    assert replaced["1.mlp"].activation == "gelu"
    assert replaced["2.mlp"].activation == "gelu_tanh"
    assert replaced["3.mlp"].activation == "silu" and replaced["3.mlp"].linears == ("0", "2")
    skipped = {s.name: s.reason for s in report.skipped}
    assert "differs from fc2(gelu(fc1(x)))" in skipped["4.mlp"]          # the residual
    assert "differs from fc2(gelu(fc1(x)))" in skipped["5.mlp"]          # ignores self.act
    assert "has 2 dropouts with p > 0 (drop1, drop2)" in skipped["6.mlp"]
    assert "holds other modules with parameters or buffers (norm)" in skipped["7.mlp"]
    assert "holds other modules with parameters or buffers (activation_fn)" in skipped["8.mlp"]
    assert "self_attn" in skipped["9"] and "final_layer_norm" in skipped["9"]
    assert "renumber the state_dict keys" in skipped["10"]
    text = str(report)
    assert "4 block(s) replaced" in text and "skipped  9 (OPTLikeLayer)" in text
    for i in range(4):
        assert isinstance(model[i].mlp, FusedMLP)
    # The state is the same objects under the same keys.
    assert {k: v for k, v in model.state_dict().items()}.keys() == keys.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, keys[k])
    new_params = dict(model.named_parameters())
    assert new_params.keys() == params.keys()
    assert all(new_params[k] is params[k] for k in params)


@pytest.mark.parametrize("training", [True, False])
def test_fused_model_matches_the_original_in_float64(training):
    model = build_model()
    reference_model = copy.deepcopy(model)
    mlp_ext.fuse(model)
    model.train(training)
    reference_model.train(training)
    x = torch.randn(3, 4, D, dtype=torch.float64)
    # Dropout(0.1) in layer 6 is left as it was: same RNG state on both sides.
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(1)
    expected = reference_model(x)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(model.parameters()), g)
    expected_grads = torch.autograd.grad(expected, list(reference_model.parameters()), g)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_an_existing_optimizer_keeps_training_the_same_parameters():
    model = build_model()
    twin = copy.deepcopy(model)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (model, twin)]
    x = torch.randn(5, D, dtype=torch.float64)
    for step in range(3):
        if step == 1:
            mlp_ext.fuse(model)   # mid-training, the optimizer made before
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            torch.manual_seed(step)   # the same masks for the Dropout(0.1) left in layer 6
            m(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_state_dict_round_trip_with_an_unfused_model():
    fused = build_model()
    mlp_ext.fuse(fused)
    with torch.no_grad():
        for p in fused.parameters():
            p.add_(0.5)
    plain = build_model()
    plain.load_state_dict(fused.state_dict())              # saved fused, loaded unfused
    again = build_model()
    mlp_ext.fuse(again)
    again.load_state_dict(plain.state_dict())              # and back
    x = torch.randn(2, D, dtype=torch.float64)
    for m in (fused, plain, again):
        m.eval()   # the Dropout(0.1) left in layer 6
    torch.testing.assert_close(again(x), plain(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-12, atol=1e-12)


def test_a_block_shared_by_two_parents_is_fused_once():
    block = CLIPMLP(D, H, nn.GELU())
    model = nn.ModuleDict({"a": Layer(D, block), "b": Layer(D, block)}).double()
    report = mlp_ext.fuse(model)
    assert model["a"].mlp is model["b"].mlp and isinstance(model["a"].mlp, FusedMLP)
    assert [r.name for r in report.replaced] == ["a.mlp"]


def test_the_root_and_hooked_blocks_are_left_alone():
    block = CLIPMLP(D, H, nn.GELU())
    report = mlp_ext.fuse(block)
    assert report.replaced == [] and "root module" in report.skipped[0].reason
    fused = mlp_ext.fused_block(block)
    assert fused.fc1 is block.fc1 and fused.activation == "gelu"
    hooked = Layer(D, CLIPMLP(D, H, nn.GELU()))
    hooked.mlp.fc1.register_forward_hook(lambda *a: None)
    report = mlp_ext.fuse(hooked)
    assert "hooks" in report.skipped[0].reason and not isinstance(hooked.mlp, FusedMLP)
    with pytest.raises(mlp_ext.NotFusable, match="hooks"):
        mlp_ext.fused_block(hooked.mlp)


def test_the_probe_uses_random_weights_not_the_real_ones():
    """A zero fc2 would make any hidden function look right on the real weights."""
    block = IgnoresItsActivation(D, H, nn.GELU())
    nn.init.zeros_(block.fc2.weight)
    with pytest.raises(mlp_ext.NotFusable, match="differs"):
        mlp_ext.fused_block(block)
    swapped = Swapped(D, D, nn.GELU())
    with pytest.raises(mlp_ext.NotFusable, match="differs"):
        mlp_ext.fused_block(swapped)


def test_fused_model_under_compile_and_checkpointing():
    model = build_model()
    mlp_ext.fuse(model, weight_decay=0.01)
    model.eval()   # the Dropout(0.1) layer left alone: deterministic for the comparison
    x = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    expected = model(x)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected, rtol=1e-12, atol=1e-12)

    def run(block, x):
        return checkpoint(block, x, use_reentrant=False)

    out = x
    for layer in model:
        out = run(layer, out)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *model.parameters()], g)
    expected_grads = torch.autograd.grad(expected, [x, *model.parameters()], g)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


class TimmAttention(nn.Module):
    """timm's Attention: two Linears (qkv: d -> 3d, proj: d -> d) and no-op children;
    proj then qkv chains by shape, so only the probe can refuse it."""

    def __init__(self, d, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(d, d)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, d)))


class TimmBlock(nn.Module):
    """timm's VisionTransformer block with its mlp_layer= argument."""

    def __init__(self, d, h, mlp_layer=TimmMlp):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), TimmAttention(d)
        self.norm2, self.mlp = nn.LayerNorm(d), mlp_layer(d, h)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def test_a_vit_replica_gets_its_mlps_fused_and_its_attention_reported():
    torch.manual_seed(0)
    vit = nn.Sequential(*[TimmBlock(D, H) for _ in range(2)], nn.LayerNorm(D)).double()
    original = copy.deepcopy(vit)
    report = mlp_ext.fuse(vit)
    assert [r.name for r in report.replaced] == ["0.mlp", "1.mlp"]
    assert {s.name for s in report.skipped} == {"0.attn", "1.attn"}
    assert all("does not return one tensor of shape" in s.reason or "differs" in s.reason
               for s in report.skipped)
    x = torch.randn(2, 4, D, dtype=torch.float64)
    torch.testing.assert_close(vit(x), original(x), rtol=1e-12, atol=1e-12)


def test_fuse_checks_its_options_before_changing_anything():
    model = build_model()
    for bad, exc in [(-1.0, ValueError), (float("nan"), ValueError), ("0.1", TypeError)]:
        with pytest.raises(exc, match="fuse: expected weight_decay"):
            mlp_ext.fuse(model, weight_decay=bad)
    with pytest.raises(TypeError, match="fuse: expected model to be an nn.Module"):
        mlp_ext.fuse(lambda x: x)
    assert not any(isinstance(m, FusedMLP) for m in model.modules())


def test_float32_and_cpu_half_types_are_fused():
    model = build_model().float().eval()
    original = copy.deepcopy(model)
    assert len(mlp_ext.fuse(model).replaced) == 4
    x = torch.randn(3, D)
    torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-5)   # float32 rounding
    half = build_model().to(torch.bfloat16).eval()
    original = copy.deepcopy(half)
    assert len(mlp_ext.fuse(half).replaced) == 4
    x = torch.randn(3, D).bfloat16()
    # bfloat16 rounding (2^-8 relative) of the same products, summed in another order.
    torch.testing.assert_close(half(x), original(x), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------------------
# Blocks with a hidden-layer dropout: nn.Dropout(p) between the activation and the
# second Linear becomes FusedMLP(dropout=p).

P = 0.3


class DropoutLayer(Layer):
    """Layer with a dropout of its own after the block: a replacement that drew a
    different number of random numbers would shift this mask too."""

    def __init__(self, d, mlp):
        super().__init__(d, mlp)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        x = x + self.attn(self.norm(x))
        return x + self.drop(self.mlp(self.norm(x)))


def _seeded(model, x, seed):
    torch.manual_seed(seed)
    return model(x)


def _assert_same_training_step(model, reference_model, x, seed):
    """The same output and gradients (input and parameters) under torch.manual_seed(seed)."""
    x = x.detach().requires_grad_()
    out = _seeded(model, x, seed)
    expected = _seeded(reference_model, x, seed)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, *model.parameters()], g)
    expected_grads = torch.autograd.grad(expected, [x, *reference_model.parameters()], g)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", mlp_ext.ACTIVATIONS)
def test_a_sequential_with_dropout_is_fused_with_its_p(activation, bias):
    torch.manual_seed(0)
    act = [] if activation == "identity" else [mlp_ext.activations.activation_module(activation)]
    block = nn.Sequential(nn.Linear(D, H, bias=bias), *act, nn.Dropout(P), nn.Linear(H, D, bias=bias))
    model = nn.Sequential(DropoutLayer(D, block), nn.Linear(D, D)).double()
    original = copy.deepcopy(model)
    keys = model.state_dict().keys()
    params = dict(model.named_parameters())
    report = mlp_ext.fuse(model)

    fc2 = str(len(act) + 2)
    assert [(r.name, r.linears, r.activation, r.dropout) for r in report.replaced] == [
        ("0.mlp", ("0", fc2), activation, P)]
    assert f"0 -> {activation} -> dropout(p={P}) -> {fc2}" in str(report)
    fused = model[0].mlp
    assert isinstance(fused, FusedMLP) and fused.dropout == P and fused.training
    assert model.state_dict().keys() == keys
    assert all(p is params[k] for k, p in model.named_parameters())

    x = torch.randn(4, 5, D, dtype=torch.float64)
    for seed in (1, 2):   # train mode: the same masks under the same seed
        _assert_same_training_step(model, original, x, seed)
    hidden = torch.randn(4, D, dtype=torch.float64)
    assert not torch.equal(_seeded(fused, hidden, 1), _seeded(fused, hidden, 2))   # dropout on
    model.eval()
    original.eval()
    _assert_same_training_step(model, original, x, 1)
    torch.testing.assert_close(_seeded(fused, hidden, 2), _seeded(fused, hidden, 1), rtol=0, atol=0)
    model.train()
    original.train()
    _assert_same_training_step(model, original, x, 3)


def test_a_block_fused_in_eval_mode_drops_when_the_model_trains_again():
    torch.manual_seed(0)
    model = nn.Sequential(
        DropoutLayer(D, nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Dropout(P), nn.Linear(H, D)))
    ).double().eval()
    original = copy.deepcopy(model)
    assert len(mlp_ext.fuse(model).replaced) == 1
    assert not model[0].mlp.training
    x = torch.randn(3, D, dtype=torch.float64)
    torch.testing.assert_close(model(x), original(x), rtol=1e-12, atol=1e-12)
    model.train()
    original.train()
    assert model[0].mlp.training
    _assert_same_training_step(model, original, x, 5)


def test_an_inplace_dropout_is_the_same_math():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(D, H), nn.SiLU(), nn.Dropout(P, inplace=True), nn.Linear(H, D))
    model = nn.Sequential(DropoutLayer(D, block)).double()
    original = copy.deepcopy(model)
    report = mlp_ext.fuse(model)
    assert [r.dropout for r in report.replaced] == [P]
    _assert_same_training_step(model, original, torch.randn(6, D, dtype=torch.float64), 7)
    model.eval()
    original.eval()
    x = torch.randn(6, D, dtype=torch.float64)
    torch.testing.assert_close(model(x), original(x), rtol=1e-12, atol=1e-12)


def test_a_timm_mlp_with_drop1_is_fused_and_with_drop2_refused():
    torch.manual_seed(0)
    vit = nn.Sequential(
        TimmBlock(D, H, mlp_layer=lambda d, h: TimmMlp(d, h, drop=(P, 0.0))),   # proj_drop on h only
        TimmBlock(D, H, mlp_layer=lambda d, h: TimmMlp(d, h, drop=(0.0, P))),   # on the output only
        TimmBlock(D, H, mlp_layer=lambda d, h: TimmMlp(d, h, drop=P)),          # timm's default: both
    ).double()
    original = copy.deepcopy(vit)
    report = mlp_ext.fuse(vit)
    assert [(r.name, r.block, r.linears, r.dropout) for r in report.replaced] == [
        ("0.mlp", "TimmMlp", ("fc1", "fc2"), P)]
    skipped = {s.name: s.reason for s in report.skipped}
    assert "drop2 = Dropout(p=0.3, inplace=False) does not act on gelu(fc1(x))" in skipped["1.mlp"]
    assert "not after fc2" in skipped["1.mlp"]
    assert "has 2 dropouts with p > 0 (drop1, drop2)" in skipped["2.mlp"]
    assert isinstance(vit[0].mlp, FusedMLP) and type(vit[1].mlp) is TimmMlp
    _assert_same_training_step(vit, original, torch.randn(2, 4, D, dtype=torch.float64), 11)
    with pytest.raises(mlp_ext.NotFusable, match="drop2 .* does not act on gelu"):
        mlp_ext.fused_block(original[1].mlp)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("p", [P, 1e-9])
def test_the_dropouts_place_is_proven_whatever_the_mask(p, bias):
    """Square blocks (the shapes cannot tell where the dropout is) with one dropout
    before the first Linear or after the second: refused. With p = 1e-9 the probe's
    mask drops nothing, and without a bias fc2(h) / (1 - p) equals fc2(h / (1 - p)) to
    1e-9: only the check of what the dropout acts on tells them apart."""
    def linear():
        return nn.Linear(D, D, bias=bias)

    before = nn.Sequential(nn.Dropout(p), linear(), nn.ReLU(), linear())
    after = nn.Sequential(linear(), nn.ReLU(), linear(), nn.Dropout(p))
    hidden = nn.Sequential(linear(), nn.ReLU(), nn.Dropout(p), linear())
    with pytest.raises(mlp_ext.NotFusable, match=r"0 = Dropout.* does not act on relu\(1\(x\)\)"):
        mlp_ext.fused_block(before.double())
    with pytest.raises(mlp_ext.NotFusable, match=r"3 = Dropout.* does not act on relu\(0\(x\)\)"):
        mlp_ext.fused_block(after.double())
    assert mlp_ext.fused_block(hidden.double()).dropout == p


class SharedDropout(nn.Module):
    """One dropout module on the hidden layer and on the output."""

    def __init__(self, d, h):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d)
        self.dropout = nn.Dropout(P)

    def forward(self, x):
        return self.dropout(self.fc2(self.dropout(self.act(self.fc1(x)))))


class ScaledAfterDropout(SharedDropout):
    def forward(self, x):
        return self.fc2(self.dropout(self.act(self.fc1(x)))) * 2


@pytest.mark.parametrize("block, reason", [
    (nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Dropout(0.1), nn.Dropout(0.2), nn.Linear(H, D)),
     r"has 2 dropouts with p > 0 \(2, 3\)"),
    (SharedDropout(D, H), re.escape("calls dropout = Dropout(p=0.3, inplace=False) 2 times in train mode")),
    (ScaledAfterDropout(D, H), r"does not return fc2\(dropout\(...\)\) in train mode"),
    (nn.Sequential(nn.Linear(D, H), nn.Dropout(P), nn.GELU(), nn.Linear(H, D)),
     r"does not act on gelu\(0\(x\)\)"),   # before the activation: other math for gelu
], ids=["two", "called-twice", "scaled", "before-the-activation"])
def test_blocks_whose_dropout_is_not_the_hidden_layers_are_refused(block, reason):
    model = nn.ModuleDict({"mlp": block}).double()
    report = mlp_ext.fuse(model)
    assert report.replaced == [] and model["mlp"] is block
    assert [s.name for s in report.skipped] == ["mlp"]
    assert re.search(reason, report.skipped[0].reason), report.skipped[0].reason


@pytest.mark.parametrize("kind", [nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                                  nn.FeatureAlphaDropout])
def test_other_dropouts_with_p_are_refused(kind):
    block = nn.Sequential(nn.Linear(D, H), nn.ReLU(), kind(P), nn.Linear(H, D))
    with pytest.raises(mlp_ext.NotFusable, match=f"2 = {kind.__name__}.*only a plain nn.Dropout"):
        mlp_ext.fused_block(block)


def test_a_hook_on_the_dropout_is_not_bypassed():
    block = TimmMlp(D, H, drop=(P, 0.0))
    block.drop1.register_forward_hook(lambda *args: None)
    with pytest.raises(mlp_ext.NotFusable, match=r"hooks the fused op would bypass \(drop1.forward_hooks\)"):
        mlp_ext.fused_block(block)


def test_fuse_leaves_the_callers_random_numbers_alone():
    """The probe seeds generators for its dropout comparison inside fork_rng: the
    caller's stream continues as if fuse had not run (refused blocks too)."""
    model = nn.Sequential(
        DropoutLayer(D, nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Dropout(P), nn.Linear(H, D))),
        DropoutLayer(D, TimmMlp(D, H, drop=(0.0, P))),      # refused by the probe
        DropoutLayer(D, TimmMlp(D, H, drop=(P, 0.0)))).double()
    torch.manual_seed(123)
    torch.rand(1)
    state = torch.get_rng_state()
    expected = torch.rand(8)
    torch.set_rng_state(state)
    report = mlp_ext.fuse(model)
    assert len(report.replaced) == 2 and len(report.skipped) == 1
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(torch.rand(8), expected)


def test_a_dropout_in_a_longer_sequential_is_reported():
    seq = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Dropout(P), nn.Linear(H, D), nn.Linear(D, D))
    report = mlp_ext.fuse(nn.ModuleDict({"seq": seq}))
    assert report.replaced == [] and "renumber the state_dict keys" in report.skipped[0].reason


def test_dropout_blocks_on_every_device(device):
    """On CUDA the op's mask is its own (Philox) draw, not nn.Dropout's: there fuse
    proves the dropout's place by structure and compares outputs in eval mode only;
    a dropout after fc2 is refused there too, and no generator is disturbed."""
    torch.manual_seed(0)
    model = nn.ModuleDict({
        "hidden": nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Dropout(P), nn.Linear(H, D)),
        "output": TimmMlp(D, H, drop=(0.0, P)),
    }).to(device, torch.float64)
    original = copy.deepcopy(model)
    cuda_state = torch.cuda.get_rng_state() if device == "cuda" else None
    report = mlp_ext.fuse(model)
    if cuda_state is not None:
        assert torch.equal(torch.cuda.get_rng_state(), cuda_state)
    assert [(r.name, r.dropout) for r in report.replaced] == [("hidden", P)]
    assert "drop2 = Dropout(p=0.3, inplace=False) does not act on gelu(fc1(x))" in report.skipped[0].reason
    x = torch.randn(5, D, dtype=torch.float64, device=device)
    model.eval()
    original.eval()
    without_dropout = model["hidden"](x)
    torch.testing.assert_close(without_dropout, original["hidden"](x), rtol=1e-12, atol=1e-12)
    model.train()
    # Dropout is on again (0.7^50 is the chance that none of the 5 x 10 units drops).
    assert not torch.equal(model["hidden"](x), without_dropout)


@pytest.mark.parametrize("dtype, tol", [
    # float32: unit roundoff 2^-24 per operation, a few dozen operations summed in
    # another order than nn.Linear's (the scale 1 / (1 - p) adds one rounding).
    (torch.float32, 1e-5),
    # bfloat16: 2^-8 relative per stored value (z, h, o are stored in bfloat16).
    (torch.bfloat16, 2e-2),
])
def test_low_precision_dropout_blocks_train_like_the_original(dtype, tol):
    """The probe runs in float64; in the model's own dtype the op's CPU mask is
    nn.Dropout's too: outputs differ by rounding only (a different mask would move
    them by O(1))."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(D, 64), nn.ReLU(), nn.Dropout(P), nn.Linear(64, D))
    model = nn.Sequential(DropoutLayer(D, block)).to(dtype)
    original = copy.deepcopy(model)
    assert [r.dropout for r in mlp_ext.fuse(model).replaced] == [P]
    x = torch.randn(16, D).to(dtype)
    out = _seeded(model, x, 3)
    expected = _seeded(original, x, 3)
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    hidden = torch.randn(64, D).to(dtype)   # the blocks alone: 64 x 64 units, ~30% dropped
    torch.testing.assert_close(_seeded(model[0].mlp, hidden, 4), _seeded(original[0].mlp, hidden, 4),
                               rtol=tol, atol=tol)


class FlattensToRows(SharedDropout):
    def forward(self, x):
        rows = self.dropout(self.act(self.fc1(x.reshape(-1, x.shape[-1]))))
        return self.fc2(rows).reshape(*x.shape[:-1], -1)


def test_a_forward_that_flattens_its_input_is_fused():
    torch.manual_seed(0)
    model = nn.ModuleDict({"mlp": FlattensToRows(D, H)}).double()
    original = copy.deepcopy(model)
    assert [r.dropout for r in mlp_ext.fuse(model).replaced] == [P]
    _assert_same_training_step(model["mlp"], original["mlp"], torch.randn(2, 3, D, dtype=torch.float64), 9)


@pytest.mark.parametrize("bias", [True, False])
def test_weight_decay_with_a_dropout_block(bias):
    """fuse(model, weight_decay=lambda) on a dropout block: under one seed the fused
    model's o and s give the gradients of J = L + lambda/2 (||W1||^2 + ||W2||^2) that
    the original model gives with the L2 term written out."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(D, H, bias=bias), nn.Tanh(), nn.Dropout(P), nn.Linear(H, D, bias=bias))
    model = nn.Sequential(DropoutLayer(D, block)).double()
    original = copy.deepcopy(model)
    assert [r.dropout for r in mlp_ext.fuse(model, weight_decay=0.1).replaced] == [P]
    x = torch.randn(4, D, dtype=torch.float64)
    g = torch.randn(4, D, dtype=torch.float64)
    torch.manual_seed(8)
    with mlp_ext.collect_penalty() as penalty:
        loss = (model(x) * g).sum() + penalty.total()
    torch.manual_seed(8)
    w1, w2 = original[0].mlp[0].weight, original[0].mlp[3].weight
    expected_loss = (original(x) * g).sum() + 0.1 / 2 * (w1.square().sum() + w2.square().sum())
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    expected_grads = torch.autograd.grad(expected_loss, list(original.parameters()))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
