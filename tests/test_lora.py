"""LoRA core: equivalences, trainability, save/load, injection into a real timm ViT, and errors."""

import pytest
import torch
from torch import nn

from models.adapters.lora import (
    LoRAAdapter,
    LoRALinear,
    count_parameters,
    inject_lora,
    load_lora,
    lora_layers,
    lora_state_dict,
    mark_only_lora_as_trainable,
    merge_and_unload,
    save_lora,
)
from models.vision.vit import create_vit


def _randomise_b(model: nn.Module, seed: int = 0) -> None:
    """B starts at zero; give it values so merge tests are not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRAAdapter):
            with torch.no_grad():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)


def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8).eval()


def test_zero_init_equals_base():
    base = nn.Linear(12, 7)
    x = torch.randn(5, 12)
    layer = LoRALinear(base, r=4, lora_alpha=8)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.adapters["default"].lora_A) > 0  # A random, B zero


@pytest.mark.parametrize("rslora,expected", [(False, 16 / 4), (True, 16 / 2)])
def test_scaling(rslora, expected):
    assert LoRAAdapter(8, 8, r=4, lora_alpha=16, use_rslora=rslora).scaling == pytest.approx(expected)


def test_forward_matches_dense_formula():
    base = nn.Linear(10, 6)
    layer = LoRALinear(base, r=3, lora_alpha=6)
    _randomise_b(layer)
    ad = layer.adapters["default"]
    x = torch.randn(4, 10)
    ref = x @ (base.weight + 2.0 * ad.lora_B @ ad.lora_A).t() + base.bias
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)


def test_merge_unmerge_round_trip():
    base = nn.Linear(16, 16)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=4, lora_alpha=8)
    layer.add_adapter("fast", r=2, lora_alpha=2)
    _randomise_b(layer)
    x = torch.randn(3, 16)
    y_unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y_unmerged, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(base.weight, w0)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y_unmerged, rtol=1e-5, atol=1e-6)


def test_only_adapters_and_chosen_bias_train():
    vit = _tiny_vit()
    inject_lora(vit, None, r=2, bias="none")
    names = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert names and all(".lora_A" in n or ".lora_B" in n for n in names)
    mark_only_lora_as_trainable(vit, bias="lora_only")
    names = {n for n, p in vit.named_parameters() if p.requires_grad}
    bias_names = {n for n in names if n.endswith(".bias")}
    assert bias_names and all(n.endswith(".base.bias") for n in bias_names)
    mark_only_lora_as_trainable(vit, bias="all")
    names = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert "patch_embed.proj.bias" in names and "patch_embed.proj.weight" not in names


def test_gradients_reach_only_adapters():
    vit = _tiny_vit()
    inject_lora(vit, None, r=2)
    _randomise_b(vit)
    out = vit(torch.randn(2, 3, 32, 32))
    (out * torch.randn_like(out)).sum().backward()  # a plain sum after LayerNorm has zero gradient
    for n, p in vit.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_inject_timm_vit_default_targets():
    vit = _tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    y0 = vit(x)
    replaced = inject_lora(vit, None, r=4, lora_alpha=8)
    depth = len(vit.blocks)
    assert len(replaced) == 4 * depth
    assert {n.split(".")[-1] for n in replaced} == {"qkv", "proj", "fc1", "fc2"}
    assert "patch_embed.proj" not in replaced  # a conv, and not in blocks
    torch.testing.assert_close(vit(x), y0)


def test_inject_all_linear_skips_head_and_lists_match_forms():
    vit = create_vit("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5)
    replaced = inject_lora(vit, "all-linear", r=2)
    assert "head" not in replaced and len(replaced) == 4 * len(vit.blocks)
    vit2 = _tiny_vit()
    assert inject_lora(vit2, ["qkv"], r=2) == [f"blocks.{i}.attn.qkv" for i in range(len(vit2.blocks))]
    vit3 = _tiny_vit()
    assert inject_lora(vit3, [r"blocks\.0\.mlp\.fc\d$"], r=2) == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    vit4 = _tiny_vit()
    out = inject_lora(vit4, ["qkv", "proj"], exclude_modules=[r"blocks\.[1-9]\d*\."], r=2)
    assert out == ["blocks.0.attn.qkv", "blocks.0.attn.proj"]


def test_save_load_round_trip(tmp_path):
    vit = _tiny_vit()
    inject_lora(vit, None, r=2, bias="lora_only")
    _randomise_b(vit, seed=1)
    with torch.no_grad():
        for layer in lora_layers(vit).values():
            layer.bias.add_(0.01)
    x = torch.randn(2, 3, 32, 32)
    y = vit(x)
    path = save_lora(vit, tmp_path / "adapter.safetensors", bias="lora_only", metadata={"r": 2})
    sd = lora_state_dict(vit, bias="lora_only")
    assert all("lora_" in k or k.endswith(".base.bias") for k in sd)

    fresh = _tiny_vit()  # same seed: same frozen weights
    inject_lora(fresh, None, r=2, bias="lora_only")
    assert not torch.allclose(fresh(x), y)
    meta = load_lora(fresh, path)
    assert meta["r"] == "2"
    torch.testing.assert_close(fresh(x), y)


def test_merge_and_unload_gives_plain_linears():
    vit = _tiny_vit()
    inject_lora(vit, None, r=2)
    _randomise_b(vit)
    x = torch.randn(2, 3, 32, 32)
    y = vit(x)
    merge_and_unload(vit)
    assert not lora_layers(vit)
    assert type(vit.blocks[0].attn.qkv) is nn.Linear
    torch.testing.assert_close(vit(x), y, rtol=1e-4, atol=1e-5)


def test_error_unknown_target_lists_available():
    vit = _tiny_vit()
    with pytest.raises(ValueError, match=r"matched no nn.Linear.*blocks\.0\.attn\.qkv"):
        inject_lora(vit, ["does_not_exist"], r=2)


@pytest.mark.parametrize("r", [0, -1])
def test_error_bad_rank(r):
    with pytest.raises(ValueError, match="rank"):
        inject_lora(_tiny_vit(), None, r=r)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(4, 4), r=r)


def test_error_rank_larger_than_layer():
    with pytest.raises(ValueError, match="larger than the layer"):
        LoRALinear(nn.Linear(4, 3), r=5)


def test_error_inject_twice():
    vit = _tiny_vit()
    inject_lora(vit, None, r=2)
    with pytest.raises(ValueError, match="twice"):
        inject_lora(vit, None, r=2)


def test_error_load_into_mismatched_layout(tmp_path):
    vit = _tiny_vit()
    inject_lora(vit, None, r=2)
    path = save_lora(vit, tmp_path / "a.safetensors")
    other = _tiny_vit()
    inject_lora(other, ["qkv"], r=2)
    with pytest.raises(KeyError, match="lacks"):
        load_lora(other, path)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_lora(other, tmp_path / "missing.safetensors")


def test_trainable_count():
    vit = _tiny_vit()
    inject_lora(vit, ["qkv"], r=2)
    d = vit.embed_dim
    assert count_parameters(vit) == len(vit.blocks) * 2 * (d + 3 * d)
