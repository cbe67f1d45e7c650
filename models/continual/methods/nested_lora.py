"""``nested_lora``: a slow and a fast LoRA per targeted linear (``models.adapters.nested_lora``); the slow optimizer
steps every ``slow_update_interval`` batches (``callbacks.multi_rate``) and the fast delta is folded into the slow
one at every task end (``callbacks.consolidation``, added by the LightningModule when ``use_consolidation``)."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from models.adapters.nested_lora import FAST, SLOW, adapter_parameters, delta_norms, inject_nested_lora
from models.continual.base import ContinualMethod, register_method
from models.continual.methods.lora import lora_off, lora_relative_delta


@register_method("nested_lora")
class NestedLoRAMethod(ContinualMethod):
    """Slow + fast LoRA.

    Args:
        nested_lora_r: rank of the fast adapter (and of the slow one unless ``nested_slow_r`` is set).
        nested_slow_r: rank of the slow adapter (``None``: ``nested_lora_r``; ``2r`` makes the task-end fold-in of
            a rank-r fast delta exact when the slow delta still has rank <= r).
        lora_alpha: scaling numerator (``None``: each adapter's rank, scaling 1).
        lora_target_modules: layers that get the adapters (``None``: attention and MLP linears).
        use_consolidation: fold fast into slow at task ends (``TaskBoundaryConsolidation``).
    """

    def __init__(self, nested_lora_r: int = 4, nested_slow_r: int | None = None, lora_alpha: float | None = None,
                 lora_target_modules: None | str | Sequence[str] = None, use_consolidation: bool = True) -> None:
        self.r, self.slow_r, self.alpha, self.targets = nested_lora_r, nested_slow_r, lora_alpha, lora_target_modules
        self.use_consolidation = use_consolidation

    @property
    def consolidates(self) -> bool:  # type: ignore[override]
        return self.use_consolidation

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        inject_nested_lora(model.backbone, self.targets, self.r, self.alpha, slow_rank=self.slow_r)

    def adapter_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        return {"fast": adapter_parameters(self.model.backbone, FAST),
                "slow": adapter_parameters(self.model.backbone, SLOW), "descriptors": []}

    def adapters_off(self):  # noqa: ANN201 - context manager
        return lora_off(self.model.backbone)

    def relative_delta(self) -> float:
        return lora_relative_delta(self.model.backbone)

    def diagnostics(self) -> dict[str, float]:
        return {f"nested/{k}_delta_norm": v for k, v in delta_norms(self.model.backbone).items()}
