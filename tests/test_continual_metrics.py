"""Continual-learning metrics against hand-computed matrices, and the matrix image."""

import pytest
import torch

from models.metrics import continual as cm

R = [[0.9], [0.7, 0.8], [0.5, 0.6, 0.95]]
A = [0.9, 0.75, 0.7]


def test_metrics_by_hand():
    assert cm.average_incremental_accuracy(A) == pytest.approx((0.9 + 0.75 + 0.7) / 3)
    assert cm.last_accuracy(A) == pytest.approx(0.7)
    # forgetting: task 0: max(0.9, 0.7) - 0.5 = 0.4; task 1: 0.8 - 0.6 = 0.2
    assert cm.forgetting(R) == pytest.approx(0.3)
    # BWT: ((0.5 - 0.9) + (0.6 - 0.8)) / 2
    assert cm.backward_transfer(R) == pytest.approx(-0.3)


def test_forgetting_uses_the_best_earlier_accuracy_not_the_first():
    R2 = [[0.5], [0.9, 0.8], [0.6, 0.7, 0.9]]  # task 0 improved after task 1 (positive transfer), then dropped
    assert cm.forgetting(R2) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.7)) / 2)
    assert cm.backward_transfer(R2) == pytest.approx(((0.6 - 0.5) + (0.7 - 0.8)) / 2)


def test_single_task_and_bad_shapes():
    assert cm.forgetting([[0.4]]) == 0.0 and cm.backward_transfer([[0.4]]) == 0.0
    with pytest.raises(ValueError, match="row 1"):
        cm.forgetting([[0.4], [0.1]])


def test_matrix_image():
    """matplotlib heat map with axes, labels and a colour bar, as an RGB uint8 image; untrained cells blank."""
    img = cm.render_accuracy_matrix(R)
    assert img.dim() == 3 and img.shape[0] == 3 and img.dtype == torch.uint8 and min(img.shape[1:]) > 100
    assert img.flatten(1).unique(dim=1).shape[1] > 20  # not a blank canvas: cells, text, colour bar
    fig = cm.plot_accuracy_matrix(R)
    ax, bar = fig.axes
    assert ax.get_xlabel() and ax.get_ylabel() and bar.get_ylabel() == "accuracy (%)"
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 6 and "95" in texts  # one label per trained cell (lower triangle)
    import matplotlib.pyplot as plt
    plt.close(fig)
