"""``aper``: first-session adaptation (APER / ADAM, Zhou et al. 2024; RanPAC's optional phase 1): a LoRA is trained
on the first task only, then frozen with the backbone; the features are the concatenation of the frozen
backbone's and the adapted backbone's pooled features. Meant with ``classifier: ncm`` (APER's prototypes) or
``classifier: ridge`` (RanPAC with first-session adaptation)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from models.continual.base import register_method
from models.continual.methods.lora import LoRAMethod, lora_off


@register_method("aper")
class APERMethod(LoRAMethod):
    """LoRA (as :class:`LoRAMethod`) trained in task 0 only; features ``[frozen(x), adapted(x)]``.

    Args:
        lora_r: rank of the first-session LoRA.
        lora_alpha: scaling numerator (``None``: the rank).
        lora_target_modules: layers that get LoRA (``None``: attention and MLP linears).
        aper_phases: training phases of the first task (each ``epochs_per_task`` Lightning epochs with fresh
            optimizers and schedule): the adaptation's length, longer than a regular task's when > 1.
    """

    def __init__(self, lora_r: int = 8, lora_alpha: float | None = None,
                 lora_target_modules: None | str | Sequence[str] = None, aper_phases: int = 1) -> None:
        super().__init__(lora_r, lora_alpha, lora_target_modules)
        if aper_phases < 1:
            raise ValueError(f"aper_phases must be >= 1, got {aper_phases}")
        self.aper_phases = aper_phases

    def phases(self, task: int) -> int:
        return self.aper_phases if task == 0 else 1

    def feature_dim(self, dim: int) -> int:
        return 2 * dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with lora_off(self.model.backbone), torch.no_grad():
            frozen = self.model.backbone(x)
        return torch.cat([frozen, self.model.backbone(x)], dim=-1)

    def adapter_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        groups = super().adapter_groups(task)
        return {**groups, "fast": groups["fast"] if task == 0 else []}
