"""Out-of-memory recovery: split the failing batch into micro-batches and retry the same data.

``OOMRecovery`` wraps the LightningModule's ``training_step``. Each step's batch is cut into micro-batches
of ``micro_batch_size`` samples (the whole batch until the first OOM); every micro-batch runs the original
``training_step`` and its gradient (weighted by its share of the batch) is computed at once with
``torch.autograd.grad``, which frees its activations and leaves ``.grad`` untouched. The summed gradient
reaches ``.grad`` through one ordinary backward of the returned loss (automatic optimization) or one
``manual_backward`` call (manual optimization), so gradient scaling, DDP synchronisation, clipping and the
optimizer steps happen exactly once per batch, as without recovery.

On ``torch.OutOfMemoryError`` (or the CPU allocator's "can't allocate memory" ``RuntimeError``) anywhere in a
micro-batch's forward or backward, caches are freed, the micro-batch is halved (the accumulation count per
batch doubles, the effective batch is unchanged), torchmetrics states touched by the failed attempt are
restored, and the same batch is retried: no sample is skipped or counted twice. The smaller micro-batch is
kept for the rest of the run (and saved in checkpoints). After ``max_retries`` retries on one batch, or an
OOM at micro-batch 1, it saves ``oom-stop.ckpt`` (single-process runs) and stops with an error.

Assumes the loss is a mean over the batch (``loss_reduction="mean"``, weights ``len(micro)/len(batch)``)
or a sum (``"sum"``, weights 1). Only tensors whose first dimension is the batch size are split; other
batch entries are passed whole to every micro-batch. Values a failed attempt passed to ``self.log`` stay
in that step's logs (step values are overwritten by the retry). Under FSDP/DeepSpeed (sharded
parameters) ``torch.autograd.grad`` is not supported: setup refuses those strategies with a clear error;
use it with single-device or DDP strategies.
"""

from __future__ import annotations

import gc
import logging
import math
from pathlib import Path
from typing import Any, Callable, Literal

import lightning as L
import torch
from lightning.pytorch.utilities.data import extract_batch_size
from lightning_utilities.core.apply_func import apply_to_collection
from torchmetrics import Metric

log = logging.getLogger(__name__)

_CPU_OOM_MESSAGES = ("can't allocate memory", "cannot allocate memory", "not enough memory", "out of memory")


def is_out_of_memory(error: BaseException) -> bool:
    """``torch.OutOfMemoryError`` or a ``RuntimeError`` whose message is an allocator's out-of-memory."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _CPU_OOM_MESSAGES)


def split_batch(batch: Any, micro_batch_size: int) -> list[tuple[Any, int]]:
    """``(micro_batch, its size)`` pairs; tensors with the batch size as first dim are sliced, the rest kept."""
    n = extract_batch_size(batch)
    out = []
    for start in range(0, n, micro_batch_size):
        stop = min(n, start + micro_batch_size)
        part = apply_to_collection(
            batch, torch.Tensor, lambda t: t[start:stop] if t.dim() > 0 and t.shape[0] == n else t
        )
        out.append((part, stop - start))
    return out


class _InjectGrads(torch.autograd.Function):
    """A zero scalar whose backward hands precomputed gradients (times the incoming grad) to ``params``."""

    @staticmethod
    def forward(ctx: Any, grads: list[torch.Tensor | None], *params: torch.Tensor) -> torch.Tensor:
        ctx.grads = grads
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Any, ...]:
        return (None, *(None if g is None else g * grad_output.to(g.dtype) for g in ctx.grads))


def _metric_states(module: torch.nn.Module) -> list[tuple[Metric, dict[str, Any], int]]:
    """torchmetrics states of ``module`` before an attempt: tensor states copied, list states' lengths
    (they only grow by appending), so a failed attempt's updates can be undone cheaply."""
    return [
        (m, {k: len(v) if isinstance(v, list) else v.clone() for k in m._defaults if (v := getattr(m, k)) is not None},
         m._update_count)
        for m in module.modules()
        if isinstance(m, Metric)
    ]


def _restore_metric_states(states: list[tuple[Metric, dict[str, Any], int]]) -> None:
    for metric, state, count in states:
        for k, v in state.items():
            setattr(metric, k, getattr(metric, k)[:v] if isinstance(v, int) else v.clone())
        metric._update_count, metric._computed = count, None


class OOMRecovery(L.Callback):
    """Keep training through out-of-memory errors by shrinking the micro-batch (see module docstring).

    Args:
        max_retries: retries allowed on one batch before giving up.
        activation_checkpointing: on the first OOM also call ``set_grad_checkpointing(True)`` on every
            submodule that has it (timm models do).
        loss_reduction: how ``training_step``'s loss reduces over samples (sets micro-batch weights).
        micro_batch_size: start with this micro-batch (``None``: whole batches until the first OOM).
    """

    def __init__(
        self,
        max_retries: int = 8,
        activation_checkpointing: bool = False,
        loss_reduction: Literal["mean", "sum"] = "mean",
        micro_batch_size: int | None = None,
    ) -> None:
        if max_retries < 1:
            raise ValueError(f"max_retries must be >= 1, got {max_retries}")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or null, got {micro_batch_size}")
        self.max_retries = max_retries
        self.activation_checkpointing = activation_checkpointing
        self.loss_reduction = loss_reduction
        self.micro_batch_size = micro_batch_size
        self.recoveries: list[dict[str, int]] = []
        self._trainer: L.Trainer | None = None

    # ---- wiring -------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            raise ValueError(
                f"OOMRecovery does not support {strategy} (sharded parameters cannot take per-micro-batch "
                "torch.autograd.grad); use a single-device or DDP strategy, or remove OOMRecovery"
            )
        self._trainer = trainer
        original = pl_module.training_step
        pl_module.training_step = lambda batch, *a, **kw: self._step(pl_module, original, batch, a, kw)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and "training_step" in pl_module.__dict__:
            del pl_module.training_step

    def state_dict(self) -> dict[str, Any]:
        return {"micro_batch_size": self.micro_batch_size, "recoveries": list(self.recoveries)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.micro_batch_size = state_dict["micro_batch_size"]
        self.recoveries = list(state_dict["recoveries"])

    # ---- the wrapped step ---------------------------------------------------------------------------
    def _step(self, pl_module: L.LightningModule, original: Callable, batch: Any, args: tuple, kwargs: dict) -> Any:
        metrics = _metric_states(pl_module)
        for attempt in range(self.max_retries + 1):
            try:
                return self._run(pl_module, original, batch, args, kwargs)
            except Exception as error:
                if not is_out_of_memory(error):
                    raise
                _restore_metric_states(metrics)
                self._shrink(pl_module, extract_batch_size(batch), attempt, error)
        raise AssertionError("unreachable: _shrink raises after max_retries")

    def _run(self, pl_module: L.LightningModule, original: Callable, batch: Any, args: tuple, kwargs: dict) -> Any:
        n = extract_batch_size(batch)
        params = [p for p in pl_module.parameters() if p.requires_grad]
        grads: list[torch.Tensor | None] = [None] * len(params)
        scaler = getattr(self._trainer.precision_plugin, "scaler", None) if self._trainer is not None else None
        scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        total: list[torch.Tensor] = []

        def accumulate(loss: torch.Tensor, weight: float) -> None:
            # scaled like the real backward so fp16 gradients do not underflow, stored unscaled
            step = torch.autograd.grad(loss * (weight * scale), params, allow_unused=True)
            for i, g in enumerate(step):
                if g is not None:
                    grads[i] = g / scale if grads[i] is None else grads[i] + g / scale
            total.append(loss.detach() * weight)

        manual = not pl_module.automatic_optimization
        real_backward = pl_module.manual_backward
        out = None
        try:
            for part, size in split_batch(batch, self.micro_batch_size or n):
                weight = size / n if self.loss_reduction == "mean" else 1.0
                if manual:
                    pl_module.manual_backward = lambda loss, *a, w=weight, **kw: accumulate(loss, w)
                out = original(part, *args, **kwargs)
                if not manual and (loss := out["loss"] if isinstance(out, dict) else out) is not None:
                    accumulate(loss, weight)
        finally:
            if manual:
                del pl_module.manual_backward
        if not total or not params:
            return out
        injected = _InjectGrads.apply(grads, *params)
        if manual:
            real_backward(injected)
            return out
        loss = torch.stack(total).sum() + injected
        return {**out, "loss": loss} if isinstance(out, dict) else loss

    def _shrink(self, pl_module: L.LightningModule, n: int, attempt: int, error: BaseException) -> None:
        trainer = self._trainer
        step = trainer.global_step if trainer is not None else -1
        old = min(self.micro_batch_size or n, n)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if attempt >= self.max_retries or old <= 1:
            path = self._save_stop_checkpoint()
            saved = f"checkpoint saved to {path}" if path else "no checkpoint (other ranks cannot join the save)"
            raise RuntimeError(
                f"OOMRecovery: out of memory at step {step} with micro-batch {old} after {attempt} retries on "
                f"this batch; {saved}. Use a smaller model/batch or a larger device. "
                f"Last error: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
            ) from error
        new = (old + 1) // 2
        self.micro_batch_size = new
        record = {"step": step, "old_micro_batch": old, "new_micro_batch": new, "accumulation": math.ceil(n / new)}
        self.recoveries.append(record)
        extra = ""
        if self.activation_checkpointing:
            switched = [m for m in pl_module.modules() if hasattr(m, "set_grad_checkpointing")]
            for m in switched:
                m.set_grad_checkpointing(True)
            extra = f", activation checkpointing on in {len(switched)} module(s)" if switched else ""
        log.warning(
            "OOMRecovery: out of memory at step %d; micro-batch %d -> %d, accumulation %d per batch of %d%s",
            step, old, new, record["accumulation"], n, extra,
        )
        if trainer is not None and trainer.logger is not None:
            trainer.logger.log_metrics(
                {"oom/micro_batch": new, "oom/accumulation": record["accumulation"],
                 "oom/recoveries": len(self.recoveries)},
                step=step,
            )

    def _save_stop_checkpoint(self) -> str | None:
        """``oom-stop.ckpt`` beside the run's checkpoints; ``None`` in multi-process runs, where the OOM is
        rank-local and ``save_checkpoint`` would wait forever for the other ranks."""
        trainer = self._trainer
        if trainer is None or trainer.world_size > 1:
            return None
        folder = getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.default_root_dir
        path = str(Path(folder) / "oom-stop.ckpt")
        trainer.save_checkpoint(path)
        return path
