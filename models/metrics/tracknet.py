"""TrackNet detection metrics on heat-map peaks (a torchmetrics ``Metric``, so counts sync under DDP).

Per frame, with the prediction = the heat-map peak when it exceeds ``threshold``:

- TP: ball visible, peak within ``tolerance`` pixels (Euclidean) of the label;
- FP1: ball visible, peak farther than ``tolerance``;
- FP2: ball invisible, a peak was predicted;
- TN: ball invisible, no peak;  FN: ball visible, no peak.

accuracy = (TP + TN) / all, precision = TP / (TP + FP1 + FP2), recall = TP / (TP + FN), F1 their harmonic mean.

Distances are measured in heat-map pixels multiplied by a per-sample ``scale`` ``(sx, sy)``: TrackNetV3 compares
at 512x288 with a 4 px tolerance, so ``scale = (512 / W_hm, 288 / H_hm)`` makes the numbers comparable
whatever the heat-map size (a heat map of 128x72 would otherwise be four times looser).

Peak position (heat-map pixels, pixel centres at integer coordinates):

- ``centroid`` (default): the probability-weighted centroid of the ``(2R+1) x (2R+1)`` window around the
  arg-max, ``R = ceil(3 sigma)`` for the heat map's Gaussian ``sigma`` (``sigma + 2`` for disks). A window
  that covers the whole blob makes the centroid unbiased (a 3x3 window around the arg-max is pulled towards
  the arg-max pixel by up to ~0.4 px for sigma 2); tests check < 0.05 px on rendered maps.
- ``component``: TrackNetV3's rule, the centre of the bounding box of the largest 8-connected region above
  ``threshold`` (largest box area, as its ``cv2.boundingRect`` loop); half-pixel resolution, for exact
  comparisons with published numbers.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric

OUTCOMES = ("tp", "fp1", "fp2", "tn", "fn")
PeakMethod = Literal["centroid", "component"]


def centroid_radius(sigma: float, mode: str = "gaussian") -> int:
    """Half-width of the centroid window for a heat map of this ``sigma`` (Gaussian std or disk radius)."""
    return max(1, math.ceil(3 * sigma) if mode == "gaussian" else math.ceil(sigma) + 2)


@torch.no_grad()
def detect_peaks(heatmap: torch.Tensor, threshold: float = 0.5, method: PeakMethod = "centroid",
                 radius: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Peak of each probability map ``(B, 1, H, W)`` (or ``(B, H, W)``).

    Returns ``xy`` ``(B, 2)`` in heat-map pixels and ``found`` ``(B,)``: whether the map's maximum exceeds
    ``threshold``. ``method``: ``centroid`` (weighted centroid of the ``(2 radius + 1)^2`` window around the
    arg-max; pass :func:`centroid_radius` of the heat map) or ``component`` (TrackNetV3's bounding-box centre
    of the largest region above ``threshold``).
    """
    hm = heatmap.reshape(heatmap.shape[0], heatmap.shape[-2], heatmap.shape[-1]).float()
    b, h, w = hm.shape
    peak, flat = hm.flatten(1).max(1)
    found = peak > threshold
    if method == "component":
        return _component_centres(hm, threshold), found
    if method != "centroid":
        raise ValueError(f"peak method must be 'centroid' or 'component', got {method!r}")
    py, px = flat // w, flat % w
    r = int(radius)
    padded = F.pad(hm, (r, r, r, r))
    offs = torch.arange(-r, r + 1, device=hm.device)
    rows = py[:, None] + r + offs
    cols = px[:, None] + r + offs
    win = padded[torch.arange(b, device=hm.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    wsum = win.sum((1, 2)).clamp_min(1e-12)
    dy = (win.sum(2) * offs).sum(1) / wsum
    dx = (win.sum(1) * offs).sum(1) / wsum
    return torch.stack([px + dx, py + dy], 1), found


def _component_centres(hm: torch.Tensor, threshold: float) -> torch.Tensor:
    from scipy import ndimage

    out = torch.zeros(hm.shape[0], 2)
    structure = np.ones((3, 3), bool)
    for i, m in enumerate(hm.detach().cpu().numpy()):
        labels, n = ndimage.label(m > threshold, structure)
        if n == 0:
            continue
        boxes = ndimage.find_objects(labels)
        areas = [(s[0].stop - s[0].start) * (s[1].stop - s[1].start) for s in boxes]
        ys, xs = boxes[int(np.argmax(areas))]
        out[i] = torch.tensor([(xs.start + xs.stop - 1) / 2, (ys.start + ys.stop - 1) / 2])
    return out.to(hm.device)


def classify(pred_xy: torch.Tensor, found: torch.Tensor, true_xy: torch.Tensor, visible: torch.Tensor,
             tolerance: float = 4.0, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Boolean masks ``(B,)`` for each outcome (exactly one is true per frame). ``scale`` ``(B, 2)`` or ``(2,)``
    multiplies the x and y differences before the distance is compared with ``tolerance``."""
    visible, found = visible.bool(), found.bool()
    diff = pred_xy.float() - true_xy.float()
    if scale is not None:
        diff = diff * scale.to(diff)
    near = diff.norm(dim=1) <= tolerance
    return {
        "tp": visible & found & near,
        "fp1": visible & found & ~near,
        "fn": visible & ~found,
        "fp2": ~visible & found,
        "tn": ~visible & ~found,
    }


class TrackNetMetrics(Metric):
    """Accumulates TP/FP1/FP2/TN/FN over frames; ``compute()`` returns counts and rates as a dict.

    ``update(heatmap_probs, true_xy, visible, scale=None)`` detects peaks itself (``peak_method``,
    ``radius``); ``update_from_peaks`` takes them ready. ``scale``: see :func:`classify`.
    """

    full_state_update = False

    def __init__(self, threshold: float = 0.5, tolerance: float = 4.0, peak_method: PeakMethod = "centroid",
                 radius: int = 6, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        if peak_method not in ("centroid", "component"):
            raise ValueError(f"peak_method must be 'centroid' or 'component', got {peak_method!r}")
        self.threshold, self.tolerance, self.peak_method, self.radius = threshold, tolerance, peak_method, radius
        for name in OUTCOMES:
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, heatmap: torch.Tensor, true_xy: torch.Tensor, visible: torch.Tensor,
               scale: torch.Tensor | None = None) -> None:
        xy, found = detect_peaks(heatmap, self.threshold, self.peak_method, self.radius)
        self.update_from_peaks(xy, found, true_xy, visible, scale)

    def update_from_peaks(self, pred_xy: torch.Tensor, found: torch.Tensor, true_xy: torch.Tensor,
                          visible: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        for name, mask in classify(pred_xy, found, true_xy, visible, self.tolerance, scale).items():
            setattr(self, name, getattr(self, name) + mask.sum())

    def compute(self) -> dict[str, torch.Tensor]:
        tp, fp1, fp2, tn, fn = (getattr(self, n).float() for n in OUTCOMES)
        total = tp + fp1 + fp2 + tn + fn
        precision = tp / (tp + fp1 + fp2).clamp_min(1)
        recall = tp / (tp + fn).clamp_min(1)
        f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
        return {"accuracy": (tp + tn) / total.clamp_min(1), "precision": precision, "recall": recall, "f1": f1,
                **{n: getattr(self, n) for n in OUTCOMES}}
