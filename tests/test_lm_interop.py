"""Checkpoint interop of the GPT: Hugging Face GPT-2 folders (against transformers' GPT2LMHeadModel, when
installed), LitGPT folders (against a reference forward written from LitGPT's layout), the tokenizer round trip,
export of a trained LoRA checkpoint, and convert_to_phase1 from a loaded GPT-2."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from models.lm.gpt import GPT, Config, load_backbone_state
from models.lm.interop import InteropError, load_gpt, main, read_litgpt, write_hf_gpt2, write_litgpt
from models.lm.phase1 import Phase1Config, convert_to_phase1


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is fastest and fair to the other jobs on the machine."""


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random (norm scales and biases too), so a swapped or transposed tensor shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _hf_reference(tmp_path, tie=True):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=300, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie)
    torch.manual_seed(0)
    ref = transformers.GPT2LMHeadModel(cfg).eval()
    _randomise(ref)
    if tie:
        assert ref.lm_head.weight.data_ptr() == ref.transformer.wte.weight.data_ptr()
    ref.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    return transformers, ref


def _ids(vocab=300, n=20):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tie", [True, False])
def test_hf_gpt2_loads_with_equal_logits_and_exports_back(tmp_path, tie):
    transformers, ref = _hf_reference(tmp_path, tie)
    ours = load_gpt(tmp_path / "hf").eval()
    assert ours.config.position == "learned" and ours.config.gelu_approximate == "tanh"
    idx = _ids()
    with torch.no_grad():
        expected = ref(idx).logits
        torch.testing.assert_close(ours(idx), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a fine-tune moves our head away from the embedding: the export unties it
        ours.lm_head.weight.add_(0.01 * torch.randn_like(ours.lm_head.weight))
    write_hf_gpt2(ours, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, ours(idx), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(back(idx).logits, expected, atol=1e-3)  # the change really travelled


def test_hf_export_of_a_tied_model_round_trips_through_our_loader(tmp_path):
    pytest.importorskip("transformers")
    _hf_reference(tmp_path)
    ours = load_gpt(tmp_path / "hf").eval()
    write_hf_gpt2(ours, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["tie_word_embeddings"] is True
    again = load_gpt(tmp_path / "again").eval()
    idx = _ids()
    with torch.no_grad():
        assert torch.equal(again(idx), ours(idx))


def test_tokenizer_round_trip_through_an_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    from datamodules.tokenization import HFTokenizer, train_bpe

    text = ["def add(a, b):\n    return a + b\n", "héllo wörld, naïve café\n", "class A:\n    pass\n"] * 20
    tok_path = train_bpe(text, 300, tmp_path / "tok.json", min_frequency=1)
    ours = HFTokenizer(tok_path)
    assert ours.vocab_size <= 300 and ours.separator == 0
    model = GPT(Config(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=300, position="learned"))
    write_hf_gpt2(model, tmp_path / "out", tokenizer=tok_path)
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "out" / "tokenizer.json"))
    sample = "def café(x):\n    return 'ü' + x  # ünïcode\n"
    ids = ours.encode(sample)
    assert ids.tolist() == theirs(sample, add_special_tokens=False)["input_ids"]
    assert ours.decode(ids) == sample == theirs.decode(ids.tolist())


def _lit_reference(state: dict, cfg: dict, idx: torch.Tensor) -> torch.Tensor:
    """A forward pass over a LitGPT state dict, from LitGPT's published layout: qkv rows = all queries, then all
    keys, then all values; rotate-half rotary embeddings on the whole head; pre-norm sequential residuals."""
    C, H = cfg["n_embd"], cfg["n_head"]
    hs = C // H
    T = idx.shape[1]
    theta = 1.0 / cfg["rope_base"] ** (torch.arange(0, hs, 2).float() / hs)
    ang = torch.outer(torch.arange(T).float(), theta).repeat(1, 2)
    cos, sin = ang.cos(), ang.sin()

    def rope(x):
        x1, x2 = x[..., : hs // 2], x[..., hs // 2:]
        return x * cos + torch.cat((-x2, x1), -1) * sin

    def norm(x, prefix):
        if cfg["norm_class_name"] == "RMSNorm":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg["norm_eps"]) * state[prefix + ".weight"]
        return F.layer_norm(x, (C,), state[prefix + ".weight"], state.get(prefix + ".bias"), cfg["norm_eps"])

    x = state["transformer.wte.weight"][idx]
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        qkv = F.linear(norm(x, p + "norm_1"), state[p + "attn.qkv.weight"], state.get(p + "attn.qkv.bias"))
        q, k, v = (t.view(2, T, H, hs).transpose(1, 2) for t in qkv.split(C, -1))
        y = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True).transpose(1, 2).reshape(2, T, C)
        x = x + F.linear(y, state[p + "attn.proj.weight"], state.get(p + "attn.proj.bias"))
        h = norm(x, p + "norm_2")
        if cfg["mlp_class_name"] == "LLaMAMLP":
            a = F.silu(F.linear(h, state[p + "mlp.fc_1.weight"], state.get(p + "mlp.fc_1.bias")))
            h = a * F.linear(h, state[p + "mlp.fc_2.weight"], state.get(p + "mlp.fc_2.bias"))
        else:
            h = F.gelu(F.linear(h, state[p + "mlp.fc.weight"], state.get(p + "mlp.fc.bias")),
                       approximate=cfg["gelu_approximate"])
        x = x + F.linear(h, state[p + "mlp.proj.weight"], state.get(p + "mlp.proj.bias"))
    return F.linear(norm(x, "transformer.ln_f"), state["lm_head.weight"])


@pytest.mark.parametrize("arch", [dict(), dict(norm_class="RMSNorm", mlp_class="LLaMAMLP", bias=False),
                                  dict(gelu_approximate="tanh", bias=False)])
def test_litgpt_export_matches_the_litgpt_layout_and_loads_back(tmp_path, arch):
    import yaml

    from models.utils.checkpoint import safe_load

    model = GPT(Config(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=96, **arch)).eval()
    _randomise(model, seed=3)
    write_litgpt(model, tmp_path / "lit")
    state = safe_load(tmp_path / "lit" / "lit_model.pth", what="test")
    cfg = yaml.safe_load((tmp_path / "lit" / "model_config.yaml").read_text())
    assert state["transformer.h.0.attn.qkv.weight"].shape == (96, 32)
    assert cfg["n_query_groups"] == 4 and cfg["rotary_percentage"] == 1.0 and not cfg["parallel_residual"]
    idx = _ids(96)
    with torch.no_grad():
        expected = model(idx)
        torch.testing.assert_close(_lit_reference(state, cfg, idx), expected, rtol=1e-5, atol=1e-5)
        back = load_gpt(tmp_path / "lit").eval()
        assert torch.equal(back(idx), expected)


def test_foreign_features_are_refused_with_the_field_named(tmp_path):
    rotary = GPT(Config(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64))
    with pytest.raises(InteropError, match="config.position='rotary' cannot be written as GPT-2"):
        write_hf_gpt2(rotary, tmp_path / "x")
    learned = GPT(Config(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64, position="learned"))
    with pytest.raises(InteropError, match="config.position='learned' cannot be written as LitGPT"):
        write_litgpt(learned, tmp_path / "y")
    write_litgpt(rotary, tmp_path / "lit")
    cfg_path = tmp_path / "lit" / "model_config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace("n_query_groups: 2", "n_query_groups: 1"))
    with pytest.raises(InteropError, match="n_query_groups=1"):
        read_litgpt(tmp_path / "lit")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InteropError, match="model_type 'llama' is not 'gpt2'"):
        load_gpt(tmp_path / "hf")
    lora = GPT(Config(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=64, lora_query=True))
    with pytest.raises(InteropError, match="merge LoRA first"):
        write_litgpt(lora, tmp_path / "z")


def test_lora_checkpoint_exports_merged_and_adapters_only(tmp_path, capsys):
    """A trained LoRA checkpoint: the merged export computes what the adapted model computes; the adapter-only
    export holds only the adapters and rebuilds the same model on the base weights."""
    from safetensors.torch import load_file

    base = GPT(Config(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=64)).eval()
    _randomise(base, seed=5)
    cfg = Config(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=64, lora_query=True, lora_value=True,
                 lora_r=2)
    adapted = GPT(cfg).eval()
    load_backbone_state(adapted, base.state_dict())
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in adapted.state_dict().items()},
                "hyper_parameters": {"config": cfg}}, ckpt)
    idx = _ids(64, 12)
    with torch.no_grad():
        expected = adapted(idx)
    main(["--ckpt", str(ckpt), "--to", "litgpt", "--out", str(tmp_path / "lit")])
    assert "wrote" in capsys.readouterr().out
    merged = load_gpt(tmp_path / "lit").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(idx), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(base(idx), expected, atol=1e-3)  # the adapters do change the output
    main(["--ckpt", str(ckpt), "--to", "merged", "--out", str(tmp_path / "merged")])
    assert not json.loads((tmp_path / "merged" / "adaptlab_config.json").read_text())["lora_query"]
    with torch.no_grad():
        torch.testing.assert_close(load_gpt(tmp_path / "merged").eval()(idx), expected, rtol=1e-5, atol=1e-5)
    main(["--ckpt", str(ckpt), "--to", "adapters", "--out", str(tmp_path / "ad")])
    tensors = load_file(str(tmp_path / "ad" / "adapters.safetensors"))
    assert tensors and all(".adapters." in k for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == 2 * 2 * (2 * 16 * 2)  # 2 blocks x q,v x (A + B)
    rebuilt = GPT(Config(**json.loads((tmp_path / "ad" / "adaptlab_config.json").read_text()))).eval()
    load_backbone_state(rebuilt, base.state_dict())
    rebuilt.load_state_dict(tensors, strict=False)
    with torch.no_grad():
        assert torch.equal(rebuilt(idx), expected)
    with pytest.raises(SystemExit):  # an existing folder is never overwritten
        main(["--ckpt", str(ckpt), "--to", "adapters", "--out", str(tmp_path / "ad")])
    assert capsys.readouterr().err.startswith("error: --out")


def test_convert_to_phase1_from_a_loaded_gpt2_reports_every_group(tmp_path):
    pytest.importorskip("transformers")
    _hf_reference(tmp_path)
    gpt = load_gpt(tmp_path / "hf")
    phase1 = convert_to_phase1(gpt, Phase1Config(htt_enabled=False, bk_chunk_size=8, ar_ssm_max_rank=4,
                                                 ar_ssm_min_rank=2))
    report = phase1.conversion_report
    assert {"embed.weight", "blocks.0.mlp.fc.weight", "blocks.1.norm_mlp.bias", "ln_f.weight"} <= set(report.kept)
    assert 0 < report.approximated["blocks.*.mlp"] < 0.05  # GPT-2's tanh GELU -> Phase 1's exact GELU
    assert any(k.startswith("blocks.0.bk.") for k in report.new) and any(".ar_ssm." in k for k in report.new)
    assert {"wpe.weight", "blocks.0.attn.query.weight", "blocks.0.norm_1.weight"} <= set(report.dropped)
    assert phase1.config.vocab_size == 300 and phase1.config.tie_embeddings
    assert math.isfinite(float(phase1(_ids(300, 8)).sum()))


def test_gpt_module_fine_tunes_from_a_hf_folder_with_its_architecture(tmp_path):
    """``model.pretrained_path`` = a GPT-2 folder: the folder's architecture replaces the YAML's, LoRA options
    stay, the hyper-parameters record what was built, and the start is the reference model exactly."""
    _, ref = _hf_reference(tmp_path)
    from lightning_modules.gpt import GPTLanguageModel

    module = GPTLanguageModel(Config(lora_query=True, lora_value=True, lora_r=2), pretrained_path=str(tmp_path / "hf"))
    cfg = module.hparams.config
    assert (cfg.n_embd, cfg.vocab_size, cfg.position, cfg.gelu_approximate, cfg.lora_query) == (32, 300, "learned",
                                                                                               "tanh", True)
    assert module.trained_weights_source() == str(tmp_path / "hf")
    idx = _ids()
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(idx), ref(idx).logits, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_original_gpt2_layout_without_prefix_and_with_mask_buffers_loads(tmp_path):
    """OpenAI-era GPT-2 files: keys without ``transformer.``, causal-mask buffers, ``pytorch_model.bin``."""
    _, ref = _hf_reference(tmp_path)
    from safetensors.torch import load_file

    state = {k.removeprefix("transformer."): v for k, v in load_file(str(tmp_path / "hf/model.safetensors")).items()}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    (tmp_path / "old").mkdir()
    torch.save(state, tmp_path / "old" / "pytorch_model.bin")
    (tmp_path / "old" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    idx = _ids()
    with torch.no_grad():
        torch.testing.assert_close(load_gpt(tmp_path / "old").eval()(idx), ref(idx).logits, rtol=1e-5, atol=1e-5)


def test_cli_fine_tunes_lora_on_a_hf_folder_then_predicts_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    _hf_reference(tmp_path)
    from tests.cli_helpers import REPO, run_cli

    monkeypatch.chdir(tmp_path)
    args = ["--config", str(REPO / "configs/lora_gpt.yaml"), "--model.pretrained_path", str(tmp_path / "hf"),
            "--data.seq_len", "16", "--data.batch_size", "4", "--data.max_windows", "8", "--model.sample_tokens",
            "0", "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1"]
    fit = run_cli(["fit", *args, "--trainer.max_steps", "2"])
    assert fit.model.model.config.n_embd == 32 and fit.model.model.config.lora_enabled
    capsys.readouterr()
    run_cli(["predict", *args, "--ckpt_path", fit.trainer.checkpoint_callback.last_model_path,
             "--model.generation.max_new_tokens", "3"])
    assert "predictions written to" in capsys.readouterr().out
