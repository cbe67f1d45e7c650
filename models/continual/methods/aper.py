"""``aper``: first-session adaptation (APER / ADAM, Zhou et al. 2024; RanPAC's optional phase 1): a LoRA is trained
on the first task only, then frozen with the backbone; the features are the concatenation of the frozen
backbone's and the adapted backbone's pooled features. Meant with ``classifier: ncm`` (APER's prototypes) or
``classifier: ridge`` (RanPAC with first-session adaptation)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from models.adapters.lora import LoRAAdapter, inject_lora
from models.continual.base import ContinualMethod, register_method
from models.continual.methods.lora import lora_off, lora_relative_delta


@register_method("aper")
class APERMethod(ContinualMethod):
    """LoRA trained in task 0 only; features ``[frozen(x), adapted(x)]``.

    Args:
        lora_r: rank of the first-session LoRA.
        lora_alpha: scaling numerator (``None``: the rank).
        lora_target_modules: layers that get LoRA (``None``: attention and MLP linears).
    """

    def __init__(self, lora_r: int = 8, lora_alpha: float | None = None,
                 lora_target_modules: None | str | Sequence[str] = None) -> None:
        self.r, self.alpha, self.targets = lora_r, lora_alpha, lora_target_modules

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        alpha = float(self.r if self.alpha is None else self.alpha)
        inject_lora(model.backbone, self.targets, r=self.r, lora_alpha=alpha)

    def feature_dim(self, dim: int) -> int:
        return 2 * dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        with lora_off(self.model.backbone), torch.no_grad():
            frozen = self.model.backbone(x)
        return torch.cat([frozen, self.model.backbone(x)], dim=-1)

    def adapter_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        fast = [p for m in self.model.backbone.modules() if isinstance(m, LoRAAdapter) for p in m.parameters()]
        return {"fast": fast if task == 0 else [], "slow": [], "descriptors": []}

    def adapters_off(self):  # noqa: ANN201 - context manager
        return lora_off(self.model.backbone)

    def relative_delta(self) -> float:
        return lora_relative_delta(self.model.backbone)
