"""Classifiers fitted from feature statistics, chosen by ``classifier`` (``linear`` is the trained head itself).

- ``ncm`` (SimpleCIL / APER): class prototypes = mean feature of each class's training images; logits are the
  cosine similarities to the prototypes.
- ``ridge`` (RanPAC, McDonnell et al. 2023): a fixed Gaussian random projection ``W`` (d x M) and ReLU,
  ``h = relu(f W)``; the second-order statistics ``G = sum h h^T`` and ``C = sum h y^T`` are accumulated task by
  task and the classifier is ``(G + lambda I)^-1 C``, with ``lambda`` chosen from a grid by accuracy on the new
  task's validation images (over every seen class). Order-invariant: after the last task it equals the batch
  solve on all training data.

Both are fitted at task ends (``fit_task``) from the training images of that task only (no old data is kept) and
stored in fixed-size buffers, so checkpoints resume them.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: ridge lambdas tried (RanPAC's grid: 10^-8 .. 10^5)
RIDGE_LAMBDAS: tuple[float, ...] = tuple(10.0 ** k for k in range(-8, 6))


class StatsClassifier(nn.Module):
    """Base: ``fitted`` classes (a prefix of the label range) and the ``fit_task`` / ``forward`` contract."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("fitted", torch.zeros((), dtype=torch.long))

    def fit_task(self, feats: torch.Tensor, labels: torch.Tensor, n_seen: int,
                 val: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
        raise NotImplementedError


class NCMClassifier(StatsClassifier):
    """Cosine nearest class mean.

    Args:
        dim: feature width.
        num_classes: classes of the sequence.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__(num_classes)
        self.register_buffer("sums", torch.zeros(num_classes, dim, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.float64))

    @torch.no_grad()
    def fit_task(self, feats: torch.Tensor, labels: torch.Tensor, n_seen: int,
                 val: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
        self.sums.index_add_(0, labels, feats.double())
        self.counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        self.fitted.fill_(n_seen)
        return {}

    def prototypes(self) -> torch.Tensor:
        return self.sums / self.counts.clamp_min(1)[:, None]

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        p = self.prototypes()[: int(self.fitted)].to(f.dtype)
        return F.normalize(f, dim=-1) @ F.normalize(p, dim=-1).t()


class RidgeClassifier(StatsClassifier):
    """Random projection + ReLU + ridge regression on one-hot targets.

    Args:
        dim: feature width.
        num_classes: classes of the sequence.
        ridge_dim: projection width M (RanPAC: 10 000; 0 = no projection, ridge on the features themselves).
        seed: seed of the projection.
        lambdas: candidate ridge penalties.
    """

    def __init__(self, dim: int, num_classes: int, ridge_dim: int = 1000, seed: int = 0,
                 lambdas: Sequence[float] = RIDGE_LAMBDAS) -> None:
        super().__init__(num_classes)
        m = ridge_dim or dim
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(dim, ridge_dim, generator=g) if ridge_dim else torch.empty(0))
        self.register_buffer("G", torch.zeros(m, m, dtype=torch.float64))
        self.register_buffer("C", torch.zeros(m, num_classes, dtype=torch.float64))
        self.register_buffer("W", torch.zeros(m, num_classes))
        self.register_buffer("lam", torch.zeros((), dtype=torch.float64))
        self.lambdas = tuple(float(v) for v in lambdas)

    def embed(self, f: torch.Tensor) -> torch.Tensor:
        return F.relu(f @ self.projection.to(f.dtype)) if self.projection.numel() else f

    @torch.no_grad()
    def accumulate(self, feats: torch.Tensor, labels: torch.Tensor) -> None:
        h = self.embed(feats.float()).double()
        self.G += h.t() @ h
        self.C += h.t() @ F.one_hot(labels, self.num_classes).double()

    @staticmethod
    def solve(G: torch.Tensor, C: torch.Tensor, lam: float) -> torch.Tensor:
        """``(G + lam I)^-1 C`` (float64)."""
        return torch.linalg.solve(G + lam * torch.eye(len(G), dtype=G.dtype, device=G.device), C)

    @torch.no_grad()
    def fit_task(self, feats: torch.Tensor, labels: torch.Tensor, n_seen: int,
                 val: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
        self.accumulate(feats, labels)
        C = self.C[:, :n_seen]
        evals, evecs = torch.linalg.eigh(self.G)  # one decomposition serves every lambda
        evals = evals.clamp_min(0)
        VtC = evecs.t() @ C
        scores = {}
        if val is not None and len(self.lambdas) > 1:
            hv = self.embed(val[0].float()).double()
            for lam in self.lambdas:
                W = evecs @ (VtC / (evals + lam)[:, None])
                scores[lam] = float(((hv @ W).argmax(-1) == val[1]).double().mean())
            best = max(self.lambdas, key=lambda lam: (scores[lam], lam))  # ties: the larger penalty
        else:
            best = self.lambdas[len(self.lambdas) // 2] if len(self.lambdas) > 1 else self.lambdas[0]
        self.lam.fill_(best)
        self.W.zero_()
        self.W[:, :n_seen] = (evecs @ (VtC / (evals + best)[:, None])).float()
        self.fitted.fill_(n_seen)
        return {"ridge/lambda": best, **({"ridge/val_acc": scores[best]} if scores else {})}

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.embed(f) @ self.W[:, : int(self.fitted)].to(f.dtype)


CLASSIFIERS: dict[str, type[StatsClassifier] | None] = {"linear": None, "ncm": NCMClassifier, "ridge": RidgeClassifier}


def create_classifier(name: str, dim: int, num_classes: int, ridge_dim: int = 1000,
                      ridge_seed: int = 0) -> StatsClassifier | None:
    """The classifier ``name`` (``None`` for ``linear``: the trained head classifies)."""
    if name not in CLASSIFIERS:
        raise ValueError(f"classifier must be one of {tuple(CLASSIFIERS)}, got {name!r}")
    cls = CLASSIFIERS[name]
    if cls is RidgeClassifier:
        return RidgeClassifier(dim, num_classes, ridge_dim, ridge_seed)
    return None if cls is None else cls(dim, num_classes)
