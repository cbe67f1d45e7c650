"""Continual-learning evaluation: the accuracy matrix, its metrics, old/new accuracy, plots and ``results.json``.

After every task (``on_task_evaluate``, called by the continual LightningModule once the task's
``on_task_end`` hooks ran) the model is scored on each seen task's test set (or validation set: ``split``) over
the logits of the seen classes; each rank scores a shard and the class confusion counts are summed over ranks.
From the confusion: the accuracy-matrix row, the accuracy on all seen classes, old-class / new-class accuracy and
the task confusion. The row is appended to the module's sequence record (``R``, ``A``, ``task_records``,
checkpointed with the module), the metrics go to every logger under ``cl/``, the method's relative weight change
under ``adapters/``; after the last task the sequence is scored once more with the method's adapters switched off
(``acc_adapters_off``: an inert adapter shows as no difference). Plots (matplotlib): the accuracy matrix, the
task confusion and old/new accuracy go to TensorBoard and, as PNG files, beside ``results.json`` (written
atomically by rank 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Subset
from tqdm.auto import tqdm

from callbacks.consolidation import TaskBoundaryConsolidation
from callbacks.multi_rate import MultiRateStepping
from callbacks.protocols import ClassIncrementalData
from models.metrics import continual as cm
from models.utils.atomic import atomic_path


class ContinualEvaluation(Callback):
    """Scores the accuracy-matrix row after every task and writes the continual results and plots.

    Args:
        results_file: file name of the results, written in the logger's ``log_dir``.
        split: the split whose task sets are scored: ``test`` (reported numbers) or ``val`` (choosing
            hyper-parameters without looking at the test split, ``benchmarks/continual.py --select``).
        plots: draw the plots (TensorBoard and PNG files beside ``results_file``).
    """

    def __init__(self, results_file: str = "results.json", split: Literal["test", "val"] = "test",
                 plots: bool = True) -> None:
        if split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {split!r}")
        self.results_file = results_file
        self.split = split
        self.plots = plots

    def on_task_evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        dm = trainer.datamodule
        row, acc_all, confusion = evaluate_seen(trainer, pl_module, task, self.split)
        pl_module.R.append(row)
        pl_module.A.append(acc_all)
        n_seen, offset = dm.classes_seen(task), dm.task_offset(task)
        record: dict[str, Any] = {"task": task, **cm.old_new_accuracy(confusion, offset, n_seen),
                                  "task_confusion": cm.task_confusion(confusion, dm.task_sizes[: task + 1]).tolist(),
                                  "relative_delta": pl_module.method.relative_delta()}
        if task == dm.num_tasks - 1:
            with pl_module.model.adapters_off():
                record["acc_adapters_off"] = evaluate_seen(trainer, pl_module, task, self.split)[1]
        pl_module.task_records.append(record)
        metrics = {"cl/acc_seen": acc_all, **{f"cl/acc_task_{i}": a for i, a in enumerate(row)},
                   **{f"cl/{k}": v for k, v in cm.summary(pl_module.R, pl_module.A).items()},
                   **{f"cl/{k}": record[k] for k in ("old_acc", "new_acc", "old_to_new", "acc_adapters_off")
                      if k in record},
                   "adapters/relative_delta": record["relative_delta"], **pl_module.method.diagnostics()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=task)
        rank_zero_info(f"[continual] after task {task}: R[{task}] = {[round(a, 4) for a in row]}, "
                       f"A = {acc_all:.4f}, avg incremental acc = {metrics['cl/avg_incremental_acc']:.4f}"
                       + (f", adapters off {record['acc_adapters_off']:.4f}" if "acc_adapters_off" in record else ""))
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        if not trainer.is_global_zero:
            return
        if self.plots:
            figures = {"accuracy_matrix": lambda: cm.plot_accuracy_matrix(pl_module.R),
                       "task_confusion": lambda: cm.plot_task_confusion(np.asarray(record["task_confusion"])),
                       "old_new": lambda: cm.plot_old_new(pl_module.task_records)}
            for name, draw in figures.items():
                for logger in trainer.loggers:
                    if isinstance(logger, TensorBoardLogger):
                        logger.experiment.add_image(f"cl/{name}", cm.figure_to_image(draw()), global_step=task)
                cm.save_figure(draw(), Path(log_dir) / f"{name}.png")
        with atomic_path(Path(log_dir) / self.results_file) as tmp:
            tmp.write_text(json.dumps(continual_results(trainer, pl_module), indent=2))


@torch.no_grad()
def evaluate_seen(trainer: L.Trainer, pl_module: L.LightningModule, task: int,
                  split: Literal["test", "val"] = "test") -> tuple[list[float], float, np.ndarray]:
    """Accuracy on each seen task's ``split`` set and on all seen classes, over the logits of the seen classes,
    and the class confusion counts (true x predicted, seen classes), summed over ranks."""
    dm = trainer.datamodule
    if not isinstance(dm, ClassIncrementalData):
        raise TypeError(f"continual evaluation needs a class-incremental DataModule; {type(dm).__name__} lacks "
                        "the ClassIncrementalData methods (callbacks/protocols.py)")
    n_seen, device = dm.classes_seen(task), pl_module.device
    rank, world = trainer.global_rank, trainer.world_size
    model = pl_module.model
    was_training = model.training
    model.eval()
    loaders = []
    for i in range(task + 1):
        ds = dm.task_dataset(split, i)
        loaders.append(dm.loader(Subset(ds, range(rank, len(ds), world))))
    show = trainer.is_global_zero and trainer.progress_bar_callback is not None
    bar = tqdm(total=sum(len(dl) for dl in loaders), desc=f"accuracy matrix row {task}", disable=not show,
               leave=False)
    confusion = torch.zeros(n_seen * n_seen, dtype=torch.long, device=device)
    for loader in loaders:
        for x, y in loader:
            pred = model(x.to(device), n_seen).argmax(-1)
            confusion += torch.bincount(y.to(device) * n_seen + pred, minlength=n_seen * n_seen)
            bar.update()
    bar.close()
    model.train(was_training)
    if world > 1:
        confusion = trainer.strategy.reduce(confusion, reduce_op="sum")
    c = confusion.view(n_seen, n_seen).cpu().numpy()
    per_task = []
    for i in range(task + 1):
        lo, hi = dm.task_offset(i), dm.classes_seen(i)
        per_task.append(float(c[np.arange(lo, hi), np.arange(lo, hi)].sum() / max(c[lo:hi].sum(), 1)))
    return per_task, float(np.trace(c) / max(c.sum(), 1)), c


def continual_results(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """Everything ``results.json`` holds: settings, the matrix, its summary metrics, per-task records, the
    method's own entries (SEMA: expansions) and step events."""
    hp = pl_module.hparams
    out: dict[str, Any] = {
        "adapter_type": hp.adapter_type, "classifier": hp.get("classifier", "linear"), "backbone": hp.backbone,
        "backbone_file": getattr(pl_module, "backbone_file", None), "tasks_finished": pl_module.finished_task + 1,
        "accuracy_matrix": pl_module.R, "acc_seen": pl_module.A, "trainable_params": pl_module.trainable_params,
        "slow_update_interval": pl_module.slow_update_interval,
        "task_records": getattr(pl_module, "task_records", []),
    }
    if pl_module.A:
        out.update(cm.summary(pl_module.R, pl_module.A))
    records = out["task_records"]
    if records:
        out["relative_delta"] = records[-1]["relative_delta"]
        if "acc_adapters_off" in records[-1]:
            out["acc_adapters_off"] = records[-1]["acc_adapters_off"]
    out.update(pl_module.method.results())
    for cb in trainer.callbacks:
        if isinstance(cb, TaskBoundaryConsolidation):
            out["consolidations"] = cb.events
        if isinstance(cb, MultiRateStepping):
            out["fast_steps"], out["slow_steps"] = cb.fast_steps, cb.slow_steps
    return out
