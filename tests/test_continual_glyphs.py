"""Glyph data and the offline glyph-pretrained backbone: determinism, disjoint pools, cache keyed by settings."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from datamodules import glyphs
from datamodules.continual import ClassIncrementalDataModule
from datamodules.glyph_backbone import GlyphPretraining, backbone_path, ensure_glyph_backbone
from models.vision.vit import create_vit

TINY_VIT = dict(backbone="vit_tiny_patch16_224", img_size=16, patch_size=8,
                backbone_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2, "global_pool": "avg"})


def _tiny(tmp_path, **kw) -> GlyphPretraining:
    return GlyphPretraining(**{"classes": 4, "images_per_class": 4, "steps": 2, "batch_size": 8,
                               "cache_dir": str(tmp_path / "cache"), **kw})


def test_pools_are_disjoint_and_cover_the_deduplicated_classes():
    pools = glyphs.class_pools()
    seq, pre = set(pools["sequence"]), set(pools["pretrain"])
    assert not seq & pre
    assert len(seq) + len(pre) == len(glyphs.glyph_classes()) == len(set(glyphs.glyph_classes()))
    assert len(seq) >= 100 and len(pre) >= 100
    # Latin A and Greek Alpha draw the same glyph: only one of them is a class
    assert not {"A", "\u0391"} <= set(glyphs.glyph_classes())
    assert glyphs.pool_classes("sequence", 5) == pools["sequence"][:5]
    with pytest.raises(ValueError, match="sequence pool"):
        glyphs.pool_classes("sequence", len(seq) + 1)


def test_rendering_is_deterministic_and_independent_of_the_count():
    x1, y1, c1 = glyphs.render_pool("sequence", 3, 4, size=16, seed=0)
    x2, y2, c2 = glyphs.render_pool("sequence", 2, 2, size=16, seed=0)
    assert x1.dtype == torch.uint8 and x1.shape == (12, 3, 16, 16) and y1.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert torch.equal(x1.view(3, 4, 3, 16, 16)[:2, :2], x2.view(2, 2, 3, 16, 16))  # image (class, index) fixed
    assert torch.equal(x1, glyphs.render_pool("sequence", 3, 4, size=16, seed=0)[0])
    assert not torch.equal(x1, glyphs.render_pool("sequence", 3, 4, size=16, seed=1)[0])
    assert not torch.equal(x1[:4], glyphs.render_pool("pretrain", 1, 4, size=16, seed=0)[0])
    assert torch.equal(x1[:, 0], x1[:, 1]) and x1.float().std() > 10  # grey on three channels, not blank


def test_datamodule_serves_the_sequence_pool():
    dm = ClassIncrementalDataModule("glyphs", glyph_classes=6, glyph_images_per_class=10, init_cls=2, increment=2,
                                    image_size=16)
    assert dm.num_classes == 6 and dm.num_tasks == 3
    train = dm.task_dataset("train", 1)
    assert set(train.labels.tolist()) == {2, 3}
    n = sum(len(dm.task_dataset(s, t)) for s in ("train", "val", "test") for t in range(3))
    assert n == 60
    # the remapped label k is the pool's class order[k]: its images are the pool's renders of that class
    x, _, _ = glyphs.render_pool("sequence", 6, 10, size=16)
    k = int(dm.class_order[2])
    idx = (dm._sets["train"].labels == 2).nonzero()[0, 0]
    img = dm._sets["train"].images[idx]
    assert any(torch.equal(img, x[k * 10 + i]) for i in range(10))


def test_backbone_is_cached_keyed_by_settings_and_loads_through_pretrained_file(tmp_path):
    cfg = _tiny(tmp_path)
    path = ensure_glyph_backbone(cfg=cfg, progress=False, **TINY_VIT)
    assert path.is_file() and path.parent.parent == tmp_path / "cache"
    settings = json.loads(path.with_name("settings.json").read_text())
    assert settings["classes"] == "".join(glyphs.pool_classes("pretrain", 4))
    assert not set(settings["classes"]) & set(glyphs.class_pools()["sequence"])
    mtime = path.stat().st_mtime_ns
    assert ensure_glyph_backbone(cfg=cfg, progress=False, **TINY_VIT) == path and path.stat().st_mtime_ns == mtime
    # same settings, other cache folder name only: same key; any training or architecture change: another key
    assert backbone_path(cfg=dataclasses.replace(cfg, cache_dir=str(tmp_path / "c2")), **TINY_VIT).parent.name == \
        path.parent.name
    for other in (dataclasses.replace(cfg, steps=3), dataclasses.replace(cfg, seed=1),
                  dataclasses.replace(cfg, classes=5)):
        assert backbone_path(cfg=other, **TINY_VIT) != path
    assert backbone_path(cfg=cfg, **{**TINY_VIT, "patch_size": 4}) != path
    # the file is a plain timm state dict: the normal pretrained_file path loads it
    model = create_vit(TINY_VIT["backbone"], 16, pretrained_file=path, patch_size=8, **TINY_VIT["backbone_kwargs"])
    from safetensors.torch import load_file
    saved = load_file(str(path))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, saved[k], msg=k)


def test_rebuild_is_bit_identical(tmp_path):
    a = ensure_glyph_backbone(cfg=_tiny(tmp_path / "a"), progress=False, **TINY_VIT)
    b = ensure_glyph_backbone(cfg=_tiny(tmp_path / "b"), progress=False, **TINY_VIT)
    from safetensors.torch import load_file
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pretraining_learns_the_pretrain_classes(tmp_path, one_thread):
    """Overfit a small batch: the recipe's training loop reaches (near) perfect accuracy on what it saw."""
    from models.vision.pretrain import accuracy, pretrain_classifier

    x, y, _ = glyphs.render_pool("pretrain", 4, 4, size=16)
    torch.manual_seed(0)
    model = create_vit(TINY_VIT["backbone"], 16, patch_size=8, **TINY_VIT["backbone_kwargs"])
    head = pretrain_classifier(model, x, y, 4, steps=60, batch_size=16, lr=3e-3, weight_decay=0.0,
                               label_smoothing=0.0, progress=False)
    assert accuracy(model, head, x, y, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) == 1.0


@pytest.mark.parametrize("kw,key", [({"steps": 0}, "steps"), ({"classes": 1}, "classes"), ({"lr": 0}, "lr")])
def test_bad_pretraining_settings_are_named(kw, key):
    with pytest.raises(ValueError, match=f"pretrain.{key}"):
        GlyphPretraining(**kw)


def test_glyph_images_are_not_all_alike():
    """Every kept class differs from every other in most fonts (the deduplication rule), checked on a sample."""
    chars = glyphs.glyph_classes()[:40]
    g = np.stack([[glyphs._normalised_glyph(c, f) for f in range(len(glyphs.FONT_FILES))] for c in chars])
    diff = np.abs(g[:, None] - g[None]).mean(axis=(3, 4))  # (c, c, fonts)
    alike = (diff < glyphs.DEDUP_THRESHOLD).sum(-1) * 2 >= len(glyphs.FONT_FILES)
    assert not (alike & ~np.eye(len(chars), dtype=bool)).any()


def test_building_leaves_the_global_random_state_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ensure_glyph_backbone(cfg=_tiny(tmp_path), progress=False, **TINY_VIT)
    torch.testing.assert_close(torch.rand(3), expected)


def test_styles_share_the_glyph_and_shift_the_rendering():
    """inverted = the plain image's negative (same draws), shifted = tinted colour with texture; plain unchanged."""
    plain, _, _ = glyphs.render_pool("sequence", 2, 3, size=16, seed=0)
    inv, _, _ = glyphs.render_pool("sequence", 2, 3, size=16, seed=0, style="inverted")
    shifted, _, _ = glyphs.render_pool("sequence", 2, 3, size=16, seed=0, style="shifted")
    assert (plain.int() + inv.int() - 255).abs().max() <= 1
    assert not torch.equal(shifted[:, 0], shifted[:, 1])  # colour: channels differ
    # dark glyph on light background: the glyph's pixels (bright in plain) are darker than the rest
    g = plain[:, 0].float() > plain[:, 0].float().flatten(1).median(1).values[:, None, None]
    s = shifted.float().mean(1)
    assert all(s[i][g[i]].mean() < s[i][~g[i]].mean() for i in range(len(s)))
    with pytest.raises(ValueError, match="pre-training pool is rendered plain"):
        glyphs.render_pool("pretrain", 1, 1, style="shifted")
    with pytest.raises(ValueError, match="glyph style"):
        glyphs.render_glyph("a", np.random.default_rng(0), 16, style="sepia")


def test_multidomain_sequence_changes_domain_at_known_tasks():
    dm = ClassIncrementalDataModule("multidomain", domain_classes=(4, 2, 2, 2), glyph_images_per_class=10,
                                    init_cls=2, increment=2, image_size=16)
    assert dm.num_classes == 10 and dm.num_tasks == 5 and dm.domain_tasks == [0, 2, 3, 4]
    assert [dm.domain_of_task(t) for t in range(5)] == [0, 0, 1, 2, 3]
    order = dm.class_order  # permuted within each domain only
    assert sorted(order[:4]) == [0, 1, 2, 3] and sorted(order[4:6]) == [4, 5] and sorted(order[8:]) == [8, 9]
    x = dm._sets["train"].images if dm.setup() is None else None
    labels = dm._sets["train"].labels
    inverted = x[labels == 4].float().mean()  # dark-on-light glyphs are brighter on average than plain ones
    assert inverted > x[labels == 0].float().mean()
    assert set(dm.task_dataset("test", 4).labels.tolist()) == {8, 9}
    with pytest.raises(ValueError, match="inside a task"):
        ClassIncrementalDataModule("multidomain", domain_classes=(3, 3, 2, 2), init_cls=2, increment=2)
    with pytest.raises(ValueError, match="digits at most 10"):
        ClassIncrementalDataModule("multidomain", domain_classes=(3, 3, 2, 12))
