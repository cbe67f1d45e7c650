"""Class-incremental metrics from an accuracy matrix, and the matrix rendered as an image.

``R[t][i]`` is the accuracy on task ``i``'s test classes after training task ``t`` (0-based, ``i <= t``);
``A[t]`` is the accuracy on every class seen after task ``t``. Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

Matrix = Sequence[Sequence[float]]


def _check(R: Matrix) -> list[list[float]]:
    rows = [list(map(float, r)) for r in R]
    for t, row in enumerate(rows):
        if len(row) != t + 1:
            raise ValueError(f"accuracy matrix row {t} must have {t + 1} entries (tasks 0..{t}), got {len(row)}")
    return rows


def average_incremental_accuracy(A: Sequence[float]) -> float:
    """Mean over tasks of the accuracy on all classes seen so far."""
    if not A:
        raise ValueError("average incremental accuracy needs at least one task")
    return float(np.mean(A))


def last_accuracy(A: Sequence[float]) -> float:
    """Accuracy on all classes after the last task (``A_T``)."""
    if not A:
        raise ValueError("last accuracy needs at least one task")
    return float(A[-1])


def forgetting(R: Matrix) -> float:
    """Average forgetting (Chaudhry et al. 2018): mean over old tasks j of max_{l<T} R[l][j] - R[T][j]."""
    rows = _check(R)
    T = len(rows) - 1
    if T == 0:
        return 0.0
    return float(np.mean([max(rows[k][j] for k in range(j, T)) - rows[T][j] for j in range(T)]))


def backward_transfer(R: Matrix) -> float:
    """Backward transfer (Lopez-Paz & Ranzato 2017): mean over i < T of R[T][i] - R[i][i]."""
    rows = _check(R)
    T = len(rows) - 1
    if T == 0:
        return 0.0
    return float(np.mean([rows[T][i] - rows[i][i] for i in range(T)]))


def summary(R: Matrix, A: Sequence[float]) -> dict[str, float]:
    """Every scalar metric of the sequence so far."""
    return {
        "avg_incremental_acc": average_incremental_accuracy(A),
        "last_acc": last_accuracy(A),
        "forgetting": forgetting(R),
        "bwt": backward_transfer(R),
    }


# 3x5 bitmap digits (and '.', '-') so the image needs no font file or matplotlib.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
}


def _draw_text(img: np.ndarray, text: str, top: int, left: int, scale: int, color: np.ndarray) -> None:
    for k, ch in enumerate(text):
        glyph = np.array([int(b) for b in _GLYPHS[ch]], dtype=bool).reshape(5, 3)
        mask = glyph.repeat(scale, 0).repeat(scale, 1)
        y, x = top, left + k * 4 * scale
        img[y : y + mask.shape[0], x : x + mask.shape[1]][mask] = color


def render_accuracy_matrix(R: Matrix, cell: int = 40) -> torch.Tensor:
    """The matrix as a heat map (dark red = 0, green = 1, grey = not yet trained) with the percentages
    written in each cell; returns a ``(3, H, W)`` uint8 tensor for ``SummaryWriter.add_image``."""
    rows = _check(R)
    n = len(rows)
    img = np.full((n * cell, n * cell, 3), 200, dtype=np.uint8)
    scale = max(1, cell // 20)
    for t, row in enumerate(rows):
        for i, acc in enumerate(row):
            a = min(max(acc, 0.0), 1.0)
            color = np.array([200 * (1 - a) + 30, 60 + 150 * a, 50], dtype=np.uint8)
            img[t * cell : (t + 1) * cell - 1, i * cell : (i + 1) * cell - 1] = color
            text = f"{round(100 * a):d}"
            width = len(text) * 4 * scale
            _draw_text(img, text, t * cell + (cell - 5 * scale) // 2, i * cell + (cell - width) // 2, scale,
                       np.array([255, 255, 255], dtype=np.uint8))
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()
