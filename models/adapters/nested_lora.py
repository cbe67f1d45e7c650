"""Nested LoRA: a slow and a fast LoRA on every targeted linear, always summed.

    y = W x + slow(x) + fast(x)

The fast adapter learns each task at a high rate; the slow one changes rarely (see
``callbacks.multi_rate.MultiRateStepping``) and, at task boundaries, absorbs the fast one in weight space:
``slow <- slow + alpha * fast`` (``callbacks.consolidation.TaskBoundaryConsolidation``). Built on
``LoRALinear.add_adapter``, so everything in ``models.adapters.lora`` (save/load, merge) keeps working.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from models.adapters.lora import LoRAAdapter, LoRALinear, inject_lora, lora_layers

SLOW, FAST = "slow", "fast"


class NestedLoRALinear(LoRALinear):
    """A :class:`LoRALinear` with ``slow`` and ``fast`` adapters computed as one rank-``2r`` product:
    ``x [s_s A_s; s_f A_f]^T [B_s, B_f]^T`` equals ``slow(x) + fast(x)`` (up to float rounding) at the cost
    of a single LoRA of rank ``r_s + r_f``. Other cases (merged, dropout, more adapters) use the plain sum."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        slow, fast = self.adapters[SLOW], self.adapters[FAST]
        fusable = (not self.merged_adapters and len(self.adapters) == 2
                   and isinstance(slow.dropout, nn.Identity) and isinstance(fast.dropout, nn.Identity))
        if not fusable:
            return super().forward(x)
        A = torch.cat([slow.lora_A * slow.scaling, fast.lora_A * fast.scaling])
        B = torch.cat([slow.lora_B, fast.lora_B], dim=1)
        y = self.base(x)
        return y + (x.to(A.dtype) @ A.t() @ B.t()).to(y.dtype)


def inject_nested_lora(
    model: nn.Module,
    target_modules: None | str | Sequence[str] = None,
    rank: int = 4,
    lora_alpha: float | None = None,
    slow_rank: int | None = None,
) -> list[str]:
    """Give every targeted linear a ``slow`` adapter of rank ``slow_rank`` (``None``: ``rank``) and a ``fast``
    adapter of rank ``rank``; returns their names.

    ``lora_alpha`` defaults to each adapter's rank (scaling 1), so the consolidated slow delta is the plain sum.
    """
    slow_rank = rank if slow_rank is None else slow_rank
    alpha = float(rank if lora_alpha is None else lora_alpha)
    slow_alpha = float(slow_rank if lora_alpha is None else lora_alpha)
    names = inject_lora(model, target_modules, r=slow_rank, lora_alpha=slow_alpha, adapter_name=SLOW)
    for name, layer in lora_layers(model).items():
        nested = NestedLoRALinear(layer.base)
        nested.adapters = layer.adapters
        nested.add_adapter(FAST, rank, alpha)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, nested)
    return names


def nested_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA layers that carry both a slow and a fast adapter."""
    return {n: m for n, m in lora_layers(model).items() if SLOW in m.adapters and FAST in m.adapters}


def adapter_parameters(model: nn.Module, which: str) -> list[nn.Parameter]:
    """All parameters of the ``slow`` or ``fast`` adapters."""
    return [p for layer in nested_layers(model).values() for p in layer.adapters[which].parameters()]


@torch.no_grad()
def consolidate_layer(layer: LoRALinear, alpha: float) -> float:
    """Fold the fast delta into the slow adapter in weight space; returns the relative truncation error.

    Target: ``scale_s B_s A_s + alpha scale_f B_f A_f`` (rank up to 2r). It is re-factorised to the slow
    rank r with a truncated SVD ``U_r S_r V_r^T`` (the best rank-r approximation in Frobenius norm), split
    as ``B_s = U_r sqrt(S_r / scale_s)``, ``A_s = sqrt(S_r / scale_s) V_r^T``. The returned error is
    ``||target - new slow delta||_F / ||target||_F``: 0 only when the target has rank <= r. The slow adapter
    also trains during a task, so even at the first task's end the target is a sum of two non-zero rank-r
    deltas and the error is not 0 (0.17 measured on the glyph sequence); a larger slow rank
    (``nested_slow_r: 2r``) keeps more of the sum.
    """
    slow, fast = layer.adapters[SLOW], layer.adapters[FAST]
    target = slow.delta_weight().double() + alpha * fast.delta_weight().double()
    norm = torch.linalg.matrix_norm(target)
    if norm == 0:
        return 0.0
    U, S, Vh = torch.linalg.svd(target, full_matrices=False)
    r = slow.r
    root = (S[:r] / slow.scaling).sqrt()
    slow.lora_B.copy_((U[:, :r] * root).to(slow.lora_B.dtype))
    slow.lora_A.copy_((root[:, None] * Vh[:r]).to(slow.lora_A.dtype))
    return float(S[r:].square().sum().sqrt() / norm)


@torch.no_grad()
def reset_fast(layer: LoRALinear, generator: torch.Generator | None = None) -> None:
    """B_f <- 0 and A_f re-drawn (Kaiming uniform). Zeroing A too would freeze the adapter: with A = B = 0
    both gradients (dL/dB = g (A x)^T, dL/dA = B^T g x^T) vanish."""
    fast: LoRAAdapter = layer.adapters[FAST]
    bound = 1.0 / math.sqrt(fast.in_features)  # what kaiming_uniform_(a=sqrt(5)) gives, as in LoRAAdapter
    fast.lora_A.copy_(torch.rand(fast.lora_A.shape, generator=generator, dtype=torch.float32)
                      .mul_(2 * bound).sub_(bound).to(fast.lora_A))
    fast.lora_B.zero_()


def delta_norms(model: nn.Module) -> dict[str, float]:
    """Frobenius norms of the summed slow and fast deltas (root of the sum of squares over layers)."""
    out = {}
    for which in (SLOW, FAST):
        sq = sum(float(layer.adapters[which].delta_weight().detach().square().sum())
                 for layer in nested_layers(model).values())
        out[which] = math.sqrt(sq)
    return out
