"""TrackNet-style heat-map tracker on a timm ViT (pure PyTorch).

Input: ``num_frames`` consecutive RGB frames stacked on channels, ``(B, 3 * num_frames, H, W)``.
The backbone is a timm ViT built with ``in_chans = 3 * num_frames``: the patch embedding is widened, and
when weights are loaded timm repeats the pretrained RGB filters for every frame and scales them by
``1 / num_frames`` (``timm.models.adapt_input_conv``), so a clip of identical frames gives the pretrained
features. The patch tokens (prefix/register tokens dropped) form a feature grid that the decoder
upsamples with ``conv3x3 + BN + ReLU`` stages; a ``1x1`` conv gives one logit channel, resized
bilinearly to ``heatmap.size`` when the stages do not land on it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import nn

from models.vision.vit import create_vit, embed_dim


@dataclass
class HeatmapConfig:
    """Heat-map target: ``size = [W, H]`` (TrackNet order), ``sigma`` in heat-map pixels
    (Gaussian std, or disk radius for ``mode: disk`` as in TrackNetV2/V3). ``centre``: ``exact`` = the label
    rescaled to the heat map as a float; ``v3`` = as TrackNetV3 draws its targets, the label truncated to whole
    heat-map pixels (``int(x / (W_src / W))``), and no target for a label truncated to ``(0, 0)``."""

    size: tuple[int, int] = (256, 144)
    sigma: float = 2.0
    mode: Literal["gaussian", "disk"] = "gaussian"
    centre: Literal["exact", "v3"] = "exact"

    def validate(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"heatmap.size must be [width, height] with positive entries, got {self.size}")
        if self.sigma <= 0:
            raise ValueError(f"heatmap.sigma must be > 0, got {self.sigma}")
        if self.mode not in ("gaussian", "disk"):
            raise ValueError(f"heatmap.mode must be 'gaussian' or 'disk', got {self.mode!r}")
        if self.centre not in ("exact", "v3"):
            raise ValueError(f"heatmap.centre must be 'exact' or 'v3', got {self.centre!r}")


class HeatmapDecoder(nn.Module):
    """``channels[0]`` -> ... -> ``channels[-1]`` with one ``upsample`` factor per stage, then a 1x1 logit conv.

    A 1x1 projection from the backbone width to ``channels[0]`` is inserted when they differ.
    """

    def __init__(self, in_dim: int, channels: Sequence[int], upsample: Sequence[int], out_maps: int = 1) -> None:
        super().__init__()
        if len(channels) < 1 or any(c < 1 for c in channels):
            raise ValueError(f"decoder.channels must be a non-empty list of positive widths, got {list(channels)}")
        if len(upsample) != len(channels) - 1:
            raise ValueError(
                f"decoder.upsample needs one factor per stage (len(channels) - 1 = {len(channels) - 1}), "
                f"got {list(upsample)}"
            )
        if any(u < 1 for u in upsample):
            raise ValueError(f"decoder.upsample factors must be >= 1, got {list(upsample)}")
        self.proj = nn.Identity() if in_dim == channels[0] else nn.Conv2d(in_dim, channels[0], 1)
        stages = []
        for c_in, c_out, up in zip(channels[:-1], channels[1:], upsample):
            stages.append(nn.Sequential(
                nn.Upsample(scale_factor=up, mode="bilinear", align_corners=False) if up > 1 else nn.Identity(),
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ))
        self.stages = nn.Sequential(*stages)
        self.logit = nn.Conv2d(channels[-1], out_maps, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logit(self.stages(self.proj(x)))


class TrackNetViT(nn.Module):
    """Stacked frames -> one-channel heat-map logits ``(B, 1, H_hm, W_hm)``.

    Args:
        backbone: timm ViT name; ``img_size = (H, W)`` of the input frames.
        num_frames: frames stacked on channels.
        pretrained_file / patch_size: see :func:`models.vision.vit.create_vit`.
        decoder_channels / decoder_upsample: :class:`HeatmapDecoder` stages.
        heatmap_size: output ``(W, H)`` (TrackNet order, like :class:`HeatmapConfig`).
        out_maps: logit maps per sample: 1 (the last frame) or ``num_frames`` (one per input frame).
    """

    def __init__(self, backbone: str, img_size: tuple[int, int], num_frames: int = 3,
                 pretrained_file: str | None = None, patch_size: int | None = None,
                 decoder_channels: Sequence[int] = (384, 256, 128, 64), decoder_upsample: Sequence[int] = (2, 2, 2),
                 heatmap_size: tuple[int, int] = (256, 144), out_maps: int = 1) -> None:
        super().__init__()
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.num_frames, self.img_size, self.heatmap_size = num_frames, tuple(img_size), tuple(heatmap_size)
        self.backbone = create_vit(backbone, img_size=self.img_size, in_chans=3 * num_frames,
                                   pretrained_file=pretrained_file, patch_size=patch_size)
        grid = tuple(self.backbone.patch_embed.grid_size)
        if grid[0] * self.backbone.patch_embed.patch_size[0] != self.img_size[0] or \
                grid[1] * self.backbone.patch_embed.patch_size[1] != self.img_size[1]:
            raise ValueError(f"input size (H, W) = {self.img_size} is not a multiple of the patch size "
                             f"{tuple(self.backbone.patch_embed.patch_size)}")
        self.grid = grid
        self.decoder = HeatmapDecoder(embed_dim(self.backbone), decoder_channels, decoder_upsample, out_maps)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Patch-token feature grid ``(B, C, gh, gw)``."""
        tokens = self.backbone.forward_features(x)[:, self.backbone.num_prefix_tokens:]
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, *self.grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expected = 3 * self.num_frames
        if x.shape[1] != expected or tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"expected input (B, {expected}, {self.img_size[0]}, {self.img_size[1]}), "
                             f"got {tuple(x.shape)}")
        logits = self.decoder(self.features(x))
        w, h = self.heatmap_size
        if logits.shape[-2:] != (h, w):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return logits


def heatmap_loss(logits: torch.Tensor, target: torch.Tensor, kind: Literal["bce", "focal"] = "bce",
                 pos_weight: float = 100.0, gamma: float = 2.0, reduction: str = "mean") -> torch.Tensor:
    """Per-pixel loss on logit maps against soft targets in [0, 1] (mean over pixels).

    ``bce``: binary cross-entropy with the positive term weighted by ``pos_weight`` (the ball covers a few
    pixels out of thousands, so unweighted BCE collapses to an empty map). ``focal``: TrackNetV2's
    weighted BCE, ``-[(1-p)^gamma y log p + p^gamma (1-y) log(1-p)]``, which down-weights easy pixels.
    """
    if kind == "bce":
        pw = torch.tensor(pos_weight, dtype=logits.dtype, device=logits.device)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pw, reduction=reduction)
    if kind == "focal":
        p = torch.sigmoid(logits)
        log_p, log_1p = F.logsigmoid(logits), F.logsigmoid(-logits)
        loss = -((1 - p) ** gamma * target * log_p + p**gamma * (1 - target) * log_1p)
        return loss.mean() if reduction == "mean" else loss
    raise ValueError(f"loss must be 'bce' or 'focal', got {kind!r}")


def _frames_rgb(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The labelled (last) frame of each stacked input, un-normalised, as ``(n, H, W, 3)`` floats in [0, 1]."""
    last = frames[:, -3:].detach().float().cpu() * torch.tensor(std).view(1, 3, 1, 1) + \
        torch.tensor(mean).view(1, 3, 1, 1)
    return last.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _mark(ax: Any, xy: torch.Tensor | None, show: torch.Tensor | None, i: int, kind: str) -> str:
    """Draw the predicted (red x) or true (green circle) ball of sample ``i`` on ``ax``; returns its caption."""
    if xy is None or show is None:
        return ""
    if not bool(show[i]):
        return f"{kind}: none"
    x, y = float(xy[i, 0]), float(xy[i, 1])
    if kind == "predicted":
        ax.plot([x], [y], "x", color="red", markersize=9, markeredgewidth=2, label=kind)
    else:
        ax.plot([x], [y], "o", markerfacecolor="none", markeredgecolor="lime", markersize=12, markeredgewidth=2,
                label=kind)
    return f"{kind}: ({x:.1f}, {y:.1f})"


def _frame_panel(ax: Any, rgb: np.ndarray, i: int, pred_xy: torch.Tensor | None, found: torch.Tensor | None,
                 true_xy: torch.Tensor | None, visible: torch.Tensor | None, labels: Sequence[str] | None) -> None:
    """Sample ``i``'s labelled frame in pixel axes, the predicted and true balls marked, its label and positions
    in the title."""
    h, w = rgb.shape[1:3]
    ax.imshow(rgb[i], extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    caption = ", ".join(c for c in (_mark(ax, pred_xy, found, i, "predicted"),
                                    _mark(ax, true_xy, visible, i, "true")) if c)
    ax.set_title(f"{labels[i] if labels else f'sample {i}'}\n{caption}", fontsize=8)
    ax.set_xlabel("x (px)", fontsize=7)
    ax.set_ylabel("y (px)", fontsize=7)


@torch.no_grad()
def heatmap_figure(frames: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, mean: Sequence[float],
                   std: Sequence[float], pred_xy: torch.Tensor | None = None, found: torch.Tensor | None = None,
                   true_xy: torch.Tensor | None = None, visible: torch.Tensor | None = None,
                   labels: Sequence[str] | None = None) -> Figure:
    """A matplotlib figure for TensorBoard, one row per sample: the labelled (last) frame with the predicted ball
    (red x) and the true one (green circle), the predicted heat map and the true heat map (colour bars,
    probability 0-1). Positions ``pred_xy``/``true_xy`` are in the frames' pixels; axes are pixels."""
    rgb = _frames_rgb(frames, mean, std)
    n = rgb.shape[0]
    fig = Figure(figsize=(12, 2.6 * n), layout="constrained")
    for i in range(n):
        _frame_panel(fig.add_subplot(n, 3, 3 * i + 1), rgb, i, pred_xy, found, true_xy, visible, labels)
        for k, (maps, name) in enumerate(((pred, "predicted heat map"), (target, "true heat map"))):
            ax = fig.add_subplot(n, 3, 3 * i + 2 + k)
            im = ax.imshow(maps[i].detach().float().cpu().reshape(maps.shape[-2:]).numpy(), cmap="magma", vmin=0,
                           vmax=1)
            ax.set_title(name, fontsize=8)
            ax.set_xlabel("x (heat-map px)", fontsize=7)
            fig.colorbar(im, ax=ax, shrink=0.8, label="probability")
    for ax in fig.axes:
        ax.tick_params(labelsize=6)
    return fig


@torch.no_grad()
def prediction_figure(frames: torch.Tensor, pred_xy: torch.Tensor, found: torch.Tensor, mean: Sequence[float],
                      std: Sequence[float], true_xy: torch.Tensor | None = None, visible: torch.Tensor | None = None,
                      labels: Sequence[str] | None = None, ncol: int = 4) -> Figure:
    """A matplotlib figure of the labelled (last) frames, ``ncol`` per row, each titled with its label (clip and
    frame) and the predicted (red x) and, when given, true (green circle) ball positions in the frames' pixels."""
    rgb = _frames_rgb(frames, mean, std)
    n = rgb.shape[0]
    ncol = max(1, min(ncol, n))
    nrow = -(-n // ncol)
    fig = Figure(figsize=(3.4 * ncol, 2.4 * nrow), layout="constrained")
    for i in range(n):
        _frame_panel(fig.add_subplot(nrow, ncol, i + 1), rgb, i, pred_xy, found, true_xy, visible, labels)
    for ax in fig.axes:
        ax.tick_params(labelsize=6)
    return fig
