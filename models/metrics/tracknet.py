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
  the arg-max pixel by up to ~0.4 px for sigma 2). Two guards: the map's median (its background level) is
  subtracted first, and only the window pixels reachable from the arg-max by steps that never go up (and stay
  above ``CENTROID_FLOOR`` of the peak) count, so a second blob is cut off at the valley between them.
  Measured (sigma 2, 200 random sub-pixel centres): clean 0.02 px max; + background 0.05 and noise 0.04 px
  (0.19 without the guards); a second blob of height 0.6 at 7 px 0.26 px (1.15), at 5 px 0.54 px (1.35).
  Limit: a blob cut by the map's border is pulled inwards, up to 1.2 px within 3 px of the border.
- ``component``: the centre of the bounding box of the largest 8-connected region above ``threshold``
  (largest box area, ties as TrackNetV3: :func:`largest_region_boxes`), at half-pixel resolution.
- ``v3``: TrackNetV3's ``predict_location`` + ``evaluate`` to the pixel: the same box, its centre truncated to
  whole pixels (``int(x + w / 2)``); the label side is :func:`v3_label_centres` (the truncated label's disk
  and its box centre). Exact when the heat map is V3's 512x288.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric

OUTCOMES = ("tp", "fp1", "fp2", "tn", "fn")
PeakMethod = Literal["centroid", "component", "v3"]
PEAK_METHODS = ("centroid", "component", "v3")
#: share of the peak (over the background) a pixel must exceed to join the centroid's region.
CENTROID_FLOOR = 0.02


def centroid_radius(sigma: float, mode: str = "gaussian") -> int:
    """Half-width of the centroid window for a heat map of this ``sigma`` (Gaussian std or disk radius)."""
    return max(1, math.ceil(3 * sigma) if mode == "gaussian" else math.ceil(sigma) + 2)


@torch.no_grad()
def detect_peaks(heatmap: torch.Tensor, threshold: float = 0.5, method: PeakMethod = "centroid",
                 radius: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Peak of each probability map ``(B, 1, H, W)`` (or ``(B, H, W)``).

    Returns ``xy`` ``(B, 2)`` in heat-map pixels and ``found`` ``(B,)``: whether any pixel exceeds ``threshold``.
    ``method``: ``centroid`` (weighted centroid of the ``(2 radius + 1)^2`` window around the arg-max; pass
    :func:`centroid_radius` of the heat map), ``component`` (bounding-box centre of the largest region above
    ``threshold``) or ``v3`` (the same centre truncated to whole pixels, TrackNetV3). See the module docstring.
    """
    hm = heatmap.reshape(heatmap.shape[0], heatmap.shape[-2], heatmap.shape[-1]).float()
    b, h, w = hm.shape
    peak, flat = hm.flatten(1).max(1)
    found = peak > threshold
    if method in ("component", "v3"):
        boxes = torch.from_numpy(largest_region_boxes((hm > threshold).cpu().numpy())).to(hm.device)
        x, y, bw, bh = boxes.unbind(1)
        if method == "v3":
            return torch.stack([x + bw // 2, y + bh // 2], 1).float(), found
        return torch.stack([x + (bw - 1) / 2, y + (bh - 1) / 2], 1).float(), found
    if method != "centroid":
        raise ValueError(f"peak method must be one of {PEAK_METHODS}, got {method!r}")
    py, px = flat // w, flat % w
    r = int(radius)
    background = hm.flatten(1).median(1).values
    padded = F.pad(hm - background[:, None, None], (r, r, r, r))
    offs = torch.arange(-r, r + 1, device=hm.device)
    rows = py[:, None] + r + offs
    cols = px[:, None] + r + offs
    win = padded[torch.arange(b, device=hm.device)[:, None, None], rows[:, :, None], cols[:, None, :]].clamp_min(0)
    win = win * _descending_region(win, CENTROID_FLOOR * win[:, r, r, None, None])
    wsum = win.sum((1, 2)).clamp_min(1e-12)
    dy = (win.sum(2) * offs).sum(1) / wsum
    dx = (win.sum(1) * offs).sum(1) / wsum
    return torch.stack([px + dx, py + dy], 1), found


def _descending_region(win: torch.Tensor, floor: torch.Tensor) -> torch.Tensor:
    """Mask of the pixels of ``win`` ``(B, k, k)`` reachable from the centre by 8-connected steps that never go
    up and stay above ``floor``: the centre's blob, cut at the valley before any neighbouring blob."""
    b, k, _ = win.shape
    c = k // 2
    values = F.pad(win, (1, 1, 1, 1), value=float("-inf"))
    neighbours = F.unfold(values[:, None], 3).view(b, 9, k, k)  # the 3x3 neighbourhood of every pixel
    inside = win > floor
    region = torch.zeros_like(inside)
    region[:, c, c] = True
    for _ in range(2 * k):
        reach = F.unfold(F.pad(region[:, None].float(), (1, 1, 1, 1)), 3).view(b, 9, k, k).bool()
        grown = region | (inside & (reach & (neighbours >= win[:, None])).any(1))
        if torch.equal(grown, region):
            break
        region = grown
    return region


def largest_region_boxes(masks: np.ndarray) -> np.ndarray:
    """Bounding box ``(x, y, w, h)`` (int64 ``(B, 4)``, zeros when empty) of the largest 8-connected region of
    each boolean mask ``(B, H, W)``, as TrackNetV3's ``predict_location``: the largest box *area* wins; among equal
    areas the region whose first pixel (raster order) comes last, the order in which ``cv2.findContours`` lists
    outer contours. (Regions inside another's hole, which ``RETR_EXTERNAL`` skips, always have smaller boxes.)"""
    from scipy import ndimage

    masks = np.asarray(masks, bool)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (B, H, W), got shape {masks.shape}")
    out = np.zeros((masks.shape[0], 4), np.int64)
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True  # 8-connected within a map, never across maps
    labels, n = ndimage.label(masks, structure)
    if n == 0:
        return out
    boxes = np.array([(s[0].start, s[2].start, s[1].start, s[2].stop - s[2].start, s[1].stop - s[1].start)
                      for s in ndimage.find_objects(labels)], np.int64)  # (map, x, y, w, h), label order
    area = boxes[:, 3] * boxes[:, 4]
    order = np.lexsort((np.arange(n), area, boxes[:, 0]))  # by map, then area, then label: the winner is last
    last = np.r_[boxes[order, 0][1:] != boxes[order, 0][:-1], True]
    best = boxes[order[last]]
    out[best[:, 0]] = best[:, 1:]
    return out


def v3_truncate(x: float, y: float, src_size: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """A source-pixel label at heat-map scale as TrackNetV3 computes it: ``int(x / (W_src / W))`` (float64
    division by the scaler, then truncation), likewise for ``y``."""
    return int(x / (src_size[0] / size[0])), int(y / (src_size[1] / size[1]))


def v3_label_centres(xy: torch.Tensor, visible: torch.Tensor, size: tuple[int, int],
                     radius: float = 2.5) -> tuple[torch.Tensor, torch.Tensor]:
    """TrackNetV3's ground-truth position from whole-pixel labels ``xy`` ``(B, 2)`` (already truncated,
    ``int(x / (W_src / W))``) on a map of ``size = (W, H)``: V3 draws a disk of ``radius`` there (nothing when the
    label is ``(0, 0)``) and evaluates the box centre of that disk, which is the label itself except where the
    disk is cut by the border. Returns ``(xy (B, 2) float, visible (B,))``."""
    w, h = size
    xy = xy.long().cpu()
    yy = torch.arange(h)[None, :, None]
    xx = torch.arange(w)[None, None, :]
    disk = (xx - xy[:, 0, None, None]) ** 2 + (yy - xy[:, 1, None, None]) ** 2 <= radius**2
    disk &= (visible.bool().cpu() & (xy != 0).any(1))[:, None, None]
    boxes = torch.from_numpy(largest_region_boxes(disk.numpy()))
    x, y, bw, bh = boxes.unbind(1)
    return torch.stack([x + bw // 2, y + bh // 2], 1).float(), disk.flatten(1).any(1)


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
        if peak_method not in PEAK_METHODS:
            raise ValueError(f"peak_method must be one of {PEAK_METHODS}, got {peak_method!r}")
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
