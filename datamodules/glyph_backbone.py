"""adaptlab's offline pre-trained ViT: a timm backbone trained on the glyph pre-training pool, built once and cached.

The continual-learning sequence (``ClassIncrementalDataModule(dataset="glyphs")``) draws its classes from the
glyph *sequence* pool; this backbone is trained on the disjoint *pre-training* pool (``datamodules.glyphs``),
so the continual run starts, as SEMA and Nested LoRA assume, from a backbone pre-trained on other data.

``ensure_glyph_backbone`` returns ``<cache_dir>/<backbone>-<key>/backbone.safetensors``, building it first
when it is missing (renders the pool, trains with ``models.vision.pretrain.pretrain_classifier``, progress
bars on the console, written atomically). The key hashes everything the weights depend on: the timm model
name and its keyword arguments, input and patch size, every :class:`GlyphPretraining` setting except
``cache_dir``, the pool's characters and the font files. ``settings.json`` beside the weights records them
with the held-out accuracy on the pre-training classes. The file is a plain timm state dict, loaded through
the ordinary ``pretrained_file`` path. Rebuild (or build elsewhere) with

    python -m datamodules.glyph_backbone --config configs/sema_nested.yaml
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from datamodules.glyphs import fonts_digest, pool_classes, render_pool
from models.utils.atomic import atomic_path
from models.utils.command_line import config_init_args, errors_as_one_line
from models.vision.pretrain import accuracy, pretrain_classifier
from models.vision.vit import create_vit

#: Bumped whenever the recipe changes in a way the settings do not capture.
RECIPE_VERSION = 2


@dataclass
class GlyphPretraining:
    """How adaptlab's offline backbone is pre-trained on the glyph pre-training pool.

    Args:
        classes: classes taken from the pre-training pool (``None``: all of it).
        images_per_class: rendered images per class (10% of them are held out to report accuracy).
        steps: optimizer steps.
        batch_size: images per step.
        lr: peak AdamW learning rate (linear warm-up over 10% of the steps, cosine decay).
        weight_decay: AdamW weight decay of the matrices.
        label_smoothing: cross-entropy label smoothing.
        seed: seed of the rendering, the head initialisation and the batch order.
        threads: torch CPU threads while pre-training (1 is fastest on a busy 2-core machine).
        cache_dir: folder holding one sub-folder per built backbone.
    """

    classes: int | None = None
    images_per_class: int = 100
    steps: int = 2000
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    seed: int = 0
    threads: int = 1
    cache_dir: str = "data/glyph_vit"

    def __post_init__(self) -> None:
        for key in ("images_per_class", "steps", "batch_size", "threads"):
            if getattr(self, key) <= 0:
                raise ValueError(f"pretrain.{key} must be positive, got {getattr(self, key)}")
        if self.classes is not None and self.classes < 2:
            raise ValueError(f"pretrain.classes must be >= 2 (or null for the whole pool), got {self.classes}")
        if self.lr <= 0:
            raise ValueError(f"pretrain.lr must be positive, got {self.lr}")


def backbone_settings(backbone: str, img_size: int, patch_size: int | None, backbone_kwargs: dict[str, Any] | None,
                      cfg: GlyphPretraining) -> dict[str, Any]:
    """Everything the weights depend on (the cache key is its hash)."""
    training = {k: v for k, v in asdict(cfg).items() if k != "cache_dir"}
    return {
        "recipe_version": RECIPE_VERSION, "backbone": backbone, "img_size": img_size, "patch_size": patch_size,
        "backbone_kwargs": dict(sorted((backbone_kwargs or {}).items())), "pretrain": training,
        "classes": "".join(pool_classes("pretrain", cfg.classes)), "fonts_sha256": fonts_digest(),
    }


def backbone_path(backbone: str, img_size: int, patch_size: int | None, backbone_kwargs: dict[str, Any] | None,
                  cfg: GlyphPretraining) -> Path:
    settings = backbone_settings(backbone, img_size, patch_size, backbone_kwargs, cfg)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cfg.cache_dir).expanduser() / f"{backbone}-{key}" / "backbone.safetensors"


def ensure_glyph_backbone(backbone: str, img_size: int, patch_size: int | None,
                          backbone_kwargs: dict[str, Any] | None, cfg: GlyphPretraining,
                          progress: bool = True) -> Path:
    """The cached backbone file for these settings, built first when it is missing. The global random state
    is left as it was, so a run draws the same adapters whether or not it had to build the backbone."""
    path = backbone_path(backbone, img_size, patch_size, backbone_kwargs, cfg)
    if path.is_file():
        return path
    with torch.random.fork_rng(devices=[]):
        _build(path, backbone, img_size, patch_size, backbone_kwargs, cfg, progress)
    return path


def _build(path: Path, backbone: str, img_size: int, patch_size: int | None, backbone_kwargs: dict[str, Any] | None,
           cfg: GlyphPretraining, progress: bool) -> None:
    from safetensors.torch import save_file

    settings = backbone_settings(backbone, img_size, patch_size, backbone_kwargs, cfg)
    print(f"[glyph backbone] building {path} (once; reused while its settings are unchanged)", flush=True)
    t0 = time.perf_counter()
    x, y, chars = render_pool("pretrain", cfg.classes, cfg.images_per_class, img_size, cfg.seed, progress)
    held = torch.arange(len(y)) % 10 == 9  # every 10th image of each class is held out
    torch.manual_seed(cfg.seed)
    model = create_vit(backbone, img_size, patch_size=patch_size, **(backbone_kwargs or {}))
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        head = pretrain_classifier(model, x[~held], y[~held], len(chars), cfg.steps, cfg.batch_size, cfg.lr,
                                   cfg.weight_decay, label_smoothing=cfg.label_smoothing, seed=cfg.seed,
                                   progress=progress)
    finally:
        torch.set_num_threads(threads)
    settings["heldout_acc"] = accuracy(model, head, x[held], y[held], (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    settings["train_acc"] = accuracy(model, head, x[~held][:2000], y[~held][:2000], (0.485, 0.456, 0.406),
                                     (0.229, 0.224, 0.225))
    settings["build_seconds"] = round(time.perf_counter() - t0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    with atomic_path(path.with_name("settings.json")) as tmp:
        tmp.write_text(json.dumps(settings, indent=2, ensure_ascii=False))
    print(f"[glyph backbone] done in {settings['build_seconds']} s: {len(chars)} classes, held-out accuracy "
          f"{100 * settings['heldout_acc']:.1f}% (train {100 * settings['train_acc']:.1f}%)", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Build (or find) the backbone a continual config asks for and print its path."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--config", required=True, help="a continual config with model.init_args.pretrain")
    args = p.parse_args(argv)
    with errors_as_one_line(OSError, ValueError, TypeError):
        model = config_init_args(args.config, "model")
        if not model.get("pretrain"):
            raise ValueError(f"{args.config} has no model.init_args.pretrain")
        cfg = GlyphPretraining(**model["pretrain"])
    print(ensure_glyph_backbone(model.get("backbone", "vit_tiny_patch16_224"), model.get("img_size", 32),
                                model.get("patch_size", 8), model.get("backbone_kwargs"), cfg))


if __name__ == "__main__":
    main()
