"""Numerical-stability monitoring and recovery: NaN/Inf and spike detection, rollback, lower LR, stop.

After every backward ``StabilityMonitor`` checks, in this order, the loss, the model's health signals, the
gradients and the parameters: non-finite values fail at once; the loss, the total gradient norm and each
signal also fail when they exceed ``spike_factor`` times their running median (over the last ``window``
good steps, once ``min_history`` are known). On a failure it

1. skips the update (gradients are dropped; with a fp16 ``GradScaler`` they are set to inf so the scaler
   skips the step and lowers its scale),
2. rolls the trainable parameters, buffers and every optimizer's state back to the last good in-memory
   snapshot (taken every ``snapshot_every`` good batches, on the CPU),
3. multiplies every learning rate (and LR schedulers' ``base_lrs``) by ``lr_factor``, and continues.

After ``max_consecutive_failures`` failures in a row it saves ``diverged.ckpt`` (the rolled-back state)
and raises :class:`DivergenceError` naming what diverged first (the loss, a signal or a parameter).
Under DDP the decision is shared (any rank failing fails all), so ranks stay in step.

Health-signal hook (the ``HealthSignals`` protocol of ``callbacks/protocols.py``): a LightningModule may define
``health_signals(self) -> dict[str, torch.Tensor]``. It is
called once per backward (after the backward, before the optimizer step) and returns scalar tensors (or
floats) for which larger means less healthy (bounds, norms, condition numbers). Each is logged as
``health/<name>`` and fails when non-finite or, with ``check_signal_spikes``, when it spikes.

Logged every batch: ``stability/grad_norm``, ``stability/param_norm``, ``stability/loss_scale`` (when the
precision plugin has a scaler), ``stability/lr_scale`` and ``stability/failures``.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning_utilities.core.apply_func import apply_to_collection

from callbacks.protocols import HealthSignals

log = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """Training kept diverging after rollbacks; the message names what diverged first."""


def _to_cpu(x: Any) -> Any:
    return apply_to_collection(x, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))


class StabilityMonitor(L.Callback):
    """Detect NaN/Inf and spikes, roll back and lower the LR, stop after repeated failures.

    Args:
        spike_factor: a value above ``spike_factor * running median`` is a spike.
        window: number of good steps in the running median.
        min_history: good steps needed before spikes are checked.
        snapshot_every: take an in-memory snapshot every this many good batches.
        lr_factor: learning-rate multiplier applied at every rollback.
        max_consecutive_failures: failures in a row before stopping with a checkpoint.
        check_grad_spikes: also flag spikes of the gradient norm.
        check_signal_spikes: also flag spikes of the health signals.
        recover: ``False`` only monitors and logs (failures still count and stop the run).
    """

    def logged_metrics(self) -> list[str]:
        """The names this callback logs through the module (``LoggedMetrics``)."""
        return ["stability/*", "health/*"]

    def __init__(
        self,
        spike_factor: float = 10.0,
        window: int = 50,
        min_history: int = 10,
        snapshot_every: int = 20,
        lr_factor: float = 0.5,
        max_consecutive_failures: int = 3,
        check_grad_spikes: bool = True,
        check_signal_spikes: bool = True,
        recover: bool = True,
    ) -> None:
        for key, value in dict(spike_factor=spike_factor - 1, window=window, snapshot_every=snapshot_every,
                               max_consecutive_failures=max_consecutive_failures).items():
            if value <= 0:
                raise ValueError(f"{key} must be > {1 if key == 'spike_factor' else 0}")
        if not 0 < lr_factor <= 1:
            raise ValueError(f"lr_factor must be in (0, 1], got {lr_factor}")
        self.spike_factor, self.min_history, self.snapshot_every = spike_factor, min_history, snapshot_every
        self.lr_factor, self.max_consecutive_failures = lr_factor, max_consecutive_failures
        self.check_grad_spikes, self.check_signal_spikes, self.recover = check_grad_spikes, check_signal_spikes, recover
        self.window = window
        self.history: dict[str, deque[float]] = {}
        self.failures = 0
        self.consecutive_failures = 0
        self.first_failure: str | None = None
        self.lr_scale = 1.0
        self.good_batches = 0
        self.snapshot_step: int | None = None
        self._snapshot: dict[str, Any] | None = None
        self._loss: torch.Tensor | None = None
        self._metrics: dict[str, float] = {}
        self._batch_failed = False

    # ---- checkpointed state -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {k: list(v) for k, v in self.history.items()}, "failures": self.failures,
            "consecutive_failures": self.consecutive_failures, "first_failure": self.first_failure,
            "lr_scale": self.lr_scale, "good_batches": self.good_batches, "snapshot_step": self.snapshot_step,
            "snapshot": self._snapshot,  # a rollback after a resume goes where the uninterrupted run's would
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: deque(v, maxlen=self.window) for k, v in state_dict["history"].items()}
        for key in ("failures", "consecutive_failures", "first_failure", "lr_scale", "good_batches", "snapshot_step"):
            setattr(self, key, state_dict[key])
        self._snapshot = state_dict.get("snapshot")  # None in checkpoints of older versions: taken at train start

    # ---- hooks --------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._snapshot = None  # before a resumed run's checkpoint is loaded: a reused callback snapshots afresh

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._snapshot is None:  # (a resumed run's comes from the checkpoint)
            self._take_snapshot(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_failed = False

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self._loss = loss.detach()

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reasons, values, spiky = self._check(trainer, pl_module)
        self._metrics = values
        failed = trainer.strategy.reduce_boolean_decision(bool(reasons), all=False)
        if not failed:
            for key in spiky:
                self.history.setdefault(key, deque(maxlen=self.window)).append(values[key])
            return
        reason = "; ".join(reasons[:3]) if reasons else "another rank diverged"
        self.failures += 1
        self.consecutive_failures += 1
        self._batch_failed = True
        if self.consecutive_failures == 1:
            self.first_failure = reason
        self._skip_update(trainer, pl_module)
        if self.recover:
            self._rollback(trainer, pl_module)
        log.warning(
            "StabilityMonitor: step %d: %s; update skipped%s (failure %d in a row)",
            trainer.global_step, reason,
            f", rolled back to step {self.snapshot_step}, lr x{self.lr_scale:g}" if self.recover else "",
            self.consecutive_failures,
        )
        if self.consecutive_failures >= self.max_consecutive_failures:
            folder = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
            path = str(Path(folder) / "diverged.ckpt")
            trainer.save_checkpoint(path)
            raise DivergenceError(
                f"StabilityMonitor: training diverged {self.consecutive_failures} times in a row (last good "
                f"snapshot: step {self.snapshot_step}); first diverged: {self.first_failure}. "
                f"Checkpoint of the last good state: {path}"
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._batch_failed:
            self.consecutive_failures = 0
            self.good_batches += 1
            if self.recover and self.good_batches % self.snapshot_every == 0:
                self._take_snapshot(trainer, pl_module)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        metrics = {f"stability/{k}" if not k.startswith("health/") else k: v for k, v in self._metrics.items()
                   if k != "loss" and math.isfinite(v)}
        if scaler is not None:
            metrics["stability/loss_scale"] = float(scaler.get_scale())
        metrics.update({"stability/lr_scale": self.lr_scale, "stability/failures": float(self.failures)})
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=True, on_epoch=False)

    # ---- checks -------------------------------------------------------------------------------------
    def _check(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> tuple[list[str], dict[str, float], list[str]]:
        """Reasons for failure (in check order), the values measured this step, the keys checked for spikes."""
        reasons: list[str] = []
        values: dict[str, float] = {}
        spiky: list[str] = []
        largest_grad = ""
        if self._loss is not None:
            values["loss"] = float(self._loss.float().mean())
            spiky.append("loss")
            if not math.isfinite(values["loss"]):
                reasons.append(f"loss is {values['loss']}")
        signals = pl_module.health_signals() if isinstance(pl_module, HealthSignals) else {}
        for name, value in signals.items():
            key = f"health/{name}"
            values[key] = float(torch.as_tensor(value).detach().float())
            if self.check_signal_spikes:
                spiky.append(key)
            if not math.isfinite(values[key]):
                reasons.append(f"health signal {name!r} is {values[key]}")
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        with torch.no_grad():
            grads = [(n, p.grad) for n, p in named if p.grad is not None]
            if grads:
                norms = torch.stack([torch.linalg.vector_norm(g.float()) for _, g in grads])
                scaler = getattr(trainer.precision_plugin, "scaler", None)
                scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
                values["grad_norm"] = float(torch.linalg.vector_norm(norms)) / scale
                if not math.isfinite(values["grad_norm"]):
                    if scaler is None or not scaler.is_enabled():  # with a scaler, inf grads are its business
                        bad = next(n for (n, _), v in zip(grads, norms.tolist()) if not math.isfinite(v))
                        reasons.append(f"gradient of parameter {bad!r} is not finite")
                elif self.check_grad_spikes:
                    spiky.append("grad_norm")
                    largest_grad = grads[int(norms.argmax())][0]
            pnorms = torch.stack([torch.linalg.vector_norm(p.detach().float()) for _, p in named]) if named else None
            if pnorms is not None:
                values["param_norm"] = float(torch.linalg.vector_norm(pnorms))
                if not math.isfinite(values["param_norm"]):
                    bad = next(n for (n, _), v in zip(named, pnorms.tolist()) if not math.isfinite(v))
                    reasons.append(f"parameter {bad!r} is not finite")
        for key in spiky:
            hist = self.history.get(key)
            if not math.isfinite(values[key]) or hist is None or len(hist) < self.min_history:
                continue
            median = statistics.median(hist)
            if median > 0 and values[key] > self.spike_factor * median:
                what = {"loss": "loss", "grad_norm": f"gradient norm (largest: parameter {largest_grad!r})"}.get(
                    key, f"health signal {key[len('health/'):]!r}")
                reasons.append(f"{what} spiked to {values[key]:.4g} (> {self.spike_factor:g} x median {median:.4g})")
        return reasons, values, spiky

    # ---- recovery -----------------------------------------------------------------------------------
    def _skip_update(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        for p in pl_module.parameters():
            if p.grad is not None:
                if scaler is not None and scaler.is_enabled():
                    p.grad.fill_(float("inf"))  # the scaler skips this step and lowers its scale
                else:
                    p.grad = None  # optimizers skip parameters without gradient

    def _take_snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._snapshot = {
            "params": {n: _to_cpu(p) for n, p in pl_module.named_parameters() if p.requires_grad},
            "buffers": {n: _to_cpu(b) for n, b in pl_module.named_buffers()},
            "optimizers": [_to_cpu(opt.state_dict()) for opt in trainer.optimizers],
        }
        self.snapshot_step = trainer.global_step

    def _rollback(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        snap = self._snapshot
        assert snap is not None, "StabilityMonitor: no snapshot (on_train_start was not called)"
        with torch.no_grad():
            for n, p in pl_module.named_parameters():
                if n in snap["params"]:
                    p.copy_(snap["params"][n])
            for n, b in pl_module.named_buffers():
                if n in snap["buffers"]:
                    b.copy_(snap["buffers"][n])
        for opt, state in zip(trainer.optimizers, snap["optimizers"]):
            lrs = [group["lr"] for group in opt.param_groups]
            opt.load_state_dict(state)
            for group, lr in zip(opt.param_groups, lrs):
                group["lr"] = lr * self.lr_factor
        for config in trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [lr * self.lr_factor for lr in config.scheduler.base_lrs]
        self.lr_scale *= self.lr_factor
