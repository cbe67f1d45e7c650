"""GPT: config validation, causality, Skip2-LoRA against a hand-written reference, LoRA parity, weight loading."""

import pytest
import torch
from torch import nn

from models.adapters.lora import LoRAAdapter, LoRALinear, lora_state_dict
from models.lm.gpt import GPT, Config, load_pretrained

TINY = dict(n_layer=3, n_head=2, n_embd=16, block_size=32, vocab_size=256)


def _randomise_adapters(model: nn.Module, seed: int = 0) -> None:
    """B starts at zero; random B makes every adapter contribute."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRAAdapter):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.2)


def _model(seed: int = 0, **kw) -> GPT:
    torch.manual_seed(seed)
    return GPT(Config(**{**TINY, **kw})).eval()


@pytest.mark.parametrize("kw", [
    {},
    {"position": "learned", "norm_class": "RMSNorm", "mlp_class": "LLaMAMLP", "bias": False},
    {"skip2lora_enabled": True, "skip2lora_block_indices": [0, -1]},
    {"lora_query": True, "lora_mlp": True, "skip2lora_enabled": True},
])
def test_causal_perturbing_future_tokens(kw):
    model = _model(**kw)
    _randomise_adapters(model)
    idx = torch.randint(0, 256, (2, 20))
    t = 11
    changed = idx.clone()
    changed[:, t + 1:] = torch.randint(0, 256, changed[:, t + 1:].shape)
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])
    past = idx.clone()
    past[:, 0] = (past[:, 0] + 1) % 256
    assert not torch.allclose(model(past)[:, t], a[:, t])  # the past does matter


def test_skip2lora_forward_equals_hand_written_reference():
    model = _model(skip2lora_enabled=True, skip2lora_block_indices=[-1, 0], skip2lora_r=3, skip2lora_alpha=5.0)
    _randomise_adapters(model)
    assert model.skip_indices == [0, 2]
    idx = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        x = model.wte(idx)
        rope = (model.rope_cos[:12], model.rope_sin[:12])
        h = []
        for block in model.blocks:
            x = block(x, rope)
            h.append(x)
        z = model.ln_f(x)
        for branch, i in zip(model.skip2lora, [0, 2]):
            z = z + (5.0 / 3) * h[i] @ branch.lora_A.t() @ branch.lora_B.t()
        ref = z @ model.lm_head.weight.t()
        plain = model.ln_f(x) @ model.lm_head.weight.t()
    out = model(idx)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, plain, atol=1e-3)  # the branches contribute
    feats = model.forward_backbone(idx)
    assert feats["skip"].shape == (2, 2, 12, 16) and torch.equal(feats["skip"][:, 1], h[2])
    per_branch = sum(branch(feats["skip"][:, j]) for j, branch in enumerate(model.skip2lora))  # the LoRAAdapters
    torch.testing.assert_close(model.skip2lora(feats["skip"]), per_branch, rtol=1e-5, atol=1e-6)


def test_skip2lora_disabled_is_plain_lora():
    lora = dict(lora_query=True, lora_value=True, lora_r=2)
    plain = _model(seed=1, **lora)
    disabled = _model(seed=1, **lora, skip2lora_enabled=False, skip2lora_block_indices=[0, 5], skip2lora_r=4)
    assert disabled.state_dict().keys() == plain.state_dict().keys() and len(disabled.skip2lora) == 0
    _randomise_adapters(plain)
    disabled.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 256, (2, 10))
    assert torch.equal(disabled(idx), plain(idx))
    # Enabled but freshly initialised (B = 0): still exactly plain LoRA.
    enabled = _model(seed=1, **lora, skip2lora_enabled=True)
    enabled.load_state_dict(plain.state_dict(), strict=False)
    torch.testing.assert_close(enabled(idx), plain(idx), rtol=0, atol=0)


def test_trainable_parameters():
    full = _model()
    assert all(p.requires_grad for p in full.parameters())
    skip = _model(skip2lora_enabled=True, skip2lora_block_indices=[1], skip2lora_r=4)
    names = [n for n, p in skip.named_parameters() if p.requires_grad]
    assert names == ["skip2lora.0.lora_A", "skip2lora.0.lora_B"]
    assert sum(p.numel() for p in skip.parameters() if p.requires_grad) == 2 * 16 * 4
    lora = _model(lora_query=True, lora_key=True, lora_value=True, lora_projection=True, lora_mlp=True, lora_head=True)
    wrapped = [n for n, m in lora.named_modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 3 * 6 + 1 and "lm_head" in wrapped
    assert all("adapters" in n for n, p in lora.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("indices,match", [
    ([3], r"outside \[-3, 2\]"),
    ([-4], r"outside \[-3, 2\]"),
    ([1, -2], "names a block twice"),
    ([], "is empty"),
])
def test_bad_block_indices(indices, match):
    with pytest.raises(ValueError, match=match):
        Config(**TINY, skip2lora_enabled=True, skip2lora_block_indices=indices)
    Config(**TINY, skip2lora_enabled=False, skip2lora_block_indices=indices)  # ignored when disabled


@pytest.mark.parametrize("kw,match", [
    ({"n_embd": 15}, "divisible"),
    ({"norm_class": "BatchNorm"}, "norm_class"),
    ({"position": "alibi"}, "position"),
    ({"dropout": 1.0}, "dropout"),
    ({"lora_query": True, "lora_r": 0}, "lora_r"),
    ({"skip2lora_enabled": True, "skip2lora_r": 0}, "skip2lora_r"),
    ({"skip2lora_output_layer": "ln_f"}, "skip2lora_output_layer"),
])
def test_config_errors_name_the_key(kw, match):
    with pytest.raises(ValueError, match=match):
        Config(**{**TINY, **kw})


def test_sequence_longer_than_block_size_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        _model()(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors", ".ckpt"])
def test_load_pretrained_into_adapted_model(tmp_path, suffix):
    base = _model(seed=3)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in base.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    elif suffix == ".ckpt":
        torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()},
                    "hyper_parameters": {"config": Config(**TINY)}}, path)
    else:
        torch.save(state, path)
    adapted = _model(seed=4, lora_query=True, lora_head=True, skip2lora_enabled=True)
    loaded = load_pretrained(adapted, path)
    assert "blocks.0.attn.query.base.weight" in loaded and "lm_head.base.weight" in loaded
    idx = torch.randint(0, 256, (2, 9))
    torch.testing.assert_close(adapted(idx), base(idx), rtol=1e-6, atol=1e-6)  # adapters start at zero
    assert lora_state_dict(adapted)  # adapters untouched, still present


def test_load_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_pretrained(_model(), tmp_path / "nope.ckpt")
    other = Config(**{**TINY, "n_embd": 32})
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in GPT(other).state_dict().items()},
                "hyper_parameters": {"config": other}}, path)
    with pytest.raises(ValueError, match="n_embd: checkpoint 32 vs config 16"):
        load_pretrained(_model(), path)
    partial = {k: v for k, v in _model().state_dict().items() if not k.startswith("blocks.2.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(KeyError, match="missing.*blocks.2"):
        load_pretrained(_model(), tmp_path / "partial.pt")


def test_generate_greedy_and_sampled():
    model = _model(skip2lora_enabled=True)
    _randomise_adapters(model)
    prompt = torch.randint(0, 256, (2, 5))
    greedy = model.generate(prompt, 4, temperature=0)
    assert greedy.shape == (2, 9) and torch.equal(greedy[:, :5], prompt)
    assert torch.equal(greedy[:, 5], model(prompt)[:, -1].argmax(-1))
    assert torch.equal(model.generate(greedy[:, :6], 3, temperature=0), greedy)  # greedy is consistent
    a = model.generate(prompt, 40, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, model.generate(prompt, 40, temperature=0))  # top-1 sampling is greedy
    long = model.generate(torch.zeros(1, 30, dtype=torch.long), 10)  # beyond block_size=32: window slides
    assert long.shape == (1, 40)


def test_skip2lora_branches_are_saved_under_their_block_index():
    """Branches for blocks [1, 3] are saved as skip2lora.1.* and skip2lora.3.*; a model whose branches read other
    blocks cannot load them silently, while the same selection loads exactly."""
    cfg = dict(TINY, n_layer=4, skip2lora_enabled=True, skip2lora_r=2)
    src = _model(**cfg, skip2lora_block_indices=[1, 3])
    _randomise_adapters(src)
    state = src.state_dict()
    assert sorted(k for k in state if k.startswith("skip2lora.")) == [
        "skip2lora.1.lora_A", "skip2lora.1.lora_B", "skip2lora.3.lora_A", "skip2lora.3.lora_B"]
    same = _model(seed=1, **cfg, skip2lora_block_indices=[-3, -1])  # the same blocks, written from the end
    same.load_state_dict(state)
    idx = torch.randint(0, 256, (2, 8))
    assert torch.equal(same(idx), src(idx))
    other = _model(**cfg, skip2lora_block_indices=[0, 1])
    with pytest.raises(RuntimeError, match=r"(?s)skip2lora\.0\..*skip2lora\.3\."):
        other.load_state_dict(state)
