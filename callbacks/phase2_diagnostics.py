"""Memory diagnostics, training history and epoch checkpoints of the Phase 2 language model.

:class:`Phase2Diagnostics` reads the module's ``diagnostics()`` (the ``MemoryDiagnostics`` protocol of
``callbacks/protocols.py``: detached 0-dim tensors) after every training batch and adds them to running sums on
the device, so nothing waits for the host per batch or per token. Every ``log_every_n_batches`` batches the
current values go to the loggers under ``batch/`` (one host sync), together with the memory in use and its
peak (CUDA allocator when on a GPU, else the process's resident memory). At the end of every epoch (after its
validation) the epoch means, reduced over DDP ranks (the memory peak: the largest), go under ``train/``, and
``training_history.json`` is rewritten atomically (:func:`models.utils.atomic.atomic_path`) with one entry per
epoch: train and val loss, learning rate, the Gamma / SNR / resonance / stability histories, and beside them the
seed-003 script's keys (``train_losses``, ``val_losses``, ``learning_rates``, ``best_val_loss``,
``total_epochs``). The history and the running sums of the current epoch (summed over DDP ranks) are part of the
callback's checkpoint state, so a run resumed mid-epoch records the means over the whole epoch and continues the
history instead of starting over. Every
``checkpoint_every_n_epochs`` epochs a full checkpoint ``checkpoint_epoch{N}.ckpt`` (N counted from 1) is saved
beside the run's other checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

from callbacks.checkpointing import CheckpointSaveError, last_good_sentence, write_failure_reason
from callbacks.protocols import MemoryDiagnostics
from models.utils.atomic import atomic_path

#: Per-epoch series of the history besides the epoch numbers.
HISTORY_KEYS = ("train_loss", "val_loss", "lr", "gamma_mean", "gamma_std", "gamma_min", "gamma_max", "snr_mean",
                "snr_low_ratio", "resonant_modes", "resonance_energy", "stability_ratio", "fast_weight_energy",
                "memory_peak_mb")


#: The seed-003 training script's history names -> ours (written beside them in ``training_history.json``).
SCRIPT_KEYS = {"train_losses": "train_loss", "val_losses": "val_loss", "learning_rates": "lr"}


def with_script_keys(history: dict[str, list]) -> dict[str, Any]:
    """``history`` plus the seed-003 script's keys: its series names (:data:`SCRIPT_KEYS`), ``best_val_loss``
    (the lowest finite validation loss, ``None`` before one exists) and ``total_epochs``."""
    out: dict[str, Any] = dict(history)
    out.update({name: history[ours] for name, ours in SCRIPT_KEYS.items()})
    finite = [v for v in history["val_loss"] if math.isfinite(v)]
    out["best_val_loss"] = min(finite) if finite else None
    out["total_epochs"] = len(history["epoch"])
    return out


def process_memory_mb(device: torch.device) -> tuple[float, float]:
    """(current, peak) memory in MiB: the CUDA allocator's on a GPU, else the process's resident set."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20, torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            current_mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        current_mb = math.nan
    return current_mb, peak_mb


class Phase2Diagnostics(L.Callback):
    """Log memory diagnostics per batch and per epoch, keep ``training_history.json``, save epoch checkpoints.

    Args:
        log_every_n_batches: log the current diagnostics under ``batch/`` every this many training batches.
        checkpoint_every_n_epochs: save ``checkpoint_epoch{N}.ckpt`` after every this many epochs; 0 turns it off.
        history_file: the history JSON; a relative path is inside the run's log folder (``version_N``).
    """

    def __init__(self, log_every_n_batches: int = 50, checkpoint_every_n_epochs: int = 5,
                 history_file: str = "training_history.json") -> None:
        if log_every_n_batches < 1:
            raise ValueError(f"log_every_n_batches must be >= 1, got {log_every_n_batches}")
        if checkpoint_every_n_epochs < 0:
            raise ValueError(f"checkpoint_every_n_epochs must be >= 0, got {checkpoint_every_n_epochs}")
        if not history_file:
            raise ValueError("history_file must name a file")
        self.log_every_n_batches, self.checkpoint_every_n_epochs = log_every_n_batches, checkpoint_every_n_epochs
        self.history_file = history_file
        self.history: dict[str, list] = self._empty_history()
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._recorded_epoch = -1
        self._strategy: Any = None  # the trainer's, for summing the running sums over ranks in state_dict
        self._loaded_sums: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
        self._validated_epoch = -1  # the last epoch whose validation ran (not the sanity check)

    @staticmethod
    def _empty_history() -> dict[str, list]:
        return {"epoch": [], "global_step": [], **{k: [] for k in HISTORY_KEYS}}

    # ----------------------------------------------------------------------------------------------- state
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._strategy = trainer.strategy

    def state_dict(self) -> dict[str, Any]:
        """Every rank writes the checkpoint together (Lightning's ``save_checkpoint``), so summing is safe here."""
        names = sorted(self._sums)
        sums, counts = {}, {}
        if names:
            both = torch.stack([torch.stack([self._sums[n] for n in names]),
                                torch.stack([self._counts[n] for n in names])])
            if self._strategy is not None:
                both = self._strategy.reduce(both, reduce_op="sum")
            sums, counts = dict(zip(names, both[0].cpu())), dict(zip(names, both[1].cpu()))
        return {"history": self.history, "recorded_epoch": self._recorded_epoch, "sums": sums, "counts": counts}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {**self._empty_history(), **state_dict["history"]}
        self._recorded_epoch = state_dict["recorded_epoch"]
        self._loaded_sums = state_dict.get("sums", {}), state_dict.get("counts", {})  # absent in older checkpoints

    def history_path(self, trainer: L.Trainer) -> Path:
        path = Path(self.history_file).expanduser()
        return path if path.is_absolute() else Path(trainer.log_dir or trainer.default_root_dir) / path

    # -------------------------------------------------------------------------------------------- batches
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(pl_module, MemoryDiagnostics):
            raise TypeError(f"Phase2Diagnostics needs a module with diagnostics(); {type(pl_module).__name__} has none")
        if self._loaded_sums is not None:  # resumed mid-epoch: the sums so far (over all ranks) go to rank 0
            sums, counts = self._loaded_sums
            keep = trainer.global_rank == 0
            self._sums = {n: (v if keep else torch.zeros_like(v)).to(pl_module.device) for n, v in sums.items()}
            self._counts = {n: (v if keep else torch.zeros_like(v)).to(pl_module.device) for n, v in counts.items()}
            self._loaded_sums = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._sums, self._counts = {}, {}

    def _accumulate(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        finite = torch.isfinite(value)
        if name not in self._sums:
            self._sums[name], self._counts[name] = torch.zeros_like(value), torch.zeros_like(value)
        self._sums[name] += torch.where(finite, value, 0.0)
        self._counts[name] += finite.float()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        diag = pl_module.diagnostics()
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        values = dict(diag)
        if isinstance(loss, torch.Tensor):
            values["loss"] = loss.detach()
        for name, value in values.items():
            self._accumulate(name, value)
        if batch_idx % self.log_every_n_batches == 0 and trainer.loggers:
            current, peak = process_memory_mb(pl_module.device)
            stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
            metrics = dict(zip((f"batch/{k}" for k in values), stacked.tolist()))  # one host sync per logged batch
            metrics.update({"batch/memory_current_mb": current, "batch/memory_peak_mb": peak})
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    # --------------------------------------------------------------------------------------------- epochs
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the epoch's validation and before ``ModelCheckpoint`` (Lightning runs checkpoint callbacks last), so
        ``last.ckpt`` and ``best.ckpt`` hold the history up to this epoch."""
        self._end_epoch(trainer, pl_module)

    def _epoch_means(self, trainer: L.Trainer) -> dict[str, float]:
        names = sorted(self._sums)  # same order on every rank
        if not names:
            return {}
        sums = torch.stack([self._sums[n] for n in names])
        counts = torch.stack([self._counts[n] for n in names])
        both = trainer.strategy.reduce(torch.stack([sums, counts]), reduce_op="sum")
        means = (both[0] / both[1]).tolist()  # NaN where no batch had a finite value
        return dict(zip(names, means))

    def _end_epoch(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch == self._recorded_epoch:
            return
        self._recorded_epoch = epoch
        means = self._epoch_means(trainer)
        _, peak = process_memory_mb(pl_module.device)
        peak = float(trainer.strategy.all_gather(torch.tensor(peak, device=pl_module.device)).max())  # worst rank
        # an epoch without validation (trainer.max_steps stopped it, check_val_every_n_epoch): NaN, not the last value
        val = trainer.callback_metrics.get("val/loss") if self._validated_epoch == epoch else None
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else math.nan
        entry = {"train_loss": means.pop("loss", math.nan), "val_loss": float(val) if val is not None else math.nan,
                 "lr": float(lr), "memory_peak_mb": peak}
        entry.update({k: means.get(k, math.nan) for k in HISTORY_KEYS if k not in entry})
        self.history["epoch"].append(epoch + 1)
        self.history["global_step"].append(trainer.global_step)
        for key in HISTORY_KEYS:
            self.history[key].append(entry[key])
        metrics = {f"train/{k}": v for k, v in means.items()}
        metrics.update({"train/epoch_loss": entry["train_loss"], "train/memory_peak_mb": peak,
                        "train/epoch_perplexity": math.exp(min(entry["train_loss"], 80.0))})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        path = self.history_path(trainer)  # trainer.log_dir is a collective under DDP: every rank asks
        if trainer.is_global_zero:
            try:
                with atomic_path(path) as tmp:
                    tmp.write_text(json.dumps(with_script_keys(self.history), indent=1, allow_nan=True))
            except OSError as e:  # disk full, folder not writable: one line (cli.py), the earlier file intact
                raise CheckpointSaveError(
                    f"could not write the training history {str(path)!r}: {write_failure_reason(e)} (the file "
                    f"keeps the epochs before); {last_good_sentence(self._checkpoint_dir(trainer) / 'last.ckpt')}"
                ) from e
        every = self.checkpoint_every_n_epochs
        if every and (epoch + 1) % every == 0:
            trainer.save_checkpoint(self._checkpoint_dir(trainer) / f"checkpoint_epoch{epoch + 1}.ckpt")

    @staticmethod
    def _checkpoint_dir(trainer: L.Trainer) -> Path:
        ckpt = trainer.checkpoint_callback
        dirpath = getattr(ckpt, "dirpath", None)
        if dirpath:
            return Path(dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
