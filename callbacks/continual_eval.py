"""Continual-learning evaluation: the accuracy matrix, its metrics, the matrix image and ``results.json``.

After every task (``on_task_evaluate``, called by the continual LightningModule once the task's
``on_task_end`` hooks ran) the model is scored on each seen task's test set (or validation set: ``split``) and
on all seen classes, over the logits of the seen classes; each rank scores a shard and torchmetrics sums the
counts. The row is appended to the module's sequence record (``R``, ``A``, checkpointed with the module), the continual
metrics go to every logger under ``cl/``, the matrix to TensorBoard as an image (``cl/accuracy_matrix``) and
everything to ``results.json`` beside the logs (written atomically by rank 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import Subset
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

from callbacks.consolidation import TaskBoundaryConsolidation
from callbacks.multi_rate import MultiRateStepping
from callbacks.protocols import ClassIncrementalData
from models.adapters.nested_lora import delta_norms
from models.metrics import continual as cm
from models.utils.atomic import atomic_path


class ContinualEvaluation(Callback):
    """Scores the accuracy-matrix row after every task and writes the continual results.

    Args:
        results_file: file name of the results, written in the logger's ``log_dir``.
        split: the split whose task sets are scored: ``test`` (reported numbers) or ``val`` (choosing
            hyper-parameters without looking at the test split, ``benchmarks/continual.py --select``).
    """

    def __init__(self, results_file: str = "results.json", split: Literal["test", "val"] = "test") -> None:
        if split not in ("test", "val"):
            raise ValueError(f"split must be 'test' or 'val', got {split!r}")
        self.results_file = results_file
        self.split = split

    def on_task_evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None:
        row, acc_all = evaluate_seen(trainer, pl_module, task, self.split)
        pl_module.R.append(row)
        pl_module.A.append(acc_all)
        metrics = {"cl/acc_seen": acc_all, **{f"cl/acc_task_{i}": a for i, a in enumerate(row)},
                   **{f"cl/{k}": v for k, v in cm.summary(pl_module.R, pl_module.A).items()}}
        if pl_module.hparams.adapter_type == "nested_lora":
            metrics.update({f"nested/{k}_delta_norm": v for k, v in delta_norms(pl_module.model).items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=task)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("cl/accuracy_matrix", cm.render_accuracy_matrix(pl_module.R),
                                            global_step=task)
        rank_zero_info(f"[continual] after task {task}: R[{task}] = {[round(a, 4) for a in row]}, "
                       f"A = {acc_all:.4f}, avg incremental acc = {metrics['cl/avg_incremental_acc']:.4f}")
        log_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank asks
        if trainer.is_global_zero:
            with atomic_path(Path(log_dir) / self.results_file) as tmp:
                tmp.write_text(json.dumps(continual_results(trainer, pl_module), indent=2))


@torch.no_grad()
def evaluate_seen(trainer: L.Trainer, pl_module: L.LightningModule, task: int,
                  split: Literal["test", "val"] = "test") -> tuple[list[float], float]:
    """Accuracy on each seen task's ``split`` set and on all seen classes, over the logits of the seen classes."""
    dm = trainer.datamodule
    if not isinstance(dm, ClassIncrementalData):
        raise TypeError(f"continual evaluation needs a class-incremental DataModule; {type(dm).__name__} lacks "
                        "the ClassIncrementalData methods (callbacks/protocols.py)")
    n_seen, device = dm.classes_seen(task), pl_module.device
    rank, world = trainer.global_rank, trainer.world_size
    model = pl_module.model
    was_training = model.training
    model.eval()
    overall = MulticlassAccuracy(n_seen, average="micro").to(device)
    loaders = []
    for i in range(task + 1):
        ds = dm.task_dataset(split, i)
        loaders.append(dm.loader(Subset(ds, range(rank, len(ds), world))))
    show = trainer.is_global_zero and trainer.progress_bar_callback is not None
    bar = tqdm(total=sum(len(dl) for dl in loaders), desc=f"accuracy matrix row {task}", disable=not show,
               leave=False)
    per_task = []
    for loader in loaders:
        metric = MulticlassAccuracy(n_seen, average="micro").to(device)
        for x, y in loader:
            pred = model(x.to(device), n_seen).argmax(-1)
            metric.update(pred, y.to(device))
            overall.update(pred, y.to(device))
            bar.update()
        per_task.append(float(metric.compute()))
    bar.close()
    model.train(was_training)
    return per_task, float(overall.compute())


def continual_results(trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
    """Everything ``results.json`` holds: settings, the matrix, its summary metrics, SEMA and step events."""
    hp = pl_module.hparams
    out: dict[str, Any] = {
        "adapter_type": hp.adapter_type, "backbone": hp.backbone,
        "backbone_file": getattr(pl_module, "backbone_file", None), "tasks_finished": pl_module.finished_task + 1,
        "accuracy_matrix": pl_module.R, "acc_seen": pl_module.A, "trainable_params": pl_module.trainable_params,
        "slow_update_interval": pl_module.slow_update_interval,
    }
    if pl_module.A:
        out.update(cm.summary(pl_module.R, pl_module.A))
    if hp.adapter_type == "sema":
        out["expansions"] = pl_module.expansions
        out["sema_layout"] = {str(k): v for k, v in pl_module.model.sema_layout().items()}
        out["expansion_order"] = hp.get("expansion_order", "joint")
        out["sema_trained_between"] = getattr(pl_module, "sema_trained_between", [])
    for cb in trainer.callbacks:
        if isinstance(cb, TaskBoundaryConsolidation):
            out["consolidations"] = cb.events
        if isinstance(cb, MultiRateStepping):
            out["fast_steps"], out["slow_steps"] = cb.fast_steps, cb.slow_steps
    return out
