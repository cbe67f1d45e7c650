"""Task-boundary consolidation of Nested LoRA: ``slow <- slow + alpha * fast`` in weight space, then reset fast.

At the end of each task (the ``on_task_end`` hook of ``callbacks.protocols.TaskBoundaryHooks``), for every
layer with ``slow`` and ``fast`` adapters the slow adapter is re-factorised to
``scale_s B_s A_s + alpha scale_f B_f A_f`` by a truncated SVD at the slow rank (approximate: a sum of
two rank-r products has rank up to 2r; the relative truncation error is logged), the fast adapter is
reset (B zeros, A re-drawn from a generator seeded by ``seed + task``, identical on every DDP rank) and the
fast optimizer's state is cleared. Events go to ``self.events``, the loggers and the console.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from models.adapters.nested_lora import FAST, consolidate_layer, delta_norms, nested_layers, reset_fast


class TaskBoundaryConsolidation(Callback):
    """Consolidate the fast LoRA into the slow one at every task end.

    Args:
        alpha: weight of the fast delta; ``None`` reads the module's ``consolidation_alpha`` (1.0 if absent).
        seed: base seed of the fast adapters' re-initialisation.
    """

    def __init__(self, alpha: float | None = None, seed: int = 0) -> None:
        self.alpha = alpha
        self.seed = seed
        self.events: list[dict[str, float]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not nested_layers(pl_module):
            raise ValueError(
                f"TaskBoundaryConsolidation needs Nested LoRA layers (adapter_type: nested_lora), "
                f"but {type(pl_module).__name__} has none"
            )

    def on_task_end(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        alpha = self.alpha if self.alpha is not None else float(getattr(pl_module, "consolidation_alpha", 1.0))
        generator = torch.Generator().manual_seed(self.seed + task)
        fast_norm = delta_norms(pl_module)["fast"]  # what is being folded in (zero after the reset)
        errors = []
        for layer in nested_layers(pl_module).values():
            errors.append(consolidate_layer(layer, alpha))
            reset_fast(layer, generator)
        fast_params = {id(p) for layer in nested_layers(pl_module).values() for p in layer.adapters[FAST].parameters()}
        for opt in trainer.optimizers:
            for p in list(opt.state):
                if id(p) in fast_params:
                    del opt.state[p]
        event = {"task": task, "alpha": alpha, "truncation_error_max": max(errors),
                 "truncation_error_mean": sum(errors) / len(errors),
                 "slow_delta_norm": delta_norms(pl_module)["slow"], "fast_delta_norm": fast_norm}
        self.events.append(event)
        rank_zero_info(f"[consolidation] task {task}: alpha={alpha:g}, relative truncation error "
                       f"mean {event['truncation_error_mean']:.3g} / max {event['truncation_error_max']:.3g}, "
                       f"|fast delta|={fast_norm:.4g} -> |slow delta|={event['slow_delta_norm']:.4g}")
        for logger in trainer.loggers:
            logger.log_metrics({f"consolidation/{k}": v for k, v in event.items() if k != "task"}, step=task)

    def state_dict(self) -> dict:
        return {"events": self.events}

    def load_state_dict(self, state_dict: dict) -> None:
        self.events = list(state_dict["events"])
