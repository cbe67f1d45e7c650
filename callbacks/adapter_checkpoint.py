"""Adapter-only checkpoints: the trained parameters of a module whose backbone stays frozen, without the backbone.

A LoRA fine-tune's Lightning checkpoint holds the frozen backbone too (25 MB for 297 k trained parameters in the
digits quick start); ``adapter/adapter.safetensors`` holds only what training changed, and ``adapter/config.yaml``
(the run's config) says how to rebuild the model it goes onto. The module's ``adapter_path`` option (or
:func:`load_adapter`) loads it onto a freshly built model (its backbone from the same local weights).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from models.utils.atomic import atomic_path

ADAPTER_FILE, CONFIG_FILE = "adapter.safetensors", "config.yaml"


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that trains (``requires_grad``), as detached contiguous CPU tensors, by state-dict key."""
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own ``adapter_state_dict()`` when it has one (e.g. adapters added during training), else its
    trainable parameters."""
    own = getattr(model, "adapter_state_dict", None)
    return own() if callable(own) else trainable_state_dict(model)


def save_adapter(model: nn.Module, directory: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``directory/adapter.safetensors`` (atomically) with :func:`adapter_state_dict` and the model's
    ``adapter_metadata()`` (when it has one) plus ``metadata``."""
    from safetensors.torch import save_file

    path = Path(directory) / ADAPTER_FILE
    extra = model.adapter_metadata() if callable(getattr(model, "adapter_metadata", None)) else {}
    with atomic_path(path) as tmp:
        save_file(adapter_state_dict(model), str(tmp),
                  metadata={"format": "adaptlab-adapter", **extra, **(metadata or {})})
    return path


def load_adapter(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Load an adapter file (or a folder holding one) onto ``model``; every saved tensor must match a trainable
    parameter by name and shape and every trainable parameter must be in the file (else a ``ValueError`` names
    the first ones). Returns the file's metadata. Safetensors only: no code runs on load."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    path = path / ADAPTER_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"adapter_path {str(path)!r} does not exist (a folder written by an adapter run "
                                f"holds {ADAPTER_FILE})")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(str(path))
    except Exception as e:  # not a safetensors file
        raise ValueError(f"adapter_path {str(path)!r} is not a safetensors adapter file ({e})") from None
    own = dict(model.named_parameters())
    trainable = {k for k, p in own.items() if p.requires_grad}
    unknown, missing = sorted(set(state) - set(own)), sorted(trainable - set(state))
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and own[k].shape != v.shape]
    for what, bad in (("has tensors the model lacks", unknown), ("lacks trainable parameters", missing),
                      ("has other shapes", shapes)):
        if bad:
            raise ValueError(f"adapter_path {str(path)!r} {what} (was it made with other model settings?): "
                             f"{', '.join(bad[:4])}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    return metadata


class AdapterCheckpoint(Callback):
    """At the end of ``fit`` (rank 0), write ``<run folder>/adapter/``: ``adapter.safetensors`` (the trainable
    parameters, or the module's own ``adapter_state_dict()``/``adapter_metadata()`` when its trainable set changes
    during training, as in continual learning) and ``config.yaml`` (the run's config, to rebuild the model)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero or log_dir is None:
            return
        folder = Path(log_dir) / "adapter"
        path = save_adapter(pl_module, folder, {"module": type(pl_module).__qualname__})
        config = Path(log_dir) / CONFIG_FILE
        if config.is_file():
            shutil.copyfile(config, folder / CONFIG_FILE)
        size = sum(t.numel() for t in adapter_state_dict(pl_module).values())
        print(f"adapter-only checkpoint: {path.resolve()} ({size:,} parameters; load with --model.adapter_path "
              f"{folder})", flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {}
