"""``ModelCheckpoint`` that never saves between an epoch's last training batch and that epoch's end.

Lightning 2.6 resumes a checkpoint written at the end of an epoch's last training batch (``every_n_train_steps``
landing there) as if the epoch had ended: the epoch's validation and its ``on_train_epoch_end`` hooks (histories,
epoch means) are skipped, and, because ``ModelCheckpoint`` saves once per step, the epoch-end save of that step is
skipped too, so ``last.ckpt`` keeps that incomplete state even when nothing was interrupted. Here such a step
save is made at the epoch end instead, after the validation and the other callbacks' ``on_train_epoch_end``
(Lightning runs checkpoint callbacks last): the checkpoint holds the finished epoch. ``last.ckpt`` is also saved
there when a SIGTERM during that last batch stops the run after the epoch (``callbacks/signals.py``).
Runs with ``max_steps`` keep Lightning's behaviour (see :func:`on_last_batch`).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint as LightningModelCheckpoint


def on_last_batch(trainer: L.Trainer) -> bool:
    """The training batch that just ended is the last of its epoch (its validation and epoch end follow) and the
    run counts epochs: with ``max_steps`` set, Lightning 2.6 resumes an epoch-end checkpoint with one batch too many
    (measured with ``tests/ddp_sigterm_script.py``), so there the checkpoint stays at the batch."""
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch) and trainer.max_steps == -1


class ResumableModelCheckpoint(LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (same arguments; ``cli.py``'s ``checkpoint`` group); a ``every_n_train_steps``
    save due on an epoch's last batch is made at that epoch's end."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._step_save_at_epoch_end = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if on_last_batch(trainer):
            n = self._every_n_train_steps
            self._step_save_at_epoch_end |= n >= 1 and trainer.global_step % n == 0
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        step_save, self._step_save_at_epoch_end = self._step_save_at_epoch_end, False
        # SIGTERM during the epoch's last batch (callbacks/signals.py): the run stops after this epoch end
        if (step_save or trainer.received_sigterm) and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            if step_save:
                self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
