"""2-process DDP (gloo, CPU) run with OOMRecovery and StabilityMonitor; each rank saves its final state.

Faults are rank-local: a fake OOM on rank 1 only (its micro-batch shrinks, rank 0's does not) and a finite
loss spike on rank 0 only (the shared decision must roll back both ranks). Usage: ``python this.py OUT_DIR``.
"""

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.oom_recovery import OOMRecovery  # noqa: E402
from callbacks.stability import StabilityMonitor  # noqa: E402
from tests.recovery_helpers import Regressor  # noqa: E402


class RankLocalFaults(Regressor):
    def training_step(self, batch, batch_idx):
        step = self.trainer.current_epoch * self.trainer.num_training_batches + batch_idx
        self.oom_forward = {3: 4} if self.global_rank == 1 else {}
        if self.global_rank == 0 and step == 9:
            self.loss_spikes = {9}
        return super().training_step(batch, batch_idx)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    L.seed_everything(0)
    oom, mon = OOMRecovery(), StabilityMonitor(min_history=3, snapshot_every=2, check_grad_spikes=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=8, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[oom, mon])
    model = RankLocalFaults()
    trainer.fit(model)
    torch.save({"weights": {n: p.detach() for n, p in model.named_parameters()}, "oom": oom.state_dict(),
                "stability": mon.state_dict(), "global_step": trainer.global_step},
               out / f"rank{trainer.global_rank}.pt")
