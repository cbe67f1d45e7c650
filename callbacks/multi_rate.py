"""Multi-rate optimizer stepping for manual optimization (Nested Learning's multi-frequency rule).

Contract with the LightningModule: in manual optimization its ``training_step`` computes the loss and calls
``self.manual_backward(loss)`` (once per micro-batch); it never steps or zeroes an optimizer. This
callback does all stepping in ``on_train_batch_end``, so a batch split into micro-batches by another
callback still counts as one batch:

- optimizer 0 (fast) steps and zeroes its gradients after every batch;
- every other optimizer (slow) steps every ``slow_update_interval`` batches (0 or 1: every batch).
  ``slow_grad_mode: accumulate`` applies the sum of the gradients of those batches; ``discard`` drops the
  in-between gradients, so only the last batch's gradient is applied. Between updates slow parameters
  do not move. A window still open at the end of a task (when the module is a ``TaskSequenceModule``, see
  ``callbacks/protocols.py``) is closed there, so gradients never leak into the next task.
- each optimizer's scheduler steps right after its optimizer.

``trainer.global_step`` counts fast steps, i.e. training batches (Lightning only counts steps taken
inside ``training_step``, so the callback advances it). Under DDP each backward synchronises gradients
once, so accumulated slow gradients are sums of synchronised gradients. The counters are part of the
callback's ``state_dict`` and the gradients accumulated in an open slow window are saved in the checkpoint
(``multi_rate_slow_grads``) and put back before the first batch after a resume, so a resumed run keeps its
phase and its window: its next slow step applies the same sum as an uninterrupted run would.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback

from callbacks.protocols import TaskSequenceModule


class MultiRateStepping(Callback):
    """Steps optimizer 0 every batch and the others every ``slow_update_interval`` batches.

    Args:
        slow_update_interval: batches per slow update; ``None`` reads the LightningModule's
            ``slow_update_interval`` attribute (1 when it has none).
        slow_grad_mode: ``accumulate`` (sum of the window's gradients) or ``discard`` (last batch only).
        log_lr: log the learning rate of every optimizer's parameter groups (``lr/<group name>`` when a group has a
            ``name``, else ``lr/fast`` / ``lr/slow`` for the first group of each optimizer) and the slow interval
            each batch.
    """

    def logged_metrics(self) -> list[str]:
        """The names this callback logs through the module (``LoggedMetrics``)."""
        return ["lr/*", "train/slow_interval"]

    def __init__(
        self,
        slow_update_interval: int | None = None,
        slow_grad_mode: Literal["accumulate", "discard"] = "accumulate",
        log_lr: bool = True,
    ) -> None:
        if slow_update_interval is not None and slow_update_interval < 0:
            raise ValueError(f"slow_update_interval must be >= 0, got {slow_update_interval}")
        if slow_grad_mode not in ("accumulate", "discard"):
            raise ValueError(f"slow_grad_mode must be 'accumulate' or 'discard', got {slow_grad_mode!r}")
        self.slow_update_interval = slow_update_interval
        self.slow_grad_mode = slow_grad_mode
        self.log_lr = log_lr
        self.fast_steps = 0  # batches that stepped the fast optimizer
        self.slow_steps = 0  # updates of the slow optimizer(s)
        self.window = 0  # batches accumulated in the open slow window
        self._restore_grads: list[list[Any]] | None = None  # slow gradients read from a checkpoint

    def interval(self, pl_module: L.LightningModule) -> int:
        value = self.slow_update_interval
        if value is None:
            value = int(getattr(pl_module, "slow_update_interval", 1))
        return max(1, value)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and pl_module.automatic_optimization:
            raise ValueError(
                f"MultiRateStepping needs manual optimization, but {type(pl_module).__name__} uses automatic "
                "optimization (set `self.automatic_optimization = False`)"
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        optimizers = pl_module.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        if not optimizers:
            return
        schedulers = {id(c.scheduler.optimizer): c.scheduler for c in trainer.lr_scheduler_configs}
        self._step(optimizers[0], schedulers)
        self.fast_steps += 1
        progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()
        if len(optimizers) > 1:
            self.window += 1
            task_end = isinstance(pl_module, TaskSequenceModule) and pl_module.is_task_end_batch(batch_idx)
            if self.window >= self.interval(pl_module) or task_end:
                for opt in optimizers[1:]:
                    self._step(opt, schedulers)
                self.slow_steps += 1
                self.window = 0
            elif self.slow_grad_mode == "discard":
                for opt in optimizers[1:]:
                    opt.zero_grad(set_to_none=True)
        if self.log_lr:
            names = ["fast"] + (["slow"] if len(optimizers) == 2 else [f"slow{k}" for k in range(1, len(optimizers))])
            metrics = {}
            for name, opt in zip(names, optimizers):
                for k, group in enumerate(opt.param_groups):  # a group's own "name" wins (lr/head, lr/fast, ...)
                    metrics[f"lr/{group.get('name') or (name if k == 0 else f'{name}_group{k}')}"] = group["lr"]
            metrics["train/slow_interval"] = float(self.interval(pl_module))
            pl_module.log_dict(metrics, on_step=True, on_epoch=False)

    @staticmethod
    def _step(opt: Any, schedulers: dict[int, Any]) -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)
        scheduler = schedulers.get(id(opt.optimizer))
        if scheduler is not None:
            scheduler.step()

    def on_task_start(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        """``TaskBoundaryHooks``: a new task starts with an empty slow window (its optimizers are fresh)."""
        self.window = 0

    @staticmethod
    def _slow_params(pl_module: L.LightningModule) -> list[list[Any]]:
        optimizers = pl_module.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        return [[p for group in opt.param_groups for p in group["params"]] for opt in optimizers[1:]]

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Save the open window's accumulated slow gradients (None where a parameter has none)."""
        if self.window > 0 and trainer.optimizers:
            checkpoint["multi_rate_slow_grads"] = [
                [None if p.grad is None else p.grad.detach().cpu().clone() for p in params]
                for params in self._slow_params(pl_module)]

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._restore_grads = checkpoint.get("multi_rate_slow_grads")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        """First batch after a resume: put the saved slow gradients back (the optimizers exist by now)."""
        if self._restore_grads is None:
            return
        saved, self._restore_grads = self._restore_grads, None
        current = self._slow_params(pl_module)
        if [len(p) for p in current] != [len(g) for g in saved]:
            raise RuntimeError("the checkpoint's accumulated slow gradients do not match the slow optimizers' "
                               f"parameters ({[len(g) for g in saved]} vs {[len(p) for p in current]})")
        for params, grads in zip(current, saved):
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype)

    def state_dict(self) -> dict[str, int]:
        return {"fast_steps": self.fast_steps, "slow_steps": self.slow_steps, "window": self.window}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.fast_steps = state_dict["fast_steps"]
        self.slow_steps = state_dict["slow_steps"]
        self.window = state_dict["window"]
