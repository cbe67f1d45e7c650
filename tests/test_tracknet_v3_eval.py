"""TrackNetV3's evaluation rule (``peak_method: v3``) against a transcription of its reference code
(qaz812345/TrackNetV3 ``test.py``: ``predict_location`` + ``evaluate``; ``dataset.py``: ``_get_heatmap``), on random
maps. The transcription is written from the reference's rules: a plain-Python one always runs, the one on
OpenCV's ``findContours`` (what V3 calls) when ``cv2`` is installed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.metrics.tracknet import (
    OUTCOMES,
    classify,
    detect_peaks,
    largest_region_boxes,
    v3_label_centres,
    v3_truncate,
)


def ref_boxes_python(mask: np.ndarray) -> tuple[int, int, int, int]:
    """V3's predict_location on one binary map, without OpenCV: outer contours (8-connected regions) listed in
    the order cv2.findContours returns them (reverse raster order of each region's first pixel), the first of
    the largest box areas (strict ``>`` in V3's loop)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, bool)
    rects = []
    for y0 in range(h):
        for x0 in range(w):
            if not mask[y0, x0] or seen[y0, x0]:
                continue
            stack, ys, xs = [(y0, x0)], [], []
            seen[y0, x0] = True
            while stack:
                y, x = stack.pop()
                ys.append(y)
                xs.append(x)
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        v, u = y + dy, x + dx
                        if 0 <= v < h and 0 <= u < w and mask[v, u] and not seen[v, u]:
                            seen[v, u] = True
                            stack.append((v, u))
            rects.append((min(xs), min(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1))
    if not rects:
        return 0, 0, 0, 0
    rects = rects[::-1]
    best, best_area = rects[0], rects[0][2] * rects[0][3]
    for r in rects[1:]:
        if r[2] * r[3] > best_area:
            best, best_area = r, r[2] * r[3]
    return best


def ref_boxes_cv2(mask: np.ndarray) -> tuple[int, int, int, int]:
    """V3's predict_location verbatim in behaviour: cv2.findContours(RETR_EXTERNAL) + boundingRect, largest area."""
    import cv2

    img = mask.astype(np.uint8) * 255
    if img.max() == 0:
        return 0, 0, 0, 0
    contours, _ = cv2.findContours(img, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    rects = [cv2.boundingRect(c) for c in contours]
    best, best_area = rects[0], rects[0][2] * rects[0][3]
    for r in rects[1:]:
        if r[2] * r[3] > best_area:
            best, best_area = r, r[2] * r[3]
    return tuple(int(v) for v in best)


def v3_disk(cx: int, cy: int, w: int, h: int, sigma: float = 2.5) -> np.ndarray:
    """V3's _get_heatmap: a disk of radius sigma at (cx, cy) on 1-based meshgrid coordinates; (0, 0) = no ball."""
    if cx == cy == 0:
        return np.zeros((h, w))
    x, y = np.meshgrid(np.linspace(1, w, w), np.linspace(1, h, h))
    d = (y - (cy + 1)) ** 2 + (x - (cx + 1)) ** 2
    return (d <= sigma**2).astype(np.float64)


def ref_evaluate(pred: np.ndarray, label: tuple[float, float], src: tuple[int, int], boxes, tol: float = 4.0):
    """V3's evaluate for one frame of a heat-map model: the outcome and the predicted whole-pixel centre."""
    h, w = pred.shape
    cx, cy = int(label[0] / (src[0] / w)), int(label[1] / (src[1] / h))
    y_t = v3_disk(cx, cy, w, h)
    h_p = pred > 0.5
    bt = boxes(y_t > 0)
    cx_true, cy_true = int(bt[0] + bt[2] / 2), int(bt[1] + bt[3] / 2)
    bp = boxes(h_p)
    cx_pred, cy_pred = int(bp[0] + bp[2] / 2), int(bp[1] + bp[3] / 2)
    if h_p.max() == 0 and y_t.max() == 0:
        kind = "tn"
    elif h_p.max() > 0 and y_t.max() == 0:
        kind = "fp2"
    elif h_p.max() == 0:
        kind = "fn"
    else:
        kind = "fp1" if math.sqrt((cx_pred - cx_true) ** 2 + (cy_pred - cy_true) ** 2) > tol else "tp"
    return kind, (cx_pred, cy_pred)


def random_masks(rng: np.random.Generator, n: int, max_side: int = 12) -> list[np.ndarray]:
    """Binary maps of random size and density: many regions, touching borders, equal box areas (ties)."""
    out = []
    for _ in range(n):
        h, w = rng.integers(1, max_side + 1, 2)
        out.append(rng.random((h, w)) < rng.random())
    return out


def batched_boxes(masks: list[np.ndarray]) -> np.ndarray:
    """largest_region_boxes over maps of mixed sizes (padded with empty pixels, which add no region)."""
    h = max(m.shape[0] for m in masks)
    w = max(m.shape[1] for m in masks)
    stack = np.zeros((len(masks), h, w), bool)
    for i, m in enumerate(masks):
        stack[i, : m.shape[0], : m.shape[1]] = m
    return largest_region_boxes(stack)


def test_boxes_match_the_plain_transcription_on_random_maps():
    masks = random_masks(np.random.default_rng(0), 3000)
    ours = batched_boxes(masks)
    ref = np.array([ref_boxes_python(m) for m in masks])
    assert (ours == ref).all(1).sum() == len(masks)


def test_boxes_match_opencv_on_random_maps():
    """20 000 maps here; ``benchmarks/tracknet_v3_rule.py`` runs 100 000 (zero disagreements)."""
    pytest.importorskip("cv2")
    rng = np.random.default_rng(1)
    masks = random_masks(rng, 20_000)
    ours = batched_boxes(masks)
    ref = np.array([ref_boxes_cv2(m) for m in masks])
    disagreements = int((ours != ref).any(1).sum())
    assert disagreements == 0


def test_python_transcription_agrees_with_opencv():
    """The plain transcription (always run) is itself checked against OpenCV where it is installed."""
    pytest.importorskip("cv2")
    masks = random_masks(np.random.default_rng(2), 2000)
    assert all(ref_boxes_python(m) == ref_boxes_cv2(m) for m in masks)


def blob_maps(rng: np.random.Generator, n: int, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Probability maps with 0-3 Gaussian blobs of random size and height near a random label, plus the label
    in source pixels (some frames without a ball, some labels on the border)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    maps = np.zeros((n, h, w), np.float32)
    labels = np.zeros((n, 3))  # visible, x, y in source pixels of a 1280x720 frame
    for i in range(n):
        vis = rng.random() < 0.85
        lx, ly = rng.uniform(0, 1280), rng.uniform(0, 720)
        if rng.random() < 0.05:
            lx = rng.choice([0.0, 1279.99, 2.0])
        labels[i] = (vis, lx, ly)
        for _ in range(rng.integers(0, 4)):
            px = lx * w / 1280 + rng.normal(0, 3) if vis else rng.uniform(0, w)
            py = ly * h / 720 + rng.normal(0, 3) if vis else rng.uniform(0, h)
            s, a = rng.uniform(0.5, 3), rng.uniform(0.3, 1)
            maps[i] += (a * np.exp(-((xx - px) ** 2 + (yy - py) ** 2) / (2 * s * s))).astype(np.float32)
    return maps, labels


@pytest.mark.parametrize("size", [(512, 288), (64, 36)])
def test_v3_outcomes_and_centres_match_the_reference_evaluate(size):
    """End to end: truncated labels, the label disk's box centre, the prediction's box centre and the outcome."""
    n = 24 if size == (512, 288) else 2000
    maps, labels = blob_maps(np.random.default_rng(3), n, size)
    src = (1280, 720)
    ref = [ref_evaluate(m, (lx, ly) if vis else (0.0, 0.0), src, ref_boxes_python)
           for m, (vis, lx, ly) in zip(maps, labels)]
    trunc = torch.tensor([v3_truncate(lx, ly, src, size) if vis else (0, 0) for vis, lx, ly in labels])
    true_xy, visible = v3_label_centres(trunc, torch.tensor(labels[:, 0] > 0), size)
    xy, found = detect_peaks(torch.from_numpy(maps), 0.5, "v3")
    outcomes = classify(xy, found, true_xy, visible, 4.0)
    ours = [next(k for k in OUTCOMES if outcomes[k][i]) for i in range(n)]
    assert ours == [r[0] for r in ref]
    pred_centres = [tuple(int(v) for v in p) for p in xy[found].tolist()]
    assert pred_centres == [r[1] for r, f in zip(ref, found.tolist()) if f]
    assert len(set(ours)) == 5 or n < 100  # every outcome occurs (in the larger sample)


def test_v3_label_truncation_differs_from_the_float_label():
    """V3 compares whole pixels: a prediction 4.4 px from the float label can be a TP (or 3.9 px a FP1)."""
    true_xy, visible = v3_label_centres(torch.tensor([[100, 50]]), torch.tensor([True]), (512, 288))
    assert true_xy.tolist() == [[100.0, 50.0]] and visible.tolist() == [True]
    edge, vis = v3_label_centres(torch.tensor([[0, 50], [0, 0], [511, 287]]), torch.tensor([True, True, True]),
                                 (512, 288))
    assert edge.tolist() == [[1.0, 50.0], [0.0, 0.0], [510.0, 286.0]]  # the border cuts the disk
    assert vis.tolist() == [True, False, True]  # V3 draws nothing for a label at (0, 0)
    assert v3_truncate(1279.99, 719.99, (1280, 720), (512, 288)) == (511, 287)
