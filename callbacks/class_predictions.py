"""Class predictions of the image families (``predict``) as one CSV in the run folder, its path printed."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import Dataset

from models.utils.atomic import atomic_path

#: The file :class:`ClassPredictionWriter` writes into the run folder (``runs/<config>/version_N``).
PREDICTIONS_FILE = "predictions.csv"


class NamedSamples(Dataset):
    """A labelled image dataset whose items also carry their index, so predictions can name their sample.

    Args:
        dataset: yields ``(image, label)``.
        ids: one name per sample (an image file, or ``<source>:<index>`` for embedded data).
        class_names: one name per label.
    """

    def __init__(self, dataset: Dataset, ids: Sequence[str], class_names: Sequence[str]) -> None:
        if len(ids) != len(dataset):  # type: ignore[arg-type]
            raise ValueError(f"{len(ids)} sample ids for {len(dataset)} samples")  # type: ignore[arg-type]
        self.dataset, self.ids, self.class_names = dataset, list(ids), list(class_names)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        x, y = self.dataset[i]
        return x, y, i


def classify(logits: torch.Tensor, batch: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``predict_step`` output of a classifier on a :class:`NamedSamples` batch ``(x, y, index)``."""
    prob, cls = logits.float().softmax(-1).max(-1)
    return {"index": batch[2], "class": cls, "probability": prob, "target": batch[1]}


class ClassPredictionWriter(BasePredictionWriter):
    """Writes ``id,class,probability,true_class`` rows (one per predicted sample, in dataset order) to
    ``output_file`` and prints where. Under DDP the ranks' rows are gathered and rank 0 writes.

    Args:
        output_file: target CSV; ``None`` = ``predictions.csv`` in the run folder (``trainer.log_dir``).
    """

    def __init__(self, output_file: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_file = output_file
        self.written: Path | None = None

    def resolve_path(self, trainer: L.Trainer) -> Path:
        if self.output_file is not None:
            return Path(self.output_file)
        return Path(trainer.log_dir or trainer.default_root_dir) / PREDICTIONS_FILE

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        loaders = trainer.predict_dataloaders
        loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
        per_loader = predictions if len(loaders) > 1 else [predictions]
        rows: dict[tuple[int, int], tuple[str, str, float, str]] = {}
        for k, (loader, outs) in enumerate(zip(loaders, per_loader)):
            ds = loader.dataset
            if not isinstance(ds, NamedSamples):
                raise TypeError("ClassPredictionWriter needs a predict loader over NamedSamples, got "
                                f"{type(ds).__name__}")
            for out in outs:
                for i, c, p, t in zip(out["index"].tolist(), out["class"].tolist(), out["probability"].tolist(),
                                      out["target"].tolist()):
                    rows[(k, i)] = (ds.ids[i], ds.class_names[c], p, ds.class_names[t])
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = {key: row for part in gathered for key, row in part.items()}  # drops DistributedSampler padding
        if not trainer.is_global_zero:
            return
        path = self.resolve_path(trainer)
        with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["id", "class", "probability", "true_class"])
            for key in sorted(rows):
                sample, cls, prob, true = rows[key]
                writer.writerow([sample, cls, f"{prob:.4f}", true])
        self.written = path
        correct = sum(r[1] == r[3] for r in rows.values())
        print(f"predict: wrote {len(rows)} class predictions to {path.resolve()} (accuracy against the labels "
              f"{correct / max(1, len(rows)):.4f})", flush=True)
