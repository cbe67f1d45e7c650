"""Skip-Cache: storage, budget, precision error (measured), refusals, and cached == uncached training."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules.text import TextDataModule
from lightning_modules.gpt import GPTLanguageModel
from models.cache.skip_cache import RELATIVE_ROUNDING_ERROR, SkipCache, SkipCacheRefused, check_cacheable
from models.lm.gpt import GPT, Config

TINY = dict(n_layer=3, n_head=2, n_embd=16, block_size=32, vocab_size=256)
SKIP = dict(TINY, skip2lora_enabled=True, skip2lora_block_indices=[0, -1], skip2lora_r=4, skip2lora_alpha=8.0)


def _features(n: int, seed: int = 0, scale: float = 3.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"final": torch.randn(n, 5, 4, generator=g) * scale, "skip": torch.randn(n, 2, 5, 4, generator=g) * scale}


SHAPES = {"final": (5, 4), "skip": (2, 5, 4)}


def test_put_get_and_partial_lookup():
    cache = SkipCache(10, SHAPES)
    feats = _features(10)
    keys = torch.tensor([7, 2, 9])
    cache.put(keys, {k: v[keys] for k, v in feats.items()})
    assert len(cache) == 3 and torch.equal(cache.get(keys)["skip"], feats["skip"][keys])
    asked = []

    def compute(pos):
        asked.append(pos.tolist())
        return {k: v[batch][pos] for k, v in feats.items()}

    batch = torch.tensor([2, 4, 9, 0])
    out = cache.lookup(batch, compute)
    assert asked == [[1, 3]]  # only the missing positions were computed
    assert torch.equal(out["final"], feats["final"][batch]) and (cache.hits, cache.misses) == (2, 2)
    assert cache.hit_rate == 0.5 and len(cache) == 5
    with pytest.raises(IndexError, match="range"):
        cache.get(torch.tensor([10]))
    with pytest.raises(KeyError, match="not cached"):
        cache.get(torch.tensor([1]))


def test_budget_refuses_before_filling_or_goes_to_disk(tmp_path):
    need_mb = 1000 * (20 + 40) * 4 / 2**20
    with pytest.raises(MemoryError, match="over the budget.*cache_dir"):
        SkipCache(1000, SHAPES, max_memory_mb=need_mb / 2)
    cache = SkipCache(1000, SHAPES, max_memory_mb=need_mb / 2, cache_dir=tmp_path / "cache", tag="rank0_")
    assert cache.storage == "disk" and all(f.is_file() for f in cache.files)
    assert sum(f.stat().st_size for f in cache.files) == cache.nbytes
    feats = _features(1000)
    keys = torch.arange(1000)
    cache.put(keys, feats)
    assert torch.equal(cache.get(keys)["final"], feats["final"])
    cache.close()
    assert not any((tmp_path / "cache").iterdir())
    assert SkipCache(10, SHAPES, max_memory_mb=need_mb).storage == "memory"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_storage_error_is_bounded_and_measured(dtype, tmp_path):
    feats = _features(50, scale=10.0)
    keys = torch.arange(50)
    for storage in ("memory", "disk"):
        cache = SkipCache(50, SHAPES, dtype=dtype, storage=storage, cache_dir=tmp_path)
        cache.put(keys, feats)
        got = cache.get(keys)["final"]
        rel = ((got - feats["final"]).abs() / feats["final"].abs()).max().item()
        assert 0 < rel <= RELATIVE_ROUNDING_ERROR[dtype]
        assert cache.nbytes == 50 * 60 * 2
        cache.close()
    # Effect on the model's loss: float32 features vs features stored in `dtype`.
    torch.manual_seed(0)
    model = GPT(Config(**SKIP)).eval()
    idx = torch.randint(0, 256, (4, 16))
    exact = model.forward_backbone(idx)
    cache = SkipCache(4, {k: tuple(v.shape[1:]) for k, v in exact.items()}, dtype=dtype)
    cache.put(torch.arange(4), exact)
    labels = torch.randint(0, 256, (4, 16))
    def loss(f):
        return F.cross_entropy(model.forward_from_cache(f).flatten(0, 1), labels.flatten()).item()
    assert abs(loss(cache.get(torch.arange(4))) - loss(exact)) < 50 * RELATIVE_ROUNDING_ERROR[dtype]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_filling_epoch_returns_exactly_what_later_epochs_read(dtype):
    """The all-miss batch (epoch 1) skips the copy into a new batch tensor: its rows must still be the stored
    (rounded) values, so epoch 1 trains on the same features as epochs 2+, and carry no autograd graph."""
    feats = {k: v.requires_grad_() for k, v in _features(6, scale=10.0).items()}
    cache = SkipCache(6, SHAPES, dtype=dtype)
    batches = [torch.tensor([4, 1, 5]), torch.tensor([0, 2, 3])]
    first = [cache.lookup(keys, lambda pos, keys=keys: {k: v[keys][pos] * 1.0 for k, v in feats.items()})
             for keys in batches]
    for keys, out in zip(batches, first):
        again = cache.lookup(keys, lambda pos: pytest.fail("a filled row was recomputed"))
        for name in SHAPES:
            assert out[name].dtype == torch.float32 and not out[name].requires_grad
            assert torch.equal(out[name], again[name])
    if dtype == "float32":
        assert torch.equal(first[0]["skip"], feats["skip"][batches[0]].detach())


def test_float16_overflow_is_refused():
    cache = SkipCache(2, SHAPES, dtype="float16")
    feats = _features(2)
    feats["final"][0, 0, 0] = 1e6
    with pytest.raises(OverflowError, match="bfloat16"):
        cache.put(torch.arange(2), feats)


@pytest.mark.parametrize("change,reason", [
    (dict(lora_query=True), "standard LoRA is enabled upstream.*blocks.0.attn.query"),
    (dict(dropout=0.1), "dropout is active in the frozen path"),
    ("unfreeze_block", "trainable.*blocks.1"),
    ("unfreeze_embedding", "trainable.*wte.weight"),
    ("pretraining", "trainable"),
])
def test_refusals_name_the_reason(change, reason):
    cfg = dict(SKIP, **change) if isinstance(change, dict) else dict(SKIP)
    if change == "pretraining":
        cfg = dict(TINY)
    if isinstance(change, dict):
        with pytest.raises(SkipCacheRefused, match=reason):
            GPTLanguageModel(Config(**cfg), skip_cache=True)
        return
    model = GPT(Config(**cfg))
    if change == "unfreeze_block":
        model.blocks[1].mlp.requires_grad_(True)
    elif change == "unfreeze_embedding":
        model.wte.requires_grad_(True)
    with pytest.raises(SkipCacheRefused, match=reason):
        check_cacheable(model.backbone_modules())


def test_downstream_training_is_allowed():
    GPTLanguageModel(Config(**SKIP, lora_head=True), skip_cache=True)
    GPTLanguageModel(Config(**SKIP), skip_cache=True, train_head=True)
    model = GPT(Config(**dict(SKIP, dropout=0.1))).eval()
    check_cacheable(model.backbone_modules())  # dropout inactive in eval mode


@pytest.mark.parametrize("train_head", [False, True])
def test_cached_equals_uncached_losses_and_gradients_over_two_epochs(train_head):
    torch.manual_seed(0)
    data = torch.randint(0, 256, (12, 17))
    models = []
    for _ in range(2):
        torch.manual_seed(1)
        m = GPT(Config(**SKIP))
        m.lm_head.requires_grad_(train_head)
        models.append(m)
    cached, plain = models
    cache = SkipCache(len(data), {"final": (16, 16), "skip": (2, 16, 16)})
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in models]
    g = torch.Generator().manual_seed(0)
    for epoch in range(2):
        cache.reset_stats()
        for keys in torch.randperm(len(data), generator=g).split(4):
            x, y = data[keys, :-1], data[keys, 1:]
            feats = cache.lookup(keys, lambda pos: cached.forward_backbone(x[pos]))
            losses = [F.cross_entropy(cached.forward_from_cache(feats).flatten(0, 1), y.flatten()),
                      F.cross_entropy(plain(x).flatten(0, 1), y.flatten())]
            for loss, opt in zip(losses, opts):
                opt.zero_grad()
                loss.backward()
            torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-5)
            grads = [[p.grad for p in m.parameters() if p.requires_grad] for m in models]
            assert len(grads[0]) == (5 if train_head else 4)  # + lm_head.weight
            assert any(a.abs().sum() > 0 for a in grads[0])  # (A's gradient is zero while B is still zero)
            for a, b in zip(*grads):
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            for opt in opts:
                opt.step()
        assert cache.hit_rate == (0.0 if epoch == 0 else 1.0)


def _fit(skip_cache: bool, tmp_path, **model_kw) -> tuple[GPTLanguageModel, L.Trainer]:
    L.seed_everything(0)
    dm = TextDataModule(include=["json/**"], seq_len=16, batch_size=8, max_windows=24)
    model = GPTLanguageModel(Config(**SKIP), skip_cache=skip_cache, lr=1e-2, **model_kw)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=1)
    trainer.fit(model, dm)
    return model, trainer


def test_lightning_fit_with_cache_matches_without(tmp_path):
    cached, trainer = _fit(True, tmp_path)
    assert trainer.callback_metrics["skip_cache/hit_rate"] == 1.0  # epoch 2 never ran the backbone
    assert trainer.callback_metrics["skip_cache/filled"] == 24
    assert "time/train_epoch_s" in trainer.callback_metrics and cached.cache is None  # freed at fit end
    plain, _ = _fit(False, tmp_path)
    for (n, a), b in zip(cached.model.skip2lora.named_parameters(), plain.model.skip2lora.parameters()):
        assert "lora_A" in n or a.abs().sum() > 0  # B moved away from its zero init
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_lightning_disk_cache_in_bfloat16(tmp_path):
    model, trainer = _fit(True, tmp_path, cache_dtype="bfloat16", cache_storage="disk",
                          cache_dir=str(tmp_path / "skipcache"))
    assert trainer.callback_metrics["skip_cache/hit_rate"] == 1.0
    assert not any((tmp_path / "skipcache").iterdir())  # files removed at fit end


def test_lightning_over_budget_fails_before_the_first_step(tmp_path):
    dm = TextDataModule(include=["json/**"], seq_len=16, batch_size=8, max_windows=24)
    model = GPTLanguageModel(Config(**SKIP), skip_cache=True, cache_max_memory_mb=0.01)
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(MemoryError, match=r"needs 0.1 MiB \(24 samples.*over the budget of 0.01 MiB"):
        trainer.fit(model, dm)
    assert trainer.global_step == 0


def test_two_caches_sharing_a_cache_dir_keep_their_own_files_and_crash_leftovers_go(tmp_path):
    """Same cache_dir, same tag: each cache has its own folder; closing one leaves the other intact; a folder
    left by a dead process (SIGKILL) is deleted when the next cache starts."""
    import os
    import socket

    a = SkipCache(4, SHAPES, cache_dir=tmp_path, storage="disk", tag="rank0_", fingerprint="x")
    b = SkipCache(4, SHAPES, cache_dir=tmp_path, storage="disk", tag="rank0_", fingerprint="x")
    assert a.folder != b.folder and not set(a.files) & set(b.files)
    feats = _features(4)
    b.put(torch.arange(4), feats)
    a.close()
    assert not a.folder and all(f.is_file() for f in b.files)
    assert torch.equal(b.get(torch.arange(4))["final"], feats["final"])
    host = socket.gethostname().replace("-", "_")
    dead = 2**22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f"skipcache-{host}-{dead}-deadbeef"
    stale.mkdir()
    (stale / "rank0_final.float32.bin").write_bytes(b"0" * 16)
    live = tmp_path / f"skipcache-{host}-{os.getppid()}-cafecafe"  # a live process: kept
    live.mkdir()
    c = SkipCache(4, SHAPES, cache_dir=tmp_path, storage="disk")
    assert not stale.exists() and live.exists() and all(f.is_file() for f in b.files)
    b.close()
    c.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


def test_stale_cache_is_refused_when_frozen_weights_change():
    from models.cache.skip_cache import SkipCacheStale, weights_fingerprint

    model = GPT(Config(**SKIP))
    fp = weights_fingerprint(model.backbone_modules())
    cache = SkipCache(4, SHAPES, fingerprint=fp)
    cache.put(torch.arange(2), {k: v[:2] for k, v in _features(4).items()})
    cache.check_fingerprint(weights_fingerprint(model.backbone_modules()))  # unchanged: fine
    with torch.no_grad():
        model.blocks[1].attn.query.weight[0, 0] += 1e-3
    with pytest.raises(SkipCacheStale, match="frozen weights changed"):
        cache.check_fingerprint(weights_fingerprint(model.backbone_modules()))
