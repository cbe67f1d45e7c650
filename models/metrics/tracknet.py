"""TrackNet detection metrics on heat-map peaks (a torchmetrics ``Metric``, so counts sync under DDP).

Per frame, with the prediction = the heat-map peak when it exceeds ``threshold``:

- TP: ball visible, peak within ``tolerance`` pixels (Euclidean, heat-map scale) of the label;
- FP1: ball visible, peak farther than ``tolerance``;
- FP2: ball invisible, a peak was predicted;
- TN: ball invisible, no peak;  FN: ball visible, no peak.

accuracy = (TP + TN) / all, precision = TP / (TP + FP1 + FP2), recall = TP / (TP + FN), F1 their harmonic mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric

OUTCOMES = ("tp", "fp1", "fp2", "tn", "fn")


@torch.no_grad()
def detect_peaks(heatmap: torch.Tensor, threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Peak of each probability map ``(B, 1, H, W)`` (or ``(B, H, W)``).

    Returns ``xy`` ``(B, 2)`` in heat-map pixels (the arg-max refined by the probability-weighted centroid of
    its 3x3 neighbourhood) and ``found`` ``(B,)``: whether the peak value exceeds ``threshold``.
    """
    hm = heatmap.reshape(heatmap.shape[0], heatmap.shape[-2], heatmap.shape[-1]).float()
    b, h, w = hm.shape
    peak, flat = hm.flatten(1).max(1)
    py, px = flat // w, flat % w
    padded = F.pad(hm, (1, 1, 1, 1))
    offs = torch.arange(-1, 2, device=hm.device)
    rows = (py[:, None] + 1 + offs).clamp(0, h + 1)
    cols = (px[:, None] + 1 + offs).clamp(0, w + 1)
    win = padded[torch.arange(b, device=hm.device)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B,3,3)
    wsum = win.sum((1, 2)).clamp_min(1e-12)
    dy = (win.sum(2) * offs).sum(1) / wsum
    dx = (win.sum(1) * offs).sum(1) / wsum
    xy = torch.stack([px + dx, py + dy], 1)
    return xy, peak > threshold


def classify(pred_xy: torch.Tensor, found: torch.Tensor, true_xy: torch.Tensor, visible: torch.Tensor,
             tolerance: float = 4.0) -> dict[str, torch.Tensor]:
    """Boolean masks ``(B,)`` for each outcome (exactly one is true per frame)."""
    visible, found = visible.bool(), found.bool()
    near = (pred_xy.float() - true_xy.float()).norm(dim=1) <= tolerance
    return {
        "tp": visible & found & near,
        "fp1": visible & found & ~near,
        "fn": visible & ~found,
        "fp2": ~visible & found,
        "tn": ~visible & ~found,
    }


class TrackNetMetrics(Metric):
    """Accumulates TP/FP1/FP2/TN/FN over frames; ``compute()`` returns counts and rates as a dict.

    ``update(heatmap_probs, true_xy, visible)`` detects peaks itself; ``update_from_peaks`` takes them ready.
    """

    full_state_update = False

    def __init__(self, threshold: float = 0.5, tolerance: float = 4.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        self.threshold, self.tolerance = threshold, tolerance
        for name in OUTCOMES:
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, heatmap: torch.Tensor, true_xy: torch.Tensor, visible: torch.Tensor) -> None:
        xy, found = detect_peaks(heatmap, self.threshold)
        self.update_from_peaks(xy, found, true_xy, visible)

    def update_from_peaks(self, pred_xy: torch.Tensor, found: torch.Tensor, true_xy: torch.Tensor,
                          visible: torch.Tensor) -> None:
        for name, mask in classify(pred_xy, found, true_xy, visible, self.tolerance).items():
            setattr(self, name, getattr(self, name) + mask.sum())

    def compute(self) -> dict[str, torch.Tensor]:
        tp, fp1, fp2, tn, fn = (getattr(self, n).float() for n in OUTCOMES)
        total = tp + fp1 + fp2 + tn + fn
        precision = tp / (tp + fp1 + fp2).clamp_min(1)
        recall = tp / (tp + fn).clamp_min(1)
        f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
        return {"accuracy": (tp + tn) / total.clamp_min(1), "precision": precision, "recall": recall, "f1": f1,
                **{n: getattr(self, n) for n in OUTCOMES}}
