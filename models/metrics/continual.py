"""Class-incremental metrics from an accuracy matrix, and the plots of a sequence (matplotlib, Agg backend).

``R[t][i]`` is the accuracy on task ``i``'s test classes after training task ``t`` (0-based, ``i <= t``);
``A[t]`` is the accuracy on every class seen after task ``t``. Accuracies are fractions in [0, 1].
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

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


def old_new_accuracy(confusion: np.ndarray, task_offset: int, n_seen: int) -> dict[str, float]:
    """From a class confusion matrix (true x predicted, seen classes only) after a task whose classes start at
    ``task_offset``: accuracy on the old classes, on the new ones, and the share of old-class images predicted
    as a new class (the bias toward the newest task)."""
    c = np.asarray(confusion, dtype=np.float64)[:n_seen, :n_seen]
    diag = np.diag(c)
    old, new = slice(0, task_offset), slice(task_offset, n_seen)
    out = {"new_acc": float(diag[new].sum() / max(c[new].sum(), 1))}
    if task_offset:
        out["old_acc"] = float(diag[old].sum() / max(c[old].sum(), 1))
        out["old_to_new"] = float(c[old, new].sum() / max(c[old].sum(), 1))
    return out


def task_confusion(confusion: np.ndarray, task_sizes: Sequence[int]) -> np.ndarray:
    """Class confusion (true x predicted) summed into tasks, rows normalised to fractions."""
    bounds = np.cumsum([0, *task_sizes])
    c = np.asarray(confusion, dtype=np.float64)
    t = np.array([[c[a:b, p:q].sum() for p, q in zip(bounds[:-1], bounds[1:])]
                  for a, b in zip(bounds[:-1], bounds[1:])])
    return t / np.maximum(t.sum(1, keepdims=True), 1)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_matrix(values: np.ndarray, title: str, xlabel: str, ylabel: str, colorbar: str) -> Any:
    """A heat map with percentages in the cells (NaN cells blank), axes labels and a colour bar."""
    plt = _pyplot()
    v = np.asarray(values, dtype=np.float64)
    n_rows, n_cols = v.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n_cols, 0.8 + 0.5 * n_rows), dpi=100)
    im = ax.imshow(np.ma.masked_invalid(100 * v), vmin=0, vmax=100, cmap="viridis")
    for r in range(n_rows):
        for c in range(n_cols):
            if np.isfinite(v[r, c]):
                ax.text(c, r, f"{100 * v[r, c]:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if v[r, c] < 0.6 else "black")
    ax.set_xticks(range(n_cols))
    ax.set_yticks(range(n_rows))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=colorbar, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def plot_accuracy_matrix(R: Matrix) -> Any:
    """R[t][i] as a heat map: rows = after training task t, columns = task i's test classes."""
    rows = _check(R)
    n = len(rows)
    v = np.full((n, n), np.nan)
    for t, row in enumerate(rows):
        v[t, : len(row)] = row
    return plot_matrix(v, "accuracy matrix R[t][i] (%)", "evaluated task i", "after training task t", "accuracy (%)")


def plot_task_confusion(conf: np.ndarray) -> Any:
    """Rows: true task, columns: predicted task (fractions of the row's images)."""
    return plot_matrix(conf, "task confusion (% of the true task's images)", "predicted task", "true task",
                       "share of images (%)")


def plot_old_new(records: Sequence[Mapping[str, float]]) -> Any:
    """Old-class and new-class accuracy after each task, and the share of old images predicted as new."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    tasks = list(range(len(records)))
    for key, label in (("new_acc", "new classes (current task)"), ("old_acc", "old classes"),
                       ("old_to_new", "old images predicted as new")):
        ys = [100 * r[key] if key in r else np.nan for r in records]
        ax.plot(tasks, ys, marker="o", label=label)
    ax.set_xlabel("after training task")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_xticks(tasks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("old / new classes", fontsize=9)
    fig.tight_layout()
    return fig


def plot_curves(curves: Mapping[str, Sequence[float]], spreads: Mapping[str, Sequence[float]] | None = None,
                title: str = "accuracy on all seen classes", ylabel: str = "accuracy (%)") -> Any:
    """Accuracy after each task for several methods on one figure (optional +- spread bands)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=100)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D"]
    for k, (name, ys) in enumerate(curves.items()):  # past the colour cycle: another line style and marker
        x = np.arange(len(ys))
        y = 100 * np.asarray(ys, dtype=np.float64)
        colour, turn = colours[k % len(colours)], k // len(colours)
        ax.plot(x, y, color=colour, linestyle=styles[turn % 4], marker=markers[turn % 4], markersize=3, label=name)
        if spreads and name in spreads:
            s = 100 * np.asarray(spreads[name], dtype=np.float64)
            ax.fill_between(x, y - s, y + s, color=colour, alpha=0.12)
    ax.set_xlabel("after training task")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def figure_to_image(fig: Any) -> torch.Tensor:
    """A matplotlib figure as a ``(3, H, W)`` uint8 tensor (closes the figure)."""
    plt = _pyplot()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    plt.close(fig)
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).contiguous()


def render_accuracy_matrix(R: Matrix) -> torch.Tensor:
    """The accuracy matrix plot as a ``(3, H, W)`` uint8 tensor for ``SummaryWriter.add_image``."""
    return figure_to_image(plot_accuracy_matrix(R))


def save_figure(fig: Any, path: Any) -> None:
    """Write ``fig`` as a PNG (atomically: a reader never sees half a file) and close it."""
    from models.utils.atomic import atomic_path

    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
