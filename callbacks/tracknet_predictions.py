"""Writes ``python -m cli predict`` results of the TrackNet module as one label CSV per clip."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from models.utils.atomic import atomic_path


class TrackNetPredictionWriter(BasePredictionWriter):
    """Collects ``predict_step`` outputs (``clip``, ``frame``, ``visibility``, ``xy``) and writes one
    ``Frame,Visibility,X,Y`` CSV per clip (source-resolution pixels; 0,0 when no ball).

    Args:
        output_dir: target folder; ``None`` = ``<trainer.log_dir>/predictions``. Under DDP the ranks'
            rows are gathered and rank 0 writes. Each file is written to a temp name and renamed.
        csv_format: ``adaptlab`` = ``<clip>.csv`` with X/Y to 2 decimals; ``v3`` = TrackNetV3's ``predict.py``
            files: ``<clip>_ball.csv`` with whole-pixel X/Y (truncated, as V3's ``int(cx * scaler)``; with
            ``peak_method: v3`` the numbers are V3's) and Visibility 0 where X, Y = 0, 0.
    """

    def __init__(self, output_dir: str | None = None, csv_format: Literal["adaptlab", "v3"] = "adaptlab") -> None:
        super().__init__(write_interval="epoch")
        if csv_format not in ("adaptlab", "v3"):
            raise ValueError(f"csv_format must be 'adaptlab' or 'v3', got {csv_format!r}")
        self.output_dir = output_dir
        self.csv_format = csv_format
        self.written: list[Path] = []

    def resolve_dir(self, trainer: L.Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "predictions"

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        rows: list[tuple[str, int, int, float, float]] = []
        flat = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        for out in flat:
            for clip, frame, vis, (x, y) in zip(out["clip"], out["frame"].tolist(), out["visibility"].tolist(),
                                                out["xy"].tolist()):
                rows.append((clip, int(frame), int(vis), float(x), float(y)))
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not trainer.is_global_zero:
            return
        per_clip: dict[str, dict[int, tuple[int, float, float]]] = defaultdict(dict)
        for clip, frame, vis, x, y in rows:  # dict by frame: drops DistributedSampler's padded duplicates
            per_clip[clip][frame] = (vis, x, y)
        out_dir = self.resolve_dir(trainer)
        self.written = []
        for clip, frames in sorted(per_clip.items()):
            v3 = self.csv_format == "v3"
            path = out_dir / (f"{clip}_ball.csv" if v3 else f"{clip}.csv")
            with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(["Frame", "Visibility", "X", "Y"])
                for frame in sorted(frames):
                    vis, x, y = frames[frame]
                    if v3:
                        x, y = (int(x), int(y)) if vis else (0, 0)
                        writer.writerow([frame, int((x, y) != (0, 0)), x, y])
                    else:
                        writer.writerow([frame, vis, f"{x:.2f}", f"{y:.2f}"])
            self.written.append(path)
        print(f"predict: wrote {len(self.written)} label CSVs (Frame,Visibility,X,Y per clip) to {out_dir.resolve()}",
              flush=True)
