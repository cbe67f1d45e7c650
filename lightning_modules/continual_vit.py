"""Class-incremental learning with a frozen ViT: one ``fit`` runs the whole task sequence.

Epoch ``e`` trains task ``e // epochs_per_task`` of a ``ClassIncrementalDataModule`` (one training phase per
task; a method may ask for more, below). The continual method (``adapter_type``: a file in
``models/continual/methods/``, found through its registry) decides what is added to the backbone and what
trains; this module only wires it. A task starts with the method's ``on_task_start``
(SEMA: self-expansion), the task's trainable parameters and fresh optimizers with a cosine schedule over the
task; it ends on its last batch (before that epoch's checkpoint) with ``on_task_end`` on every callback that
has it (Nested LoRA consolidation), the method's ``on_task_end`` (SEMA: descriptors), the statistics classifier's
fit (``classifier: ncm | ridge``), then ``on_task_evaluate`` (the ``ContinualEvaluation`` callback: the
accuracy-matrix row, the continual metrics, the plots and ``results.json``). The hooks are the
``TaskBoundaryHooks`` protocol of ``callbacks/protocols.py``. The task index, the matrix and the SEMA layout
are checkpointed, so ``--ckpt_path last`` resumes mid-sequence.

A method may train a task in several phases (``method.phases(task)``; SEMA layer by layer: one per expandable
layer): the DataModule schedules them as consecutive runs of ``epochs_per_task`` epochs, ``trainer.max_epochs``
counts them, and each phase starts with the method's ``on_phase_start`` (SEMA: one layer's expansion test),
its trainable parameters and fresh optimizers, and trains through ``training_step`` like any epoch; a phase the
method leaves without training is skipped (its epochs end at their first batch). The method's ``on_phase_end``
(SEMA: the layer's descriptor) runs when the next phase starts.

Manual optimization: ``training_step`` calls ``manual_backward`` once and never steps; the
``MultiRateStepping`` callback steps the fast optimizer (head + adapters, ``lr_fast``) every batch and the
slow one (Nested LoRA's slow adapters, ``lr_slow``) every ``slow_update_interval`` batches. Missing
``MultiRateStepping``/``TaskBoundaryConsolidation``/``ContinualEvaluation`` callbacks are added from these
hyper-parameters.

Backbone weights: ``pretrained_file`` (a local timm file), or ``pretrain`` (adaptlab's offline glyph backbone,
``datamodules.glyph_backbone``: pre-trained on glyph classes disjoint from the glyph sequence, built on first use
and cached by its settings, then loaded through the same ``pretrained_file`` path), or neither (random init).

First-task adaptation (``first_task_adaptation: true``, meant for backbones without pretrained weights): the
whole backbone also trains on the first task, then stays frozen.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from callbacks.adapter_checkpoint import AdapterCheckpoint
from callbacks.class_predictions import ClassPredictionWriter, classify
from callbacks.consolidation import TaskBoundaryConsolidation
from callbacks.continual_eval import ContinualEvaluation
from callbacks.multi_rate import MultiRateStepping
from callbacks.protocols import ClassIncrementalData
from datamodules.glyph_backbone import GlyphPretraining, ensure_glyph_backbone
from models.continual.base import TaskContext, method_names
from models.vision.continual_vit import ContinualViT


class ContinualClassifier(L.LightningModule):
    """Thin wrapper of :class:`models.vision.continual_vit.ContinualViT` for class-incremental sequences.

    Args:
        backbone: timm ViT name.
        num_classes: classes over the whole sequence (one head row each).
        img_size: input image size (square).
        patch_size: ViT patch size (``None``: the model's own).
        pretrained_file: local backbone weights (never downloaded).
        pretrain: build (once, cached) and load adaptlab's glyph-pretrained backbone for this architecture;
            exclusive with ``pretrained_file``.
        backbone_kwargs: extra ``timm.create_model`` arguments (e.g. ``depth``, ``embed_dim``).
        adapter_type: the continual method, a name registered in ``models/continual/methods/`` (``none``: head
            only, ``lora``, ``nested_lora``, ``sema``, ``aper``: first-session adaptation).
        classifier: ``linear`` (the trained head), ``ncm`` (cosine nearest class mean: SimpleCIL with ``none``,
            APER with ``aper``) or ``ridge`` (RanPAC's random projection + ridge); on top of any method.
        ridge_dim: random-projection width of the ``ridge`` classifier.
        lora_r: LoRA rank (``lora``, ``aper``).
        aper_phases: ``aper``: phases of ``epochs_per_task`` epochs that adapt on the first task (1: a regular task).
        lora_alpha: LoRA alpha (``None``: the rank).
        lora_target_modules: layers that get LoRA / Nested LoRA (``None``: attention and MLP linears).
        nested_lora_r: rank of Nested LoRA's fast adapter (and of the slow one unless ``nested_slow_r``).
        nested_slow_r: rank of Nested LoRA's slow adapter (``None``: ``nested_lora_r``).
        sema_layers: blocks that get SEMA adapters (``None``: all).
        expansion_layers: blocks where SEMA may add adapters at a new task.
        sema_bottleneck: SEMA adapter bottleneck width.
        sema_descriptor_hidden: SEMA descriptor autoencoder width (keep it below the backbone width).
        first_task_adaptation: also train the whole backbone on the first task, then freeze it.
        finetune_backbone: train the whole backbone on every task (the full fine-tuning baseline).
        lr_fast: learning rate of the adapters (Nested LoRA: the fast adapters), and of the head unless
            ``lr_head`` is set.
        lr_head: learning rate of the classifier head (``None``: ``lr_fast``).
        lr_slow: learning rate of Nested LoRA's slow adapters.
        lr_backbone: first-task adaptation learning rate (``None``: ``lr_fast``).
        lr_descriptor: learning rate of SEMA's descriptors (SGD in their own phase).
        slow_update_interval: batches per slow update (0 or 1: every batch).
        use_consolidation: Nested LoRA task-boundary consolidation (adds a ``TaskBoundaryConsolidation``
            callback when the trainer has none; one configured explicitly always runs).
        consolidation_alpha: weight of the fast delta folded into slow (unless the callback sets its own).
        expansion_threshold: SEMA's z-score threshold.
        expansion_order: ``joint`` (every layer is tested on the unexpanded model, all new adapters train
            together) or ``layerwise`` (SEMA-CL: a layer's new adapter, router row and the head train for
            ``epochs_per_task`` extra epochs, scheduled as Lightning epochs, and its descriptor is fitted before
            the next layer is tested).
        expansion_batches: batches of the new task scored per SEMA expansion check (``None``: all, as SEMA).
        expansion_batch_size: batch size of the expansion check (128 in SEMA; |z| is averaged over a batch).
        descriptor_epochs: epochs of SEMA's descriptor phase after each task (20 in SEMA).
        optimizer: ``adamw`` or ``sgd`` (momentum 0.9, as SEMA).
        weight_decay: weight decay of either optimizer.
        scheduler: ``cosine`` (per task, per optimizer) or ``constant``.
        mask_old_logits: set earlier tasks' logits to -inf while training a new task.
        adapter_path: an ``adapter/`` folder of an earlier run (adapters, head and sequence state without the frozen
            backbone) loaded onto this freshly built model (``predict`` then needs no ``--ckpt_path``).
    """

    def logged_metrics(self) -> list[str]:
        """Every name this module logs (``checkpoint.monitor`` is checked against it before training)."""
        return ["train/loss", "train/acc", "train/descriptor_loss", "val/acc", "val/loss", "test/acc"]

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        num_classes: int = 10,
        img_size: int = 32,
        patch_size: int | None = 8,
        pretrained_file: str | None = None,
        pretrain: GlyphPretraining | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        adapter_type: str = "nested_lora",
        classifier: Literal["linear", "ncm", "ridge"] = "linear",
        ridge_dim: int = 1000,
        first_task_adaptation: bool = False,
        finetune_backbone: bool = False,
        lora_r: int = 8,
        aper_phases: int = 1,
        lora_alpha: float | None = None,
        lora_target_modules: None | str | Sequence[str] = None,
        nested_lora_r: int = 4,
        nested_slow_r: int | None = None,
        sema_layers: Sequence[int] | None = None,
        expansion_layers: Sequence[int] = (-3, -2, -1),
        expansion_threshold: float = 2.0,
        expansion_order: Literal["joint", "layerwise"] = "joint",
        expansion_batches: int | None = None,
        expansion_batch_size: int = 128,
        descriptor_epochs: int = 20,
        sema_bottleneck: int = 16,
        sema_descriptor_hidden: int = 128,
        lr_fast: float = 1e-3,
        lr_head: float | None = None,
        lr_slow: float = 1e-4,
        lr_backbone: float | None = None,
        lr_descriptor: float = 1e-2,
        slow_update_interval: int = 1,
        use_consolidation: bool = True,
        consolidation_alpha: float = 1.0,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        weight_decay: float = 0.0,
        scheduler: Literal["cosine", "constant"] = "cosine",
        mask_old_logits: bool = True,
        adapter_path: str | None = None,
    ) -> None:
        super().__init__()
        if adapter_type not in method_names():
            raise ValueError(f"adapter_type must be one of {method_names()}, got {adapter_type!r}")
        for key in ("lr_fast", "lr_slow", "lr_descriptor", "lr_head"):
            if locals()[key] is not None and locals()[key] <= 0:
                raise ValueError(f"{key} must be positive, got {locals()[key]}")
        if slow_update_interval < 0:
            raise ValueError(f"slow_update_interval must be >= 0 (0 or 1: every step), got {slow_update_interval}")
        if ridge_dim < 0:
            raise ValueError(f"ridge_dim must be >= 0 (0: ridge on the features themselves), got {ridge_dim}")
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        if scheduler not in ("cosine", "constant"):
            raise ValueError(f"scheduler must be 'cosine' or 'constant', got {scheduler!r}")
        if pretrain is not None and pretrained_file is not None:
            raise ValueError("model.pretrain and model.pretrained_file are exclusive: set one of them to null")
        if patch_size is not None and img_size % patch_size:
            raise ValueError(f"model.img_size ({img_size}) is not a multiple of model.patch_size ({patch_size}): the "
                             f"last {img_size % patch_size} pixel rows and columns would be silently dropped")
        self.save_hyperparameters()
        self.automatic_optimization = False
        own_keys = {"backbone", "num_classes", "img_size", "patch_size", "pretrained_file", "backbone_kwargs",
                    "adapter_type", "classifier", "ridge_dim"}
        settings = {k: v for k, v in self.hparams.items() if k not in own_keys}
        if pretrain is not None:
            pretrained_file = str(ensure_glyph_backbone(backbone, img_size, patch_size, backbone_kwargs, pretrain))
        self.backbone_file = pretrained_file
        self.model = ContinualViT(backbone, num_classes, img_size, patch_size, pretrained_file, backbone_kwargs,
                                  adapter_type, classifier, ridge_dim, **settings)
        own = getattr(getattr(self.model.backbone, "patch_embed", None), "patch_size", None)
        sides = own if isinstance(own, (tuple, list)) else (own,)
        bad = [side for side in sides if isinstance(side, int) and img_size % side]
        if patch_size is None and bad:
            raise ValueError(f"model.img_size ({img_size}) is not a multiple of {backbone}'s patch size ({bad[0]}; "
                             f"model.patch_size: null): the last {img_size % bad[0]} pixel rows or columns would be "
                             "silently dropped")
        self.slow_update_interval = slow_update_interval
        self.consolidation_alpha = consolidation_alpha
        # Sequence state (checkpointed): task and phase being trained (whether it trains, its steps), last finished
        # task, matrix, per-task measurements.
        self.task, self.finished_task, self.task_steps, self.seen_classes = -1, -1, 1, 0
        self.phase, self.phase_trains = 0, True
        self.trainable_params: dict[str, int] = {}
        self.R: list[list[float]] = []
        self.A: list[float] = []
        self.task_records: list[dict[str, Any]] = []  # per task: old/new accuracy, task confusion (evaluation)
        if adapter_path is not None:
            self.load_adapter(adapter_path)

    @property
    def method(self) -> Any:
        return self.model.method

    @property
    def dm(self) -> ClassIncrementalData:
        dm = self.trainer.datamodule
        if not isinstance(dm, ClassIncrementalData):
            raise TypeError(f"{type(self).__name__} needs a class-incremental DataModule (ClassIncrementalDataModule); "
                            f"{type(dm).__name__} lacks the ClassIncrementalData methods (callbacks/protocols.py)")
        return dm

    # ------------------------------------------------------------------ wiring

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the classes seen so far (every class before the first task)."""
        return self.model(x, self.seen_classes or None)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        dm, task = self.dm, max(self.task, 0)
        n_old = dm.task_offset(task) if self.hparams.mask_old_logits else 0
        logits = self.model(x, dm.classes_seen(task), n_old)
        loss = F.cross_entropy(logits, y)
        aux = self.model.auxiliary_loss()
        total = loss if aux is None else loss + aux
        self.manual_backward(total)
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/acc", (logits.argmax(-1) == y).float().mean(), on_step=False, on_epoch=True)
        if aux is not None:
            self.log("train/descriptor_loss", aux.detach())
        return total.detach()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        # the classes of the validation data (the current epoch's task), not self.seen_classes: a run resumed
        # at a task boundary validates (sanity check) before its next task has begun
        logits = self.model(x, self.dm.classes_seen(self.dm.current_task()))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=True, batch_size=len(y), sync_dist=True)
        self.log("val/loss", F.cross_entropy(logits, y), batch_size=len(y), sync_dist=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x, self.hparams.num_classes)
        self.log("test/acc", (logits.argmax(-1) == y).float().mean(), batch_size=len(y), sync_dist=True)

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> dict[str, torch.Tensor]:
        """Class (among the classes seen so far) and probability per sample of a ``(x, y, index)`` batch."""
        return classify(self(batch[0]), batch)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = self.model.parameter_groups(max(self.task, 0), self._trains_backbone(max(self.task, 0)))
        optimizers = [self._optimizer(self._fast_groups(groups))]
        if groups["slow"]:
            optimizers.append(self._optimizer([{"params": groups["slow"], "lr": hp.lr_slow, "name": "slow"}]))
        if hp.scheduler == "constant":
            return optimizers
        interval = max(1, self.slow_update_interval)
        steps = [self.task_steps] + [math.ceil(self.task_steps / interval)] * (len(optimizers) - 1)
        schedulers = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(1, s)) for o, s in zip(optimizers, steps)]
        return optimizers, schedulers

    def _fast_groups(self, groups: dict[str, list[torch.nn.Parameter]]) -> list[dict]:
        """The fast optimizer's parameter groups (named, for the ``lr/<name>`` logs): head, fast adapters and
        (when trained) the backbone."""
        hp = self.hparams
        fast = [{"params": groups["head"], "lr": hp.lr_head or hp.lr_fast, "name": "head"}]
        if groups["fast"]:
            fast.append({"params": groups["fast"], "lr": hp.lr_fast, "name": "fast"})
        if groups["backbone"]:
            fast.append({"params": groups["backbone"], "lr": hp.lr_backbone or hp.lr_fast, "name": "backbone"})
        return fast

    def _optimizer(self, groups: list[dict]) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(groups, momentum=0.9, weight_decay=self.hparams.weight_decay)
        return torch.optim.AdamW(groups, weight_decay=self.hparams.weight_decay)

    def configure_callbacks(self) -> list[Callback]:
        present = {type(c) for c in self.trainer.callbacks}
        out: list[Callback] = []
        if not any(issubclass(t, MultiRateStepping) for t in present):
            out.append(MultiRateStepping())
        if self.method.consolidates and not any(issubclass(t, TaskBoundaryConsolidation) for t in present):
            out.append(TaskBoundaryConsolidation())
        if not any(issubclass(t, ContinualEvaluation) for t in present):
            out.append(ContinualEvaluation())
        if not any(issubclass(t, ClassPredictionWriter) for t in present):
            out.append(ClassPredictionWriter())
        if not any(issubclass(t, AdapterCheckpoint) for t in present):
            out.append(AdapterCheckpoint())
        return out

    def check_data(self, datamodule: L.LightningDataModule) -> None:
        """Image size and class count must fit the data (``callbacks.protocols.DataCompatibility``; ``cli.py`` calls
        it before any run folder exists, :meth:`setup` again for Python callers)."""
        hp, dhp = self.hparams, getattr(datamodule, "hparams", {})
        size = dhp.get("image_size") if hasattr(dhp, "get") else None
        if size is not None and size != hp.img_size:
            raise ValueError(f"data.image_size ({size}) differs from model.img_size ({hp.img_size}); set both to the "
                             "same value")
        classes = getattr(datamodule, "num_classes", None)
        if classes is not None and classes != hp.num_classes:
            source = {"glyphs": "data.glyph_classes", "image_folder": "class folders under data.root",
                      "multidomain": "data.domain_classes"}.get(
                dhp.get("dataset") if hasattr(dhp, "get") else None, "its dataset")
            raise ValueError(f"the data has {classes} classes ({source}) but model.num_classes is {hp.num_classes} "
                             "(one head row per class of the sequence); set them equal")

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        dm, trainer = self.dm, self.trainer
        self.check_data(dm)
        if self.method.grows and trainer.world_size > 1:
            raise ValueError(f"adapter_type: {self.hparams.adapter_type} adds modules during training, which DDP "
                             "cannot synchronise; run it on one device (trainer.devices: 1)")
        ddp_kwargs = getattr(trainer.strategy, "_ddp_kwargs", None)
        if (self.hparams.first_task_adaptation and not self.hparams.finetune_backbone and trainer.world_size > 1
                and ddp_kwargs is not None and not ddp_kwargs.get("find_unused_parameters", False)):
            raise ValueError("model.first_task_adaptation freezes the backbone after the first task, so DDP must "
                             "allow unused parameters: set trainer.strategy: ddp_find_unused_parameters_true")
        if self.check_trainer(trainer, dm):
            trainer.fit_loop.max_epochs = dm.num_epochs
            rank_zero_info(f"trainer.max_epochs set to {dm.num_epochs} ({self._sequence(dm)})")
        trainer.reload_dataloaders_every_n_epochs = 1  # the train/val loaders follow the current task
        if self.task < 0:
            self.model.set_trainable(0, self._trains_backbone(0))

    def check_trainer(self, trainer: L.Trainer, datamodule: L.LightningDataModule | None) -> bool:
        """Schedule the method's phases on the DataModule; ``trainer.max_epochs`` must not exceed the sequence; a
        smaller value (stop part-way, resume later) is announced up front (it used to train the first tasks only,
        silently); returns whether it is unset (then :meth:`setup` derives it)."""
        dm = datamodule
        if not isinstance(dm, ClassIncrementalData):
            return False  # setup() names the missing DataModule methods
        dm.schedule_phases([self.method.phases(t) for t in range(dm.num_tasks)])
        required = dm.num_epochs
        max_epochs = trainer.fit_loop.max_epochs
        if max_epochs is None or max_epochs == -1 or (max_epochs == 1000 and trainer.max_steps == -1):
            return True
        sequence = f"the sequence is {self._sequence(dm)} = {required} epochs"
        if max_epochs > required:
            raise ValueError(f"trainer.max_epochs={max_epochs} exceeds it: {sequence}; leave it unset to derive it")
        if max_epochs < required and not getattr(self, "_warned_partial", False):
            self._warned_partial = True
            rank_zero_warn(f"trainer.max_epochs={max_epochs} stops the sequence part-way, in task "
                           f"{dm.task_of_epoch(max_epochs - 1)} of {dm.num_tasks} ({sequence}); continue it "
                           "with --ckpt_path last, or leave max_epochs unset to train every task")
        return False

    def _sequence(self, dm: ClassIncrementalData) -> str:
        """The sequence's epochs in words (tasks x epochs, plus the method's extra phases)."""
        text = f"{dm.num_tasks} tasks x {dm.epochs_per_task} data.epochs_per_task"
        extra = dm.num_epochs // dm.epochs_per_task - dm.num_tasks
        if extra:
            text += f" + {extra} extra phases of {self.hparams.adapter_type} x {dm.epochs_per_task}"
        return text

    def on_train_epoch_start(self) -> None:
        dm = self.dm
        task, phase = dm.task_of_epoch(self.current_epoch), dm.phase_of_epoch(self.current_epoch)
        if (task, phase) == (self.task, self.phase):
            return
        if task == self.task:
            self.method.on_phase_end(self.task_context(task, self.phase))
        else:
            if 0 <= self.task and self.finished_task < self.task:
                self._finish_task(self.task)
            self._begin_task(task)
        self._begin_phase(task, phase)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> int | None:
        """-1 (Lightning ends the epoch) in a phase the method left without training."""
        return None if self.phase_trains else -1

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Finish the task on its last batch, after the callbacks' final optimizer steps and before the epoch's
        checkpoint, so ``last.ckpt`` holds the consolidated model and the full accuracy matrix."""
        if self.is_task_end_batch(batch_idx) and 0 <= self.task and self.finished_task < self.task:
            self._finish_task(self.task)

    def on_train_end(self) -> None:
        """Finish the last task if all its epochs ran (a run stopped mid-task resumes from its checkpoint)."""
        complete = self.current_epoch >= self.dm.first_epoch(self.task + 1)
        if 0 <= self.task and self.finished_task < self.task and complete:
            self._finish_task(self.task)

    def is_task_end_batch(self, batch_idx: int) -> bool:
        """True on the last batch of a task's last epoch (closes an open slow-update window)."""
        dm = self.dm
        last_epoch = self.current_epoch + 1 == dm.first_epoch(dm.task_of_epoch(self.current_epoch) + 1)
        return last_epoch and batch_idx + 1 >= self.trainer.num_training_batches

    # ------------------------------------------------------------------ task boundaries

    def task_context(self, task: int, phase: int = 0) -> TaskContext:
        """What the method's task hooks may use (``models.continual.base.TaskContext``)."""
        from torch.utils.data import DataLoader

        dm, device = self.dm, self.device

        def batches(split: str, batch_size: int, shuffle: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
            ds = dm.task_dataset(split, task)
            loader = dm.loader(ds) if batch_size == 0 else DataLoader(
                ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(task))
            return [(x.to(device), y.to(device)) for x, y in loader]

        def log(metrics: dict[str, float]) -> None:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=task)

        steps = dm.epochs_per_task * int(self.trainer.num_training_batches)
        return TaskContext(self.model, task, batches, phase, steps, log, rank_zero_info)

    def _begin_task(self, task: int) -> None:
        self.method.on_task_start(self.task_context(task))

    def _begin_phase(self, task: int, phase: int) -> None:
        """The phase's trainable parameters and fresh optimizers (a skipped phase's too, so that its checkpoints
        hold the optimizers ``configure_optimizers`` rebuilds)."""
        trainer, dm = self.trainer, self.dm
        trains = self.method.on_phase_start(self.task_context(task, phase))
        self.model.to(self.device)
        groups = self.model.set_trainable(task, self._trains_backbone(task))
        self.task, self.seen_classes = task, dm.classes_seen(task)
        self.phase, self.phase_trains = phase, trains
        self.task_steps = dm.epochs_per_task * int(trainer.num_training_batches)
        trainer.strategy.setup_optimizers(trainer)
        if phase == 0:
            for cb in self._callbacks_with("on_task_start"):
                cb.on_task_start(trainer, self, task)
        phases = self.method.phases(task)
        where = f"task {task}" + (f", phase {phase + 1} of {phases}" if phases > 1 else "")
        if not trains:
            first = dm.first_epoch(task) + phase * dm.epochs_per_task
            rank_zero_info(f"[continual] {where}: nothing to train, epochs {first}..{first + dm.epochs_per_task - 1} "
                           "skipped")
            return
        counts = {f"params/{name}": float(sum(p.numel() for p in ps)) for name, ps in groups.items() if ps}
        counts["params/trainable"] = float(sum(counts.values()))
        counts["params/total"] = float(sum(p.numel() for p in self.model.parameters()))
        for logger in self.loggers:
            logger.log_metrics({**counts, "task": float(task)}, step=task)
        self.trainable_params = {k.split("/")[1]: int(v) for k, v in counts.items()}
        rank_zero_info(f"[continual] {where}: classes {dm.task_offset(task)}..{dm.classes_seen(task) - 1}, trainable "
                       f"parameters {int(counts['params/trainable'])}")

    def _finish_task(self, task: int) -> None:
        """Task-boundary work (``on_task_end`` hooks, the method's task end, the statistics classifier), then
        measurement (``on_task_evaluate``)."""
        for cb in self._callbacks_with("on_task_end"):
            cb.on_task_end(self.trainer, self, task)
        ctx = self.task_context(task)
        self.method.on_task_end(ctx)
        if self.model.classifier is not None:
            ctx.log(self.model.fit_classifier(ctx.batches("train", 0, False), self.dm.classes_seen(task),
                                              ctx.batches("val", 0, False)))
        self.finished_task = task
        for cb in self._callbacks_with("on_task_evaluate"):
            cb.on_task_evaluate(self.trainer, self, task)

    def _trains_backbone(self, task: int) -> bool:
        return self.hparams.finetune_backbone or (self.hparams.first_task_adaptation and task == 0)

    def _callbacks_with(self, hook: str) -> list[Callback]:
        return [c for c in self.trainer.callbacks if callable(getattr(c, hook, None))]

    def trained_weights_source(self) -> str | None:
        """``adapter_path``, when given (``TrainedWeights`` protocol: ``predict`` then needs no ``--ckpt_path``)."""
        return self.hparams.adapter_path

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen backbone weights (all of it when the backbone trains at some task)."""
        hp = self.hparams
        skip = set() if hp.finetune_backbone or hp.first_task_adaptation else \
            {f"model.backbone.{n}" for n in self.model._backbone_names}
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k not in skip}

    def adapter_metadata(self) -> dict[str, str]:
        """The sequence state (task, seen classes, SEMA layout, ...) needed before the tensors load."""
        import json

        state: dict[str, Any] = {}
        self.on_save_checkpoint(state)
        return {"continual": json.dumps(state["continual"])}

    def load_adapter(self, path: str) -> None:
        """Load an ``AdapterCheckpoint`` folder (or file) of this class onto this freshly built model."""
        import json

        from safetensors import safe_open
        from safetensors.torch import load_file

        file = Path(path) / "adapter.safetensors" if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"adapter_path {str(file)!r} does not exist")
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
        if "continual" not in meta:
            raise ValueError(f"adapter_path {str(file)!r} was not written by a ContinualClassifier run")
        self.on_load_checkpoint({"continual": json.loads(meta["continual"])})
        state, own = load_file(str(file)), self.adapter_state_dict()
        bad = sorted(set(state) ^ set(own)) + [k for k in state if k in own and state[k].shape != own[k].shape]
        if bad:
            raise ValueError(f"adapter_path {str(file)!r} does not fit this model (other adapter settings?): "
                             f"{', '.join(bad[:4])}")
        self.load_state_dict(state, strict=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["continual"] = {
            "task": self.task, "finished_task": self.finished_task, "task_steps": self.task_steps,
            "phase": self.phase, "phase_trains": self.phase_trains,
            "seen_classes": self.seen_classes, "trainable_params": self.trainable_params,
            "R": self.R, "A": self.A, "task_records": self.task_records, **self.method.state(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("continual")
        if state is None:
            return
        self.task, self.finished_task, self.task_steps = state["task"], state["finished_task"], state["task_steps"]
        self.phase, self.phase_trains = state.get("phase", 0), state.get("phase_trains", True)
        self.seen_classes, self.trainable_params = state["seen_classes"], dict(state["trainable_params"])
        self.R, self.A = [list(r) for r in state["R"]], list(state["A"])
        self.task_records = list(state.get("task_records", []))
        self.method.load_state(state)
        self.model.set_trainable(max(self.task, 0), self._trains_backbone(max(self.task, 0)))
