"""The continual-method protocol and its registry.

A method is one small class in ``models/continual/methods/<name>.py`` registered with :func:`register_method`:
it adds its modules to the backbone (:meth:`ContinualMethod.attach`), says which of them train in a task
(:meth:`ContinualMethod.adapter_groups`), computes the features the classifier reads
(:meth:`ContinualMethod.features`), acts at task starts and ends (:meth:`ContinualMethod.on_task_start` /
:meth:`ContinualMethod.on_task_end`, given a :class:`TaskContext`), may train a task in several phases of
``epochs_per_task`` Lightning epochs each (:meth:`ContinualMethod.phases`, :meth:`ContinualMethod.on_phase_start` /
:meth:`ContinualMethod.on_phase_end`; SEMA layer by layer), can switch its adapters off
(:meth:`ContinualMethod.adapters_off`, for the "adapters zeroed" accuracy) and measures how far they moved the
backbone (:meth:`ContinualMethod.relative_delta`). ``ContinualViT`` and the LightningModule call only these, so a
new method is one new file plus its config and tests. Constructor arguments are YAML keys of the
LightningModule (``create_method`` passes those the constructor names).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch
from torch import nn

METHODS: dict[str, type["ContinualMethod"]] = {}


def register_method(name: str) -> Callable[[type["ContinualMethod"]], type["ContinualMethod"]]:
    """Class decorator: make a method available as ``adapter_type: <name>``."""
    def wrap(cls: type[ContinualMethod]) -> type[ContinualMethod]:
        if name in METHODS and METHODS[name] is not cls:
            raise ValueError(f"continual method {name!r} is registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls
    return wrap


def method_names() -> tuple[str, ...]:
    import models.continual.methods  # noqa: F401  (registers every method file)

    return tuple(METHODS)


def create_method(name: str, settings: dict[str, Any]) -> "ContinualMethod":
    """The method registered as ``name``, built from the entries of ``settings`` its constructor names."""
    names = method_names()
    if name not in METHODS:
        raise ValueError(f"adapter_type must be one of {names}, got {name!r}")
    cls = METHODS[name]
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in settings.items() if k in params and k != "self"})


@dataclass
class TaskContext:
    """What a task hook may use: the model, the task and phase, its training/validation images, loggers.

    Args:
        model: the ``ContinualViT``.
        task: the task index.
        batches: ``batches(split, batch_size, shuffle)`` -> list of ``(x, y)`` of the task's ``split`` set, on the
            model's device.
        phase: the training phase of the task (0 .. ``method.phases(task) - 1``; phase hooks only).
        steps: training batches of one phase (``epochs_per_task`` epochs; the phase hooks' phase when it trains).
        log: ``log(metrics)`` sends scalars to the loggers at step ``task``.
        info: ``info(message)`` prints on rank zero.
    """

    model: Any
    task: int
    batches: Callable[[str, int, bool], list[tuple[torch.Tensor, torch.Tensor]]]
    phase: int = 0
    steps: int = 0
    log: Callable[[dict[str, float]], None] = field(default=lambda metrics: None)
    info: Callable[[str], None] = field(default=lambda message: None)


class ContinualMethod:
    """Base class: a frozen backbone with nothing added (the head is the only trained part)."""

    name: ClassVar[str] = "base"
    #: the method adds modules during training (DDP cannot follow)
    grows: ClassVar[bool] = False
    #: Nested LoRA: the LightningModule adds the task-boundary consolidation callback
    consolidates: ClassVar[bool] = False

    def attach(self, model: nn.Module) -> None:
        """Add the method's modules to ``model.backbone`` (called once, on the frozen backbone)."""
        self.model = model

    def feature_dim(self, dim: int) -> int:
        """Width of :meth:`features` for a backbone of width ``dim``."""
        return dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled features the classifier reads."""
        return self.model.backbone(x)

    def adapter_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        """Parameters trained in ``task`` by group: ``fast`` (every batch), ``slow`` (the slow optimizer),
        ``descriptors`` (trained in their own phase, not by the optimizers)."""
        return {"fast": [], "slow": [], "descriptors": []}

    def trains_backbone(self, task: int) -> bool:
        """The method itself trains the whole backbone in ``task``."""
        return False

    def is_adapter(self, name: str) -> bool:
        """Whether backbone parameter ``name`` belongs to the method (not the pre-trained backbone)."""
        return ".adapters." in name or ".sema." in name

    def on_task_start(self, ctx: TaskContext) -> None:
        """Before the task's trainable parameters are chosen (modules added here train in the task)."""

    def phases(self, task: int) -> int:
        """Training phases of ``task``, each ``epochs_per_task`` Lightning epochs with the regular training step and
        fresh optimizers (the LightningModule schedules them and derives ``trainer.max_epochs``; static: known
        before training)."""
        return 1

    def on_phase_start(self, ctx: TaskContext) -> bool:
        """Before phase ``ctx.phase`` chooses its trainable parameters (after :meth:`on_task_start` for phase 0);
        returns whether the phase trains (``False``: its epochs are skipped)."""
        return True

    def on_phase_end(self, ctx: TaskContext) -> None:
        """After every phase but the task's last (skipped ones included), when the next phase starts (so a
        checkpoint saved between the two holds the ended phase's optimizers); the last one ends with
        :meth:`on_task_end`."""

    def on_task_end(self, ctx: TaskContext) -> None:
        """After the task's last batch and the callbacks' ``on_task_end`` hooks, before the evaluation."""

    @contextlib.contextmanager
    def adapters_off(self) -> Iterator[None]:
        """Inside: the backbone computes as without the method's adapters."""
        yield

    def relative_delta(self) -> float:
        """How far the adapters moved the backbone: root-sum-square of their weight deltas over that of the weights
        they modify (0 when nothing is added)."""
        return 0.0

    def state(self) -> dict[str, Any]:
        """What a checkpoint needs beyond the state dict (structure, events); JSON-friendly."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Rebuild from :meth:`state` (before the state dict is loaded)."""

    def results(self) -> dict[str, Any]:
        """Extra entries of ``results.json``."""
        return {}

    def diagnostics(self) -> dict[str, float]:
        """Scalars logged after every task (besides the relative delta)."""
        return {}
