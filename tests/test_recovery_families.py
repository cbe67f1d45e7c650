"""Recovery callbacks on a real family: Nested LoRA continual learning (manual optimization, multi-rate
stepping, task boundaries) with an out-of-memory error injected mid-sequence, against a clean run."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from callbacks.oom_recovery import OOMRecovery
from tests.continual_helpers import QUIET, REPO, TINY_DATA, TINY_MODEL, run_cli


class OOMAboveBatch(L.Callback):
    """Raises a fake CUDA OOM in the model's forward whenever a batch larger than ``limit`` arrives at one of
    ``at_steps`` (so the full batch fails and the halved micro-batches fit), like a real memory ceiling."""

    def __init__(self, limit: int = 8, at_steps: tuple[int, ...] = (3,)) -> None:
        self.limit, self.at_steps, self.raised = limit, at_steps, 0

    def on_fit_start(self, trainer, pl_module):
        def hook(module, args):
            if trainer.global_step in self.at_steps and args[0].shape[0] > self.limit:
                self.raised += 1
                raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        pl_module.model.register_forward_pre_hook(hook)


def _run(tmp, *extra):
    app = run_cli(["fit", "--config", str(REPO / "configs/sema_nested.yaml"), *TINY_MODEL, *TINY_DATA, *QUIET,
                   "--model.slow_update_interval", "3", "--trainer.limit_train_batches", "4",
                   "--data.glyph_images_per_class", "60",  # 4 full batches of 16 per task
                   "--trainer.logger.init_args.save_dir", str(tmp), *extra])
    cbs = {type(cb).__name__: cb for cb in app.trainer.callbacks}
    weights = {n: p.detach().clone() for n, p in app.model.named_parameters() if p.requires_grad}
    return app, cbs, weights


def test_oom_recovery_in_nested_lora_sequence_keeps_steps_and_weights(in_tmp):
    clean, clean_cbs, clean_w = _run(in_tmp / "clean")
    rec, rec_cbs, rec_w = _run(in_tmp / "recovered", "--trainer.callbacks+=OOMRecovery",
                               "--trainer.callbacks+=tests.test_recovery_families.OOMAboveBatch")
    assert rec_cbs["OOMAboveBatch"].raised == 1
    recoveries = rec_cbs["OOMRecovery"].recoveries
    assert len(recoveries) == 1 and recoveries[0]["new_micro_batch"] == 8
    # the multi-rate stepping counted batches, not micro-batches
    for key in ("fast_steps", "slow_steps"):
        assert getattr(rec_cbs["MultiRateStepping"], key) == getattr(clean_cbs["MultiRateStepping"], key)
    assert rec.trainer.global_step == clean.trainer.global_step == 20
    assert rec_w.keys() == clean_w.keys()
    for name in clean_w:  # same data, same effective batch: equal up to float summation order
        torch.testing.assert_close(rec_w[name], clean_w[name], rtol=1e-4, atol=1e-5, msg=name)


def test_oom_recovery_refuses_sharded_strategies():
    trainer = SimpleNamespace(strategy=FSDPStrategy())
    with pytest.raises(ValueError, match="OOMRecovery does not support FSDPStrategy"):
        OOMRecovery().setup(trainer, L.LightningModule(), "fit")
