"""Atomic checkpoint writes: a crash while saving never leaves a truncated ``last.ckpt``.

``AtomicCheckpointIO`` is adaptlab's default ``CheckpointIO`` plugin (set in ``cli.py``'s trainer
defaults): the checkpoint is written to a hidden temporary file in the target folder, flushed to disk, then
moved over the target with ``os.replace`` (atomic on POSIX and Windows). Remote URLs (``s3://``...) fall
back to Lightning's writer.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes ``.<name>.tmp-<pid>`` then renames it onto ``path``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
