"""TensorBoard as users expect it: one hparams entry per run with real metrics, learning-rate curves where a
schedule exists, throughput and peak memory per epoch. ``cli.py`` makes all three the defaults."""

from __future__ import annotations

import dataclasses
import math
import resource
import sys
import time
from argparse import Namespace
from typing import Any, Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

#: Metric names the hparams view shows (the last logged value of each), by prefix.
HPARAM_METRIC_PREFIXES = ("val", "test", "params", "continual", "perf")


def flat_hparams(params: Any, prefix: str = "") -> dict[str, Any]:
    """Nested hyper-parameters as ``{dotted.key: scalar}``: jsonargparse's ``_instantiator``/``_class_path`` and
    other private keys dropped, a ``class_path``/``init_args`` pair shown as the class name plus its arguments,
    lists and ``None`` as text (TensorBoard takes numbers, strings and booleans only)."""
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = dataclasses.asdict(params)
    if isinstance(params, Namespace):
        params = vars(params)
    if hasattr(params, "as_dict") and callable(params.as_dict):
        params = params.as_dict()
    if isinstance(params, Mapping):
        if "class_path" in params:
            out = {prefix.rstrip(".") or "class": str(params["class_path"]).rsplit(".", 1)[-1]}
            return {**out, **flat_hparams(params.get("init_args") or {}, prefix)}
        out = {}
        for key, value in params.items():
            if not str(key).startswith("_"):
                out.update(flat_hparams(value, f"{prefix}{key}."))
        return out
    key = prefix.rstrip(".")
    if isinstance(params, bool) or (isinstance(params, (int, float)) and math.isfinite(params)) or \
            isinstance(params, str):
        return {key: params}
    return {key: str(params)}


class AdaptLabTensorBoardLogger(TensorBoardLogger):
    """``TensorBoardLogger`` whose HPARAMS tab holds one entry per run: the module's and the data's settings
    (clean, see :func:`flat_hparams`) against the run's real metrics (the last ``val/``, ``test/``, ``params/``...
    value), written when the run ends, instead of Lightning's ``hp_metric`` placeholder of -1.

    Takes every argument of ``TensorBoardLogger`` (``default_hp_metric`` is always off: no placeholder)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["default_hp_metric"] = False  # the CLI passes the parent's default (True) explicitly
        super().__init__(*args, **kwargs)
        self._hp_params: dict[str, Any] = {}
        self._last_metrics: dict[str, float] = {}
        self._hp_written = False

    @rank_zero_only
    def log_hyperparams(self, params: Any, metrics: dict[str, Any] | None = None) -> None:
        """Records the settings (hparams.yaml as before); ``metrics`` become ordinary scalars at step 0."""
        self._hp_params.update(flat_hparams(params))
        super().log_hyperparams(params)
        if metrics:
            self.log_metrics(metrics, 0)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        for key, value in metrics.items():
            value = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._last_metrics[key] = float(value)
        super().log_metrics(metrics, step)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if not self._hp_written and self._hp_params and self._experiment is not None:
            from torch.utils.tensorboard.summary import hparams

            names = sorted(k for k in self._last_metrics if k.split("/")[0].split("_")[0] in HPARAM_METRIC_PREFIXES)
            if names:
                exp, ssi, sei = hparams(self._hp_params, {k: self._last_metrics[k] for k in names})
                writer = self.experiment._get_file_writer()
                for summary in (exp, ssi, sei):
                    writer.add_summary(summary)
                self._hp_written = True
        super().finalize(status)


class ScheduleMonitor(LearningRateMonitor):
    """``LearningRateMonitor`` that only acts where a learning-rate schedule exists (automatic optimization,
    a logger, at least one scheduler) and no other ``LearningRateMonitor`` is configured.

    Args:
        logging_interval: ``step``, ``epoch`` or ``None`` (each scheduler's own interval).
        log_momentum: also log the momentum (or Adam's beta1).
        log_weight_decay: also log the weight decay.
    """

    active = False

    def on_train_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        others = [c for c in trainer.callbacks if isinstance(c, LearningRateMonitor) and c is not self]
        self.active = bool(trainer.loggers and trainer.lr_scheduler_configs and not others
                           and trainer.lightning_module.automatic_optimization)
        if self.active:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if self.active:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        if self.active:
            super().on_train_epoch_start(trainer, *args, **kwargs)


def batch_size_and_tokens(batch: Any) -> tuple[int, int]:
    """Samples (first dimension of the first tensor) and tokens (its elements when it holds integer ids)."""
    stack = [batch]
    while stack:
        item = stack.pop(0)
        if isinstance(item, torch.Tensor) and item.ndim >= 1:
            tokens = item.numel() if item.ndim == 2 and not item.is_floating_point() else 0
            return int(item.shape[0]), tokens
        if isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return 0, 0


class EpochPerformance(Callback):
    """Per training epoch: ``perf/samples_per_sec``, ``perf/steps_per_sec`` (and ``perf/tokens_per_sec`` for
    token batches), ``perf/epoch_seconds`` and the peak memory: ``perf/peak_gpu_mib`` (CUDA, allocated by
    tensors, reset each epoch) or ``perf/peak_rss_mib`` (CPU: the process's peak resident memory so far).
    Logged straight to the loggers at the epoch's last step, so checkpoint monitors never see them."""

    def __init__(self) -> None:
        self._t0, self._samples, self._tokens, self._steps = 0.0, 0, 0, 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._samples, self._tokens, self._steps = time.perf_counter(), 0, 0, 0
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        samples, tokens = batch_size_and_tokens(batch)
        self._samples, self._tokens, self._steps = self._samples + samples, self._tokens + tokens, self._steps + 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = time.perf_counter() - self._t0
        if not trainer.loggers or self._steps == 0 or seconds <= 0:
            return
        metrics = {"perf/samples_per_sec": self._samples / seconds, "perf/steps_per_sec": self._steps / seconds,
                   "perf/epoch_seconds": seconds}
        if self._tokens:
            metrics["perf/tokens_per_sec"] = self._tokens / seconds
        if pl_module.device.type == "cuda":
            metrics["perf/peak_gpu_mib"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        else:
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform == "darwin" else 1)
            metrics["perf/peak_rss_mib"] = kib / 1024
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
