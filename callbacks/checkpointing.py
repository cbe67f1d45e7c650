"""Atomic checkpoint writes: a crash while saving never leaves a truncated ``last.ckpt``.

``AtomicCheckpointIO`` is adaptlab's default ``CheckpointIO`` plugin (set in ``cli.py``'s trainer
defaults): the checkpoint is written through :func:`models.utils.atomic.atomic_path` (a hidden temporary file in
the target folder, flushed to disk, then moved over the target with ``os.replace``). Remote URLs (``s3://``...) fall
back to Lightning's writer.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from models.utils.atomic import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes ``.<name>.tmp-<pid>`` then renames it onto ``path``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            torch.save(checkpoint, f)
