"""What Lightning 2.6 forgets when a run resumes: the random generators and, sometimes, the data position.

* The global random number generators are not in Lightning's checkpoints: a resumed run restarts them from
  ``seed_everything``, and every later dropout mask (LoRA dropout, random augmentation, sampling) differs.
  :class:`ExactResume` stores the torch (CPU and every CUDA device), NumPy and Python states when a checkpoint is
  written (as tensors and lists, so ``weights_only`` loading reads them) and puts them back when the resumed
  training starts, after the sanity check (which draws numbers of its own). Under DDP the checkpoint holds rank
  0's states and every rank gets them back: exact where the ranks draw the same numbers (``seed_everything`` seeds
  every rank alike), not where a rank's draws differ.
* A module whose ``configure_optimizers`` reads ``trainer.estimated_stepping_batches`` (a schedule over the
  run's steps) makes Lightning build the training loader before the checkpoint's loop state is restored, and
  Lightning then never hands the saved loader position to it: a resumable loader
  (``datamodules.resumable.ResumableDataLoader``) restarted the interrupted epoch from its first batch.
  :class:`ExactResume` hands it over when training starts, before the first batch is drawn.

It is one of ``cli.py``'s default callbacks.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch


def collect_rng_states() -> dict[str, Any]:
    """The current torch, CUDA, NumPy and Python generator states, as tensors, numbers and lists."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`collect_rng_states`."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ExactResume(L.Callback):
    """Save the global generator states in every checkpoint; when a resumed fit starts training, restore them
    and give the training loaders the position Lightning did not give them."""

    def __init__(self) -> None:
        self._restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return collect_rng_states()  # read when the checkpoint is written, i.e. the states at that point

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restore = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restore is not None:
            set_rng_states(self._restore)
            self._restore = None
        # Lightning 2.6 API (private): a no-op when the states were loaded already or the run is not resuming.
        trainer.fit_loop._load_combined_loader_states()
