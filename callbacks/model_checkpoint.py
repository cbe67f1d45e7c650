"""``ModelCheckpoint`` that never saves between an epoch's last training batch and that epoch's end.

Lightning 2.6 resumes a checkpoint written at the end of an epoch's last training batch (``every_n_train_steps``
landing there) as if the epoch had ended: the epoch's validation and its ``on_train_epoch_end`` hooks (histories,
epoch means) are skipped, and, because ``ModelCheckpoint`` saves once per step, the epoch-end save of that step is
skipped too, so ``last.ckpt`` keeps that incomplete state even when nothing was interrupted. Here such a step
save is made at the epoch end instead, after the validation and the other callbacks' ``on_train_epoch_end``
(Lightning runs checkpoint callbacks last): the checkpoint holds the finished epoch. ``last.ckpt`` is also saved
there when a SIGTERM during that last batch stops the run after the epoch (``callbacks/signals.py``).

A run that ``trainer.max_steps`` stops mid-epoch gets its final ``last.ckpt`` at that last batch (Lightning saves
nothing there when the step is not one of ``every_n_train_steps``, and otherwise at the epoch end, after the
unfinished epoch's end hooks, which a resumed run would then count twice): resuming it with a larger ``max_steps``
continues that epoch. Epoch-end checkpoints resume wrongly in two cases, whose loop state is rewritten when one
is loaded (:func:`fix_epoch_end_loop_state`): with ``max_steps`` set, Lightning resumes the end of a finished
epoch through its restart path (the next epoch skips its ``on_train_epoch_start`` hooks, or that epoch's end hooks
run again and it is counted twice); and the epoch-end checkpoint of an epoch that ``max_steps`` stopped early
resumes with that epoch counted twice (or, without ``max_steps``, as finished).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint


def on_last_batch(trainer: L.Trainer) -> bool:
    """The training batch that just ended is the last of its epoch (its validation and epoch end follow)."""
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


def stops_after_epoch(trainer: L.Trainer) -> bool:
    """In ``on_train_epoch_end``: the run ends after this epoch (``max_epochs`` or ``max_steps`` reached)."""
    epochs = trainer.max_epochs if trainer.max_epochs is not None else -1
    return (trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps) or \
        (epochs != -1 and trainer.current_epoch + 1 >= epochs)


def stops_mid_epoch(trainer: L.Trainer) -> bool:
    """The training batch that just ended reached ``trainer.max_steps`` before its epoch's last batch: the run
    ends after it (Lightning runs the unfinished epoch's end hooks, without validation, and stops)."""
    return trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps and not on_last_batch(trainer)


def fix_epoch_end_loop_state(loops: dict[str, Any], max_steps: int) -> str | None:
    """Rewrite, in place, the loop state of a checkpoint saved in ``on_train_epoch_end`` into one that Lightning 2.6
    resumes correctly (its private loop-state keys; anything else is left alone):

    * the end of a finished epoch, resumed with ``max_steps`` set: the state an uninterrupted run has when the
      next epoch starts (the epoch completed, fresh per-epoch counters, the data loader at its start);
    * the end of an epoch that ``max_steps`` stopped before its last batch: that epoch not yet processed, so it
      resumes mid-epoch (Lightning counts it at its real end).

    Returns which of the two was done (``"finished"``, ``"unfinished"``) or ``None``; a rewritten state is not
    rewritten again."""
    try:
        fit = loops["fit_loop"]
        epochs, batches = fit["epoch_progress"], fit["epoch_loop.batch_progress"]
        if not all(e["ready"] == e["started"] == e["processed"] == e["completed"] + 1
                   for e in (epochs["current"], epochs["total"])):
            return None  # not saved in on_train_epoch_end
        if batches["current"]["ready"] != batches["current"]["completed"]:
            return None
        if not batches["is_last_batch"]:
            for e in (epochs["current"], epochs["total"]):
                e["processed"] -= 1
            return "unfinished"
        if max_steps == -1:
            return None  # Lightning resumes it as the end of the epoch, correctly
        for e in (epochs["current"], epochs["total"]):
            e["completed"] = e["processed"]
        batches["is_last_batch"] = False  # and fresh per-epoch counters, as the next epoch's start resets them
        optim = fit["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]
        for counters in (batches["current"], fit["epoch_loop.scheduler_progress"]["current"],
                         fit["epoch_loop.val_loop.batch_progress"]["total"], optim["step"]["current"],
                         optim["zero_grad"]["current"]):
            for key in counters:
                counters[key] = 0
        fit.get("state_dict", {}).pop("combined_loader", None)  # the finished epoch's data position
        return "finished"
    except (KeyError, TypeError):
        return None


class ResumableModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (same arguments; ``cli.py``'s ``checkpoint`` group); a ``every_n_train_steps``
    save due on an epoch's last batch is made at that epoch's end, and ``last.ckpt`` (``save_last``) always ends
    holding the run's final step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._step_save_at_epoch_end = False
        self._batches_that_stepped: int | None = None  # the logging step count a rewritten epoch end resumes at

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # called before the loops read checkpoint["loops"] (Lightning 2.6)
        loops = checkpoint.get("loops") or {}
        if fix_epoch_end_loop_state(loops, trainer.max_steps) == "finished":
            # Lightning's restart path may spend the resumed epoch's first iteration on a skipped validation check
            # (its batch index is -1 then), which trains nothing but counts a logging step: undone at the first batch
            self._batches_that_stepped = loops["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._batches_that_stepped is not None:
            trainer.fit_loop.epoch_loop._batches_that_stepped = self._batches_that_stepped
            self._batches_that_stepped = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if on_last_batch(trainer):
            n = self._every_n_train_steps
            self._step_save_at_epoch_end |= n >= 1 and trainer.global_step % n == 0
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if stops_mid_epoch(trainer) and not self._should_skip_saving_checkpoint(trainer):
            # what the epoch end would save (an epoch-numbered file, last.ckpt), saved before its hooks run, and
            # always last.ckpt, the run's final state; the epoch end then saves nothing (same step). A monitored
            # metric that is not logged yet: no epoch-numbered file.
            candidates = self._monitor_candidates(trainer)
            if self._every_n_epochs >= 1 and (trainer.current_epoch + 1) % self._every_n_epochs == 0 \
                    and (self.monitor is None or self.monitor in candidates):
                self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        step_save, self._step_save_at_epoch_end = self._step_save_at_epoch_end, False
        # SIGTERM during the epoch's last batch (callbacks/signals.py) or the run's last epoch: the run stops after
        # this epoch end, and last.ckpt holds its final state (Lightning's stays at the last every_n_train_steps)
        if (step_save or trainer.received_sigterm or stops_after_epoch(trainer)) \
                and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            if step_save:
                self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
