"""GatedFusedMLP and mlp_ext.fuse on gated blocks: transformers' LlamaMLP (and
Mistral / Qwen2 / Gemma MLPs, the same shape), T5 v1.1's DenseGatedActDense, and
a replica of timm's SwiGLU (timm cannot be installed here; see
tests/test_fuse_libraries.py): state_dicts load unchanged, outputs and gradients
equal the original block's, fuse replaces exactly the gated blocks."""
import copy

import pytest
import torch
from torch import nn

import mlp_ext
from mlp_ext import reference
from mlp_ext.gated import TIMM_NAMES

transformers = pytest.importorskip("transformers")  # CI installs it (scripts/env.sh)


class TimmSwiGLU(nn.Module):
    """timm.layers.mlp.SwiGLU (timm 1.0), structure and forward as written there."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.SiLU,
                 norm_layer=None, bias=True, drop=0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        bias = bias if isinstance(bias, tuple) else (bias, bias)
        drop_probs = drop if isinstance(drop, tuple) else (drop, drop)
        self.fc1_g = nn.Linear(in_features, hidden_features, bias=bias[0])
        self.fc1_x = nn.Linear(in_features, hidden_features, bias=bias[0])
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop_probs[0])
        self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias[1])
        self.drop2 = nn.Dropout(drop_probs[1])

    def forward(self, x):
        x_gate = self.fc1_g(x)
        x = self.fc1_x(x)
        x = self.act(x_gate) * x
        x = self.drop1(x)
        x = self.norm(x)
        x = self.fc2(x)
        x = self.drop2(x)
        return x


def _llama_mlp(dtype=torch.float64):
    from transformers.models.llama.modeling_llama import LlamaMLP
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2,
                                      num_hidden_layers=1, vocab_size=50)
    return LlamaMLP(config).to(dtype)


def _same_outputs_and_gradients(original, fused, x, weight_names):
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    o1, o2 = original(x1), fused(x2)
    torch.testing.assert_close(o2, o1, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(o1)
    names = [f"{n}.weight" for n in weight_names]
    p1 = dict(original.named_parameters())
    p2 = dict(fused.named_parameters())
    g1 = torch.autograd.grad(o1, [x1] + [p1[n] for n in names], g)
    g2 = torch.autograd.grad(o2, [x2] + [p2[n] for n in names], g)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_loads_a_llama_mlp_state_dict_unchanged():
    llama = _llama_mlp()
    fused = mlp_ext.GatedFusedMLP(16, 40, dtype=torch.float64)
    assert list(fused.state_dict()) == list(llama.state_dict())
    fused.load_state_dict(llama.state_dict())
    _same_outputs_and_gradients(llama, fused, torch.randn(2, 5, 16, dtype=torch.float64),
                                ("gate_proj", "up_proj", "down_proj"))
    llama.load_state_dict(fused.state_dict())  # and back


@pytest.mark.parametrize("bias", [True, False, (True, False)])
def test_loads_a_timm_swiglu_state_dict_unchanged(bias):
    timm_block = TimmSwiGLU(12, 20, 8, bias=bias).double()
    fused = mlp_ext.GatedFusedMLP(12, 20, 8, bias=True, names=TIMM_NAMES, dtype=torch.float64)
    if bias != (True, False):
        fused = mlp_ext.GatedFusedMLP(12, 20, 8, bias=bias, names=TIMM_NAMES, dtype=torch.float64)
        assert list(fused.state_dict()) == list(timm_block.state_dict())
        fused.load_state_dict(timm_block.state_dict())
    else:  # fc1 with a bias, fc2 without: from_linears takes each bias as it is
        fused = mlp_ext.GatedFusedMLP.from_linears(
            copy.deepcopy(timm_block.fc1_g), copy.deepcopy(timm_block.fc1_x),
            copy.deepcopy(timm_block.fc2), "silu", names=TIMM_NAMES)
        assert list(fused.state_dict()) == list(timm_block.state_dict())
    _same_outputs_and_gradients(timm_block, fused, torch.randn(7, 12, dtype=torch.float64),
                                TIMM_NAMES)


def test_module_init_matches_nn_linear_and_repr():
    torch.manual_seed(3)
    fused = mlp_ext.GatedFusedMLP(8, 12, 4, bias=True)
    torch.manual_seed(3)
    linears = [nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(12, 4)]
    for layer, ref in zip((fused.gate_proj, fused.up_proj, fused.down_proj), linears):
        assert torch.equal(layer.weight, ref.weight) and torch.equal(layer.bias, ref.bias)
    assert "activation='silu'" in repr(fused)
    assert fused.out_features == 4 and mlp_ext.GatedFusedMLP(8, 12).out_features == 8


def test_module_penalty_and_collector():
    fused = mlp_ext.GatedFusedMLP(6, 10, 3, weight_decay=0.2, dtype=torch.float64)
    x = torch.randn(4, 6, dtype=torch.float64)
    o, s = fused(x, return_penalty=True)
    ws = [fused.gate_proj.weight, fused.up_proj.weight, fused.down_proj.weight]
    _, s_ref = reference.gated_mlp(x, *ws, weight_decay=0.2)
    torch.testing.assert_close(s, s_ref)
    with mlp_ext.collect_penalty() as collected:
        fused(x)
    torch.testing.assert_close(collected.total(), s_ref)


def test_module_argument_errors():
    with pytest.raises(ValueError, match="three distinct module names"):
        mlp_ext.GatedFusedMLP(4, 6, names=("a", "a", "b"))
    with pytest.raises(ValueError, match="weight_decay"):
        mlp_ext.GatedFusedMLP(4, 6, weight_decay=-1)
    with pytest.raises(TypeError, match="expected up to be an nn.Linear"):
        mlp_ext.GatedFusedMLP.from_linears(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4))
    with pytest.raises(ValueError, match="gate and up must have one shape"):
        mlp_ext.GatedFusedMLP.from_linears(nn.Linear(4, 6), nn.Linear(4, 7), nn.Linear(6, 4))


# -- fuse ----------------------------------------------------------------------------------

SMALL = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=2, vocab_size=50, max_position_embeddings=16)


def _model(name):
    if name == "llama":
        return transformers.LlamaModel(transformers.LlamaConfig(**SMALL)), "silu"
    if name == "mistral":
        return transformers.MistralModel(transformers.MistralConfig(**SMALL)), "silu"
    if name == "qwen2":
        return transformers.Qwen2Model(transformers.Qwen2Config(**SMALL)), "silu"
    if name == "gemma":
        return transformers.GemmaModel(transformers.GemmaConfig(head_dim=8, **SMALL)), "gelu_tanh"
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gemma"])
def test_fuse_replaces_the_mlp_of_each_decoder_layer(name):
    torch.manual_seed(0)
    model, activation = _model(name)
    model = model.double().eval()
    ids = torch.randint(0, 50, (2, 7))
    expected = model(input_ids=ids).last_hidden_state
    keys = list(model.state_dict())
    report = mlp_ext.fuse(model)
    assert [r.name for r in report.replaced] == [f"layers.{i}.mlp" for i in range(2)], str(report)
    assert all(r.activation == activation for r in report.replaced)
    assert all(isinstance(layer.mlp, mlp_ext.GatedFusedMLP) for layer in model.layers)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, expected,
                               rtol=1e-10, atol=1e-10)
    assert "down_proj(silu(gate_proj) * up_proj)" in str(report) or activation != "silu"


def test_fuse_t5_v1_1_dense_gated_act_dense():
    config = transformers.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=24, num_layers=1,
                                   num_heads=2, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = transformers.T5EncoderModel(config).double().eval()
    ids = torch.randint(0, 50, (2, 5))
    expected = model(input_ids=ids).last_hidden_state
    report = mlp_ext.fuse(model)
    assert [r.block for r in report.replaced] == ["T5DenseGatedActDense"], str(report)
    assert report.replaced[0].linears == ("wi_0", "wi_1", "wo")
    torch.testing.assert_close(model(input_ids=ids).last_hidden_state, expected,
                               rtol=1e-10, atol=1e-10)


def test_fuse_t5_with_dropout_is_reported_not_replaced():
    config = transformers.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=24, num_layers=1,
                                   num_heads=2, feed_forward_proj="gated-gelu", dropout_rate=0.1)
    model = transformers.T5EncoderModel(config)
    report = mlp_ext.fuse(model)
    assert report.replaced == []
    assert any("dropout" in s.reason for s in report.skipped), str(report)


def test_fuse_timm_swiglu_replica_and_training_step():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 12), nn.Module())
    model[1] = TimmSwiGLU(12, 32, 5)
    reference_model = copy.deepcopy(model)
    report = mlp_ext.fuse(model)
    assert [r.name for r in report.replaced] == ["1"] and report.replaced[0].linears == TIMM_NAMES
    x = torch.randn(4, 6)
    torch.testing.assert_close(model(x), reference_model(x))
    model(x).square().sum().backward()
    reference_model(x).square().sum().backward()
    for (n, p), (_, p_ref) in zip(model.named_parameters(), reference_model.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, msg=n)


class SwappedNames(nn.Module):
    """A block whose first-registered Linear is the up projection: the probe finds the gate."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4, 8, bias=False)
        self.gate = nn.Linear(4, 8, bias=False)
        self.down = nn.Linear(8, 4, bias=False)
        self.act = nn.GELU()

    def forward(self, x):
        return self.down(self.act(self.gate(x)) * self.up(x))


class NotGated(nn.Module):
    """Three Linears of a gated block's shapes, but a sum instead of a product."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(4, 8)
        self.c = nn.Linear(8, 4)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.c(self.act(self.a(x)) + self.b(x))


def test_fuse_finds_the_gate_by_the_probe_and_refuses_a_look_alike():
    model = nn.ModuleDict({"swapped": SwappedNames(), "sum": NotGated()})
    expected = model["swapped"](torch.ones(2, 4))
    report = mlp_ext.fuse(model)
    assert [(r.name, r.linears) for r in report.replaced] == [("swapped", ("gate", "up", "down"))]
    assert [s.name for s in report.skipped] == ["sum"]
    assert "differs from" in report.skipped[0].reason
    torch.testing.assert_close(model["swapped"](torch.ones(2, 4)), expected)


def test_fuse_reports_a_root_gated_block():
    report = mlp_ext.fuse(_llama_mlp())
    assert report.replaced == [] and "fused_gated_block" in report.skipped[0].reason
