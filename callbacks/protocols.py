"""The hooks that adaptlab's callbacks call, written down as Protocols.

A LightningModule or DataModule opts into a callback's behaviour by offering these methods; the callbacks
check for them with ``isinstance(obj, Protocol)`` (runtime-checkable: the method names are checked, the
signatures are documented here).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


@runtime_checkable
class HealthSignals(Protocol):
    """A module with its own health measures, read by ``StabilityMonitor`` once per backward."""

    def health_signals(self) -> dict[str, torch.Tensor | float]:
        """Scalar tensors (or floats) by name; larger means less healthy (a bound, a norm, a condition number).

        Called after the backward and before the optimizer step; logged as ``health/<name>``; a NaN/Inf value
        (or, with ``check_signal_spikes``, a spike) fails the step.
        """
        ...


@runtime_checkable
class TaskBoundaryHooks(Protocol):
    """A callback that acts at task boundaries of a continual-learning sequence.

    The LightningModule running the sequence calls, in this order: ``on_task_start`` when a task's first
    epoch starts (after its optimizers are set up); ``on_task_end`` after the task's last batch (work that
    changes the model, e.g. consolidation); then ``on_task_evaluate`` (measurement of the final model of the
    task, e.g. the accuracy-matrix row). A callback may implement any subset; missing hooks are skipped.
    """

    def on_task_start(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None: ...

    def on_task_end(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None: ...

    def on_task_evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, task: int) -> None: ...


@runtime_checkable
class TaskSequenceModule(Protocol):
    """A LightningModule that trains a task sequence (read by ``MultiRateStepping`` to close slow windows)."""

    def is_task_end_batch(self, batch_idx: int) -> bool:
        """True on the last batch of a task's last epoch."""
        ...


@runtime_checkable
class ClassIncrementalData(Protocol):
    """What a class-incremental DataModule offers the continual LightningModule and its evaluation callback.

    Epoch ``e`` trains phase ``phase_of_epoch(e)`` of task ``task_of_epoch(e)``: a task trains for ``phases[t]``
    phases (``schedule_phases(phases)``; one each by default) of ``epochs_per_task`` epochs, from epoch
    ``first_epoch(t)`` on; ``num_epochs`` covers the sequence. Classes are numbered in task order, so task ``t``
    owns labels ``task_offset(t) .. classes_seen(t) - 1``.
    """

    num_classes: int
    num_tasks: int
    epochs_per_task: int
    num_epochs: int

    def schedule_phases(self, phases: Sequence[int]) -> None: ...

    def first_epoch(self, task: int) -> int: ...

    def task_of_epoch(self, epoch: int) -> int: ...

    def phase_of_epoch(self, epoch: int) -> int: ...

    def task_offset(self, task: int) -> int: ...

    def classes_seen(self, task: int) -> int: ...

    def task_dataset(self, split: str, task: int) -> Dataset: ...

    def loader(self, dataset: Dataset) -> DataLoader: ...


@runtime_checkable
class DataPreflight(Protocol):
    """A DataModule that can check its input before any run folder exists (``cli.py`` calls it first).

    ``preflight(stage)`` reads or at least opens everything ``setup(stage)`` will need (it may cache what it read
    for ``setup``) and raises ``ValueError``/``OSError`` naming the key or the file (a corrupt image, a non-UTF-8
    label file, an empty class folder, a binary text file). Stages: ``fit``, ``validate``, ``test``, ``predict``.
    """

    def preflight(self, stage: str) -> None: ...


@runtime_checkable
class DataCompatibility(Protocol):
    """A LightningModule that cross-checks its settings against the DataModule before any work starts.

    ``check_data(datamodule)`` raises ``ValueError`` naming both keys when sizes do not fit together (e.g.
    ``data.seq_len`` > ``model.config.block_size``, ``data.image_size`` != ``model.img_size``, more classes in the
    data than ``model.num_classes``, data frames vs model frames). Called after ``DataPreflight.preflight``.
    """

    def check_data(self, datamodule: L.LightningDataModule) -> None: ...


@runtime_checkable
class TrainedWeights(Protocol):
    """A LightningModule that can say where its trained weights came from without a ``--ckpt_path``.

    ``trained_weights_source()`` returns a description (e.g. the ``pretrained_path`` or ``adapter_path``) or
    ``None``; ``predict`` without ``--ckpt_path`` is refused unless it returns something.
    """

    def trained_weights_source(self) -> str | None: ...


@runtime_checkable
class MemoryDiagnostics(Protocol):
    """A module whose memory reports diagnostics, read by ``Phase2Diagnostics`` after every training batch."""

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Detached 0-dim tensors by name from the last forward (no host sync); NaN where undefined."""
        ...


@runtime_checkable
class LoggedMetrics(Protocol):
    """A LightningModule or callback that says which metric names it logs with ``self.log`` (what
    ``checkpoint.monitor`` and ``EarlyStopping(monitor=...)`` can name); ``cli.py`` checks a monitor against
    them before training, so a typo fails at once instead of after the first epoch."""

    def logged_metrics(self) -> list[str]:
        """Metric names; a name may be an ``fnmatch`` pattern (``phase1/*``) for families of dynamic names."""
        ...


@runtime_checkable
class TrainerCompatibility(Protocol):
    """A LightningModule whose needs on the Trainer's settings (epochs, steps) ``cli.py`` checks before ``fit``
    writes anything."""

    def check_trainer(self, trainer: L.Trainer, datamodule: L.LightningDataModule | None) -> None:
        """Raise ``ValueError`` naming the ``trainer.<key>`` that does not fit this module."""
        ...
