"""2-process DDP (gloo, CPU) fit with ``SigtermCheckpoint`` and rank-local SIGTERMs, for tests/test_sigterm_ddp.py.

Usage: ``python this.py OUT_DIR [RANK:STEP:WHERE ...]``: rank RANK sends itself SIGTERM when ``global_step`` is
STEP at WHERE: ``start`` (the module's ``on_train_batch_start``), ``step`` (inside ``training_step``, after the
forward) or ``end`` (the module's ``on_train_batch_end``, after the optimizer step, so ``global_step`` has already
counted that batch, and after the callbacks' ``on_train_batch_end``). A ``last.ckpt`` already in ``OUT_DIR/ckpt`` is
resumed. Each rank writes ``OUT_DIR/rank<r>.pt``: the step training started from, the step and weights where it
stopped, and how (``exit``: the status fit ended with); rank 0, the launcher of rank 1, also waits for rank 1
and records its exit status. A hang fails in the collectives after ``TIMEOUT`` seconds instead.
"""

import os
import signal
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.model_checkpoint import ResumableModelCheckpoint  # noqa: E402
from callbacks.signals import SigtermCheckpoint  # noqa: E402
from tests.recovery_helpers import IdDataset, Regressor  # noqa: E402

MAX_STEPS, TIMEOUT = 14, 120  # collective timeout (s): room for a slow start of rank 1 on a busy runner


class Model(Regressor):
    def __init__(self, plan) -> None:
        super().__init__()
        self.plan = plan
        self.batches: list[tuple] = []  # (global_step, epoch, batch_idx, sample ids) of each batch this run

    def _maybe_sigterm(self, where: str) -> None:
        if self.plan.get((self.global_rank, self.trainer.global_step)) == where:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_start(self, batch, batch_idx):
        self.batches.append((self.trainer.global_step, self.current_epoch, batch_idx, batch[2].tolist()))
        self._maybe_sigterm("start")

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self._maybe_sigterm("step")
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self._maybe_sigterm("end")

    def on_train_start(self):
        self.start_step = self.trainer.global_step

    def on_train_epoch_end(self):
        pass

    def train_dataloader(self):
        return DataLoader(IdDataset(48), batch_size=4, shuffle=False)  # 6 batches per rank and epoch


def main(out: Path, plan: dict) -> None:
    L.seed_everything(0)
    ckpt_dir = out / "ckpt"
    resume = ckpt_dir / "last.ckpt"
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(timeout=timedelta(seconds=TIMEOUT)), max_steps=MAX_STEPS,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[SigtermCheckpoint(),
                   ResumableModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=100)])
    model = Model(plan)
    record = {"exit": 0}
    try:
        trainer.fit(model, ckpt_path=str(resume) if resume.is_file() else None)
    except SystemExit as e:
        record["exit"] = e.code
        raise
    except BaseException as e:
        record["exit"] = repr(e)
        raise
    finally:
        record.update(start_step=getattr(model, "start_step", None), step=trainer.global_step, batches=model.batches,
                      weights={n: p.detach().clone() for n, p in model.named_parameters()})
        if trainer.global_rank == 0:
            record["children"] = []
            for proc in getattr(trainer.strategy.launcher, "procs", []):
                try:
                    record["children"].append(proc.wait(timeout=3 * TIMEOUT))
                except Exception as e:  # noqa: BLE001
                    proc.kill()
                    record["children"].append(repr(e))
        torch.save(record, out / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    plan = {}
    for spec in sys.argv[2:]:
        rank, step, where = spec.split(":")
        plan[(int(rank), int(step))] = where
    main(Path(sys.argv[1]), plan)
