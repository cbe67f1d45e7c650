"""Atomic, safely loaded checkpoints.

``AtomicCheckpointIO`` is adaptlab's default ``CheckpointIO`` plugin (set in ``cli.py``'s trainer defaults):

- **writes** go through :func:`models.utils.atomic.atomic_path` (a hidden temporary file in the target folder,
  flushed to disk, then moved over the target with ``os.replace``), so a crash while saving never leaves a
  truncated ``last.ckpt``. Temporary files left by a killed process are deleted before the first save into a
  folder. A failed save (disk full, read-only folder) raises :class:`CheckpointSaveError`, one line naming the
  reason and the last good checkpoint.
- **reads** use :func:`models.utils.checkpoint.safe_load` (``weights_only=True``; only adaptlab's own
  dataclasses are let through), so resuming from a crafted file cannot run code.

Remote URLs (``s3://``...) fall back to Lightning's writer.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from models.utils.atomic import atomic_path, clean_stale_temporaries
from models.utils.checkpoint import safe_load


class CheckpointSaveError(OSError):
    """Saving a checkpoint failed; the message names the reason and the last good checkpoint."""


def write_failure_reason(e: BaseException) -> str:
    """Why a write failed, in a few words: the ``OSError`` behind it (torch's zip writer turns a failed write
    into a ``RuntimeError`` whose context is the ``OSError``, or that only says a write was cut short)."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        if cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"the disk is full ({cause.strerror})"
        if cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return f"the folder is not writable ({cause.strerror})"
        return cause.strerror or str(cause) or type(cause).__name__
    text = " ".join(str(e).split())
    text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)[:160]
    if re.search(r"unexpected pos|file write failed|PytorchStreamWriter failed", text):
        return f"torch's checkpoint writer could not write all the data, most often because the disk is full ({text})"
    return f"{type(e).__name__}: {text}"


def last_good_checkpoint(path: Path) -> Path | None:
    """``path`` itself when it exists (an atomic save never damages it), else the newest ``.ckpt`` beside it."""
    if path.is_file():
        return path
    others = sorted(path.parent.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if path.parent.is_dir() else []
    return others[-1] if others else None


def last_good_sentence(path: Path) -> str:
    good = last_good_checkpoint(path)
    return f"the last good checkpoint is {str(good)!r}" if good else "no checkpoint was saved before"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes ``.<name>.tmp-<pid>`` then renames it onto ``path``, and loads with
    ``weights_only=True``."""

    def __init__(self) -> None:
        super().__init__()
        self._cleaned: set[Path] = set()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        if path.parent not in self._cleaned:
            clean_stale_temporaries(path.parent)
            self._cleaned.add(path.parent)
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                torch.save(checkpoint, f)
        except (OSError, RuntimeError) as e:  # RuntimeError: torch's zip writer on a failed write (disk full)
            raise CheckpointSaveError(f"could not save checkpoint {str(path)!r}: {write_failure_reason(e)}; "
                                      f"{last_good_sentence(path)}") from e

    def load_checkpoint(self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only=True)
        return safe_load(path, map_location=map_location if map_location is not None else "cpu")


class RunInfo(L.Callback):
    """Default callback of ``cli.py``: records in every checkpoint which run wrote it (``checkpoint["adaptlab"]``:
    logger name and version, log folder), so ``--ckpt_path last`` with a fixed ``checkpoint.dirpath`` resumes in
    the original ``version_N``; and notes when the first batch of the run's main loop has finished (``cli.py``
    removes the files of a run that failed before that)."""

    def __init__(self) -> None:
        self.first_batch_done = False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        logger = trainer.logger
        checkpoint["adaptlab"] = {
            "name": getattr(logger, "name", None),
            "version": getattr(logger, "version", None) if logger is not None else None,
            "log_dir": trainer.log_dir,
        }

    def on_train_batch_end(self, *args: Any) -> None:
        self.first_batch_done = True

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "validate":
            self.first_batch_done = True

    def on_test_batch_end(self, *args: Any) -> None:
        self.first_batch_done = True

    def on_predict_batch_end(self, *args: Any) -> None:
        self.first_batch_done = True
