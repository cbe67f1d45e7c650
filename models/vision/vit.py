"""timm ViT backbones built offline: weights only ever come from a local file."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn


def create_vit(
    name: str = "vit_tiny_patch16_224",
    img_size: int | tuple[int, int] = 224,
    in_chans: int = 3,
    pretrained_file: str | Path | None = None,
    patch_size: int | None = None,
    num_classes: int = 0,
    **kwargs: Any,
) -> nn.Module:
    """Build a timm ViT by name without touching the network.

    Args:
        name: any timm model name (``vit_tiny_patch16_224``, ``vit_small_patch16_dinov3``, ...).
        img_size: input resolution; position embeddings are resampled when loading weights.
        in_chans: input channels; with weights, timm adapts the RGB patch filters (repeated and rescaled).
        pretrained_file: local ``.safetensors``/``.pth``/``.bin`` weights; ``None`` = random init.
        patch_size: override the patch size (weights' patch filters are resampled by timm).
        num_classes: classifier width; 0 = features only (``forward_head`` returns pooled features).

    Raises:
        ValueError: unknown model name or unloadable ``pretrained_file``. FileNotFoundError: it is missing.
    """
    if not timm.is_model(name):
        raise ValueError(unknown_model_message(name))
    extra: dict[str, Any] = dict(kwargs)
    if patch_size is not None:
        extra["patch_size"] = patch_size
    if pretrained_file is not None:
        path = Path(pretrained_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrained_file {str(path)!r} does not exist; adaptlab never downloads weights. "
                "Put the timm weights there or set pretrained_file: null for random init."
            )
        # custom_load=False: timm's standard loader (safetensors or torch, checkpoint filter); some default tags of
        # older timm releases point at a JAX .npz loader instead
        extra.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(path), custom_load=False))
        try:
            return timm.create_model(name, img_size=img_size, in_chans=in_chans, num_classes=num_classes, **extra)
        except Exception as e:
            raise ValueError(f"pretrained_file {str(path)!r} could not be loaded into {name}: {e}") from e
    return timm.create_model(name, img_size=img_size, in_chans=in_chans, num_classes=num_classes, **extra)


def unknown_model_message(name: str) -> str:
    """Why ``name`` is not a timm model, with the closest timm names (by spelling, else by the longest word of
    ``name`` that timm names contain: ``facebook/dinov3-vits16-pretrain-lvd1689m`` -> the ``*dinov3*`` models)."""
    names = timm.list_models()
    key = name.rsplit("/", 1)[-1].lower().replace("-", "_")
    close = difflib.get_close_matches(key, names, n=5, cutoff=0.6)
    for word in sorted(set(re.split(r"[^a-z0-9]+", key)), key=lambda w: (-len(w), w)):
        hits = [n for n in names if word in n] if len(word) >= 4 and not close else []
        if hits:
            close = hits[:8]
            break
    msg = f"unknown timm model {name!r}"
    if "/" in name:
        msg += (" (a Hugging Face repository id? pretrained_model_name takes a timm model name, and the weights "
                "come from a local file, backbone.pretrained_file; see the README's TrackNet section)")
    return msg + (f"; did you mean: {', '.join(close)}" if close else "; list them with timm.list_models('*vit*')")


def freeze(module: nn.Module) -> nn.Module:
    """Set ``requires_grad=False`` on every parameter; returns the module."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def embed_dim(model: nn.Module) -> int:
    """Feature width of a timm ViT (``num_features``)."""
    return int(getattr(model, "num_features", getattr(model, "embed_dim")))


@torch.no_grad()
def feature_shape(model: nn.Module, img_size: int | tuple[int, int], in_chans: int = 3) -> torch.Size:
    """Shape of ``forward_features`` on one dummy image (handy for sizing decoders)."""
    hw = (img_size, img_size) if isinstance(img_size, int) else img_size
    return model.forward_features(torch.zeros(1, in_chans, *hw)).shape
