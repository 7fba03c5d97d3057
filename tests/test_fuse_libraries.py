"""mlp_ext.fuse on Hugging Face transformers' models, built from small configs (no
download): CLIP (quick_gelu, the released checkpoints' activation), SigLIP
(gelu_pytorch_tanh), T5 (wi, act, dropout, wo: a hidden-layer dropout, fused as
FusedMLP(dropout=p); T5 v1.1's gated block with that dropout is reported) and OPT,
whose decoder layers hold fc1 / fc2 beside attention and norms and must be
reported, not replaced.

transformers does not depend on torch; scripts/env.sh installs it, so CI runs these.
timm is not tested here: it needs torchvision, whose only Linux wheel for torch 2.13
on PyPI is a CUDA build that fails to import next to the CPU torch (its C ops do not
load: "operator torchvision::nms does not exist"); tests/test_fuse.py runs a
structural replica of timm's Mlp (fc1, act, drop1, norm, fc2, drop2) and of
VisionTransformer's mlp_layer blocks instead.
"""
import copy

import pytest
import torch

import mlp_ext

transformers = pytest.importorskip("transformers")  # CI installs it (scripts/env.sh)

SMALL = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2)


def clip_text(hidden_act="quick_gelu"):
    config = transformers.CLIPTextConfig(vocab_size=50, max_position_embeddings=12, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1, hidden_act=hidden_act, **SMALL)
    return transformers.CLIPTextModel(config), {"input_ids": torch.randint(2, 50, (2, 7))}


def clip_vision():
    config = transformers.CLIPVisionConfig(image_size=8, patch_size=4, hidden_act="quick_gelu", **SMALL)
    return transformers.CLIPVisionModel(config), {"pixel_values": torch.randn(2, 3, 8, 8)}


def siglip_vision():
    config = transformers.SiglipVisionConfig(image_size=8, patch_size=4, **SMALL)
    return transformers.SiglipVisionModel(config), {"pixel_values": torch.randn(2, 3, 8, 8)}


def opt():
    config = transformers.OPTConfig(vocab_size=50, hidden_size=16, ffn_dim=24, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=12,
                                    word_embed_proj_dim=16, dropout=0.0, attention_dropout=0.0)
    return transformers.OPTModel(config), {"input_ids": torch.randint(2, 50, (2, 7))}


def output(model, inputs):
    return model(**inputs).last_hidden_state


@pytest.mark.parametrize("build, blocks, activation", [
    (clip_text, 2, "quick_gelu"), (clip_vision, 2, "quick_gelu"),
    (lambda: clip_text("gelu"), 2, "gelu"),
    (siglip_vision, 3, "gelu_tanh"),   # the encoder's 2 layers and the pooling head's MLP
], ids=["clip-text", "clip-vision", "clip-text-gelu", "siglip-vision"])
def test_one_call_converts_the_model(build, blocks, activation):
    torch.manual_seed(0)
    model, inputs = build()
    model = model.double().train()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    original = copy.deepcopy(model)
    state = model.state_dict()
    params = dict(model.named_parameters())
    report = mlp_ext.fuse(model)
    print(report)
    assert len(report.replaced) == blocks and report.skipped == []
    assert {r.activation for r in report.replaced} == {activation}
    assert all(isinstance(model.get_submodule(r.name), mlp_ext.FusedMLP) for r in report.replaced)
    # the same state: keys, values, parameter objects
    assert list(model.state_dict()) == list(state)
    assert all(p is params[n] for n, p in model.named_parameters())
    out, expected = output(model, inputs), output(original, inputs)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(model.parameters()), g, allow_unused=True)
    expected_grads = torch.autograd.grad(expected, list(original.parameters()), g, allow_unused=True)
    for a, b in zip(grads, expected_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_opt_decoder_layers_are_reported_not_replaced():
    torch.manual_seed(0)
    model, inputs = opt()
    report = mlp_ext.fuse(model)
    assert report.replaced == []
    assert {s.name for s in report.skipped} == {"decoder.layers.0", "decoder.layers.1"}
    assert all("self_attn" in s.reason for s in report.skipped)


def test_save_pretrained_round_trip_and_training_with_the_penalty(tmp_path):
    torch.manual_seed(0)
    model, inputs = clip_vision()
    model = model.double()
    inputs = {"pixel_values": inputs["pixel_values"].double()}
    report = mlp_ext.fuse(model, weight_decay=0.01)
    model.save_pretrained(tmp_path)
    loaded = transformers.CLIPVisionModel.from_pretrained(tmp_path, dtype=torch.float64)  # unfused
    loaded.eval()
    model.eval()
    torch.testing.assert_close(output(model, inputs), output(loaded, inputs), rtol=1e-12, atol=1e-12)

    # J = L + sum of s over the fused blocks, through the host model.
    with mlp_ext.collect_penalty() as penalty:
        out = output(model, inputs)
    assert len(penalty) == 2
    blocks = [m for m in model.modules() if isinstance(m, mlp_ext.FusedMLP)]
    expected_s = sum(0.01 / 2 * (b.fc1.weight.square().sum() + b.fc2.weight.square().sum())
                     for b in blocks)
    torch.testing.assert_close(penalty.total(), expected_s, rtol=1e-13, atol=0)
    loss = out.square().mean() + penalty.total()
    loss.backward()
    first = report.replaced[0]
    w = model.get_submodule(f"{first.name}.{first.linears[0]}").weight
    # The weight's gradient is the task's plus lambda W: check against the unfused model.
    task = output(loaded, inputs).square().mean()
    (task_grad,) = torch.autograd.grad(task, [loaded.get_submodule(
        f"{first.name}.{first.linears[0]}").weight])
    torch.testing.assert_close(w.grad, task_grad + 0.01 * w.detach(), rtol=1e-10, atol=1e-12)


def test_compiled_fused_clip():
    torch.manual_seed(0)
    model, inputs = clip_text()
    model = model.double().eval()
    reference = copy.deepcopy(model)
    mlp_ext.fuse(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    torch.testing.assert_close(output(compiled, inputs), output(reference, inputs), rtol=1e-12, atol=1e-12)


def t5_encoder(feed_forward_proj="relu", dropout_rate=0.1):
    config = transformers.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=24, num_layers=2,
                                   num_heads=2, dropout_rate=dropout_rate,
                                   feed_forward_proj=feed_forward_proj)
    return transformers.T5EncoderModel(config), {"input_ids": torch.randint(2, 50, (2, 7))}


def test_t5s_hidden_layer_dropout_is_fused_and_draws_the_same_masks():
    """T5's DenseReluDense applies nn.Dropout(dropout_rate) between relu and wo; the
    encoder has dropouts before and after it, so train-mode outputs equal under one
    seed only if the fused op draws the same numbers as nn.Dropout (on the CPU)."""
    torch.manual_seed(0)
    model, inputs = t5_encoder()
    model = model.double().train()
    original = copy.deepcopy(model)
    keys = list(model.state_dict())
    report = mlp_ext.fuse(model)
    assert [(r.name, r.linears, r.activation, r.dropout) for r in report.replaced] == [
        (f"encoder.block.{i}.layer.1.DenseReluDense", ("wi", "wo"), "relu", 0.1) for i in range(2)]
    assert report.skipped == []
    assert list(model.state_dict()) == keys
    for seed in (0, 1):
        torch.manual_seed(seed)
        out = output(model, inputs)
        torch.manual_seed(seed)
        expected = output(original, inputs)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, list(model.parameters()), g)
        expected_grads = torch.autograd.grad(expected, list(original.parameters()), g)
        for a, b in zip(grads, expected_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    model.eval()
    original.eval()
    torch.testing.assert_close(output(model, inputs), output(original, inputs), rtol=1e-12, atol=1e-12)


def test_t5_v1_1s_gated_block_with_dropout_is_reported():
    torch.manual_seed(0)
    model, _ = t5_encoder("gated-gelu")
    report = mlp_ext.fuse(model)
    assert report.replaced == []
    assert [s.name for s in report.skipped] == [
        f"encoder.block.{i}.layer.1.DenseReluDense" for i in range(2)]
    assert all("dropout = Dropout(p=0.1, inplace=False) is not a no-op in training" in s.reason
               and "GatedFusedMLP has no dropout" in s.reason for s in report.skipped)
