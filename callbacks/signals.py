"""SIGTERM (what cluster schedulers send before they kill a job): save a resumable checkpoint, exit non-zero.

Lightning notices SIGTERM and stops at the end of the current training batch by raising ``SIGTERMException``
(a ``SystemExit`` with status 0), losing every step since the last checkpoint. ``SigtermCheckpoint`` (one of
``cli.py``'s default callbacks) saves ``last.ckpt`` at that batch end, the point where ``ModelCheckpoint``'s own
mid-epoch checkpoints are taken, so ``--ckpt_path last`` resumes exactly; then the process exits with status
143 (128 + SIGTERM), so a scheduler sees an interrupted job, not a finished one. A SIGTERM during an epoch's
last training batch first lets that epoch finish (its validation and ``on_train_epoch_end`` hooks: Lightning would
resume a checkpoint of that batch with them skipped) and ``last.ckpt`` is saved at the epoch end, by
``callbacks.model_checkpoint.ResumableModelCheckpoint``; leave the scheduler a grace period longer than one
validation.
A SIGTERM during validation saves at the exception instead (resumable; Lightning reruns that validation).

Several processes (DDP): Lightning 2.6.6 does not coordinate SIGTERM safely. Its signal handler forwards the
signal to the processes it launched and then calls ``torch.distributed.broadcast`` inside the handler, i.e. at
whatever point of the step the signal lands; each step begins with a broadcast of rank 0's flag only, and the
check that stops the loop at the batch end reads the local flag. So a SIGTERM that only rank 1 receives, or
one that arrives after a step's first broadcast, puts the ranks' collectives out of step: the save (itself a
collective: barriers and broadcasts) or the next gradient all-reduce hangs until the process-group timeout
(30 minutes by default). Measured with ``tests/ddp_sigterm_script.py`` (2 ranks, gloo): without this callback,
SIGTERM to rank 1 alone hangs, and SIGTERM to rank 0 after its optimizer step ends both ranks with status 0 and
no checkpoint; with the single-process version of this callback, both of these hang, and so does the first run
of ``tests/test_sigterm_ddp.py``.

With more than one process this callback therefore replaces Lightning's SIGTERM handler, from the sanity check
or the start of training on, with one that only notes the signal; at every training batch end the ranks agree
on "has any rank received SIGTERM" (one one-element all-reduce per batch), and when one has, every rank sets
Lightning's flag at that same batch end: all save the same ``last.ckpt`` together there and all exit with 143,
whichever ranks (the launching rank 0 alone, rank 1 alone, all of them, at different points of a step) got the
signal. A SIGTERM during validation is then acted on at the next training batch end; one after the last
training batch lets the run finish normally (status 0, nothing is lost). One that arrives in the short stretch
between Lightning installing its handler and the sanity check (or, without one, the start of training) still
meets Lightning's handler.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.model_checkpoint import ResumableModelCheckpoint, on_last_batch

#: Exit status of a run stopped by SIGTERM (the shell's 128 + signal number).
SIGTERM_EXIT_CODE = 143


def saves_at_epoch_end(cb: object) -> bool:
    """``cb`` saves ``last.ckpt`` at the end of an epoch whose last batch received SIGTERM."""
    return isinstance(cb, ResumableModelCheckpoint) and bool(cb.save_last) and bool(cb.dirpath)


class SigtermCheckpoint(L.Callback):
    """Save a resumable checkpoint when the process receives SIGTERM, then exit with status 143.

    The checkpoint is ``ModelCheckpoint``'s ``last.ckpt`` when it keeps one (``save_last``), otherwise
    ``<log_dir>/checkpoints/sigterm.ckpt``. Under DDP all ranks stop and save at the same training batch end
    when any of them receives SIGTERM (see the module docstring).
    """

    def __init__(self) -> None:
        self.saved_path: str | None = None
        self._saved_step: int | None = None
        self._received = False  # this process got SIGTERM (multi-process runs only; not yet acted on)
        self._held = False  # SIGTERM on an epoch's last batch: acted on at that epoch's end

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

    # -- several processes: note the signal in the handler, agree on it at batch ends -----------------------------

    def _note_sigterm(self, signum, frame) -> None:
        self._received = True  # no collective, no I/O: a signal handler runs at an arbitrary point of the step

    def _take_over_sigterm(self, trainer: L.Trainer) -> None:
        # Lightning registers its handler just before the sanity check and restores the original one at teardown.
        if trainer.world_size > 1 and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._note_sigterm)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a reused callback starts afresh
        self.saved_path, self._saved_step, self._received, self._held = None, None, False, False
        if trainer.world_size > 1 and not hasattr(getattr(trainer, "_signal_connector", None), "received_sigterm"):
            # checked now, not when a signal arrives: the flag below is Lightning 2.4-2.6's (private) attribute
            raise RuntimeError("SigtermCheckpoint needs trainer._signal_connector.received_sigterm (Lightning "
                               f"2.4-2.6); this Lightning {L.__version__} has none: remove the callback or pin "
                               "lightning")

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_over_sigterm(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._take_over_sigterm(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.world_size > 1 and trainer.strategy.reduce_boolean_decision(
                self._received or trainer.received_sigterm, all=False):  # (Lightning's own flag: a SIGTERM before
            # the take-over.) Every rank reaches this line at the same batch: all set Lightning's flag here, so all
            # save below and Lightning raises SIGTERMException on all of them at the end of this batch.
            trainer._signal_connector.received_sigterm = True
        if trainer.received_sigterm and on_last_batch(trainer) and trainer.state.fn == "fit" and saves_at_epoch_end(
                trainer.checkpoint_callback):
            # Lightning resumes a checkpoint of an epoch's last batch as if the epoch had ended (its validation and
            # epoch-end hooks skipped; see callbacks/model_checkpoint.py): finish the epoch first. Lightning's flag
            # is held back meanwhile (its validation loop would stop at its first batch) and set again at the
            # epoch end, where ModelCheckpoint then saves last.ckpt; Lightning stops after the epoch end. (Lightning's
            # own ModelCheckpoint would not save there: then the checkpoint is saved now, as on other batches.)
            trainer._signal_connector.received_sigterm, self._held = False, True
        elif trainer.received_sigterm and self._saved_step != trainer.global_step:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._held:
            trainer._signal_connector.received_sigterm, self._held = True, False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        cb = trainer.checkpoint_callback
        if self._saved_step == trainer.global_step or trainer.state.fn != "fit":
            pass
        elif getattr(cb, "save_last", None) and getattr(cb, "_last_global_step_saved", None) == trainer.global_step:
            # ModelCheckpoint saved last.ckpt at this step (the epoch end after a SIGTERM on its last batch):
            # Lightning's own epoch-end state, which it resumes exactly; a save now would hold the epoch as finished
            self.saved_path, self._saved_step = cb.last_model_path, trainer.global_step
        else:
            self._save(trainer)
        exception.code = SIGTERM_EXIT_CODE
        if trainer.is_global_zero:
            where = f"saved {self.saved_path!r} at step {trainer.global_step}; resume with --ckpt_path last" \
                if self.saved_path else "nothing to save outside fit"
            sys.stderr.write(f"error: stopped by SIGTERM: {where}\n")
