"""SIGTERM (what cluster schedulers send before they kill a job): save a resumable checkpoint, exit non-zero.

Lightning notices SIGTERM and stops at the end of the current training batch by raising ``SIGTERMException``
(a ``SystemExit`` with status 0), losing every step since the last checkpoint. ``SigtermCheckpoint`` (one of
``cli.py``'s default callbacks) saves ``last.ckpt`` at that batch end, the point where ``ModelCheckpoint``'s own
mid-epoch checkpoints are taken, so ``--ckpt_path last`` resumes exactly; then the process exits with status
143 (128 + SIGTERM), so a scheduler sees an interrupted job, not a finished one. A SIGTERM during validation
saves at the exception instead (resumable; Lightning reruns that validation).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

#: Exit status of a run stopped by SIGTERM (the shell's 128 + signal number).
SIGTERM_EXIT_CODE = 143


class SigtermCheckpoint(L.Callback):
    """Save a resumable checkpoint when the process receives SIGTERM, then exit with status 143.

    The checkpoint is ``ModelCheckpoint``'s ``last.ckpt`` when it keeps one (``save_last``), otherwise
    ``<log_dir>/checkpoints/sigterm.ckpt``.
    """

    def __init__(self) -> None:
        self.saved_path: str | None = None
        self._saved_step: int | None = None

    def _save(self, trainer: L.Trainer) -> None:
        cb = trainer.checkpoint_callback
        if cb is not None and getattr(cb, "save_last", None) and cb.dirpath:
            # ModelCheckpoint's own "last" logic (file name, version counter, state), Lightning 2.6 API.
            cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
            path = cb.last_model_path
        else:
            path = str(Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints" / "sigterm.ckpt")
            trainer.save_checkpoint(path)
        self.saved_path, self._saved_step = path, trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.received_sigterm and self._saved_step != trainer.global_step:
            self._save(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        if self._saved_step != trainer.global_step and trainer.state.fn == "fit":
            self._save(trainer)
        exception.code = SIGTERM_EXIT_CODE
        if trainer.is_global_zero:
            where = f"saved {self.saved_path!r} at step {trainer.global_step}; resume with --ckpt_path last" \
                if self.saved_path else "nothing to save outside fit"
            sys.stderr.write(f"error: stopped by SIGTERM: {where}\n")
