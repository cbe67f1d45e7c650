"""``lora``: one LoRA per targeted linear of the frozen backbone, trained on every task."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

from torch import nn

from models.adapters.lora import LoRAAdapter, inject_lora, lora_layers
from models.continual.base import ContinualMethod, register_method


def lora_relative_delta(backbone: nn.Module) -> float:
    """sqrt(sum ||delta W||^2) / sqrt(sum ||W||^2) over the LoRA layers of ``backbone``."""
    delta = base = 0.0
    for layer in lora_layers(backbone).values():
        delta += float(layer.delta_weight().detach().square().sum())
        base += float(layer.weight.detach().float().square().sum())
    return math.sqrt(delta / base) if base else 0.0


@contextlib.contextmanager
def lora_off(backbone: nn.Module) -> Iterator[None]:
    """Every LoRA adapter's scaling set to 0 inside (their weights untouched)."""
    adapters = [m for m in backbone.modules() if isinstance(m, LoRAAdapter)]
    saved = [a.scaling for a in adapters]
    try:
        for a in adapters:
            a.scaling = 0.0
        yield
    finally:
        for a, s in zip(adapters, saved):
            a.scaling = s


@register_method("lora")
class LoRAMethod(ContinualMethod):
    """LoRA of rank ``lora_r`` on the targeted linears.

    Args:
        lora_r: rank.
        lora_alpha: scaling numerator (``None``: the rank, scaling 1).
        lora_target_modules: layers that get LoRA (``None``: attention and MLP linears).
    """

    def __init__(self, lora_r: int = 8, lora_alpha: float | None = None,
                 lora_target_modules: None | str | Sequence[str] = None) -> None:
        self.r, self.alpha, self.targets = lora_r, lora_alpha, lora_target_modules

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        alpha = float(self.r if self.alpha is None else self.alpha)
        inject_lora(model.backbone, self.targets, r=self.r, lora_alpha=alpha)

    def adapter_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        fast = [p for m in self.model.backbone.modules() if isinstance(m, LoRAAdapter) for p in m.parameters()]
        return {"fast": fast, "slow": [], "descriptors": []}

    def adapters_off(self):  # noqa: ANN201 - context manager
        return lora_off(self.model.backbone)

    def relative_delta(self) -> float:
        return lora_relative_delta(self.model.backbone)
