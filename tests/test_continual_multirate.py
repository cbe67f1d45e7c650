"""MultiRateStepping: step counts per optimizer, accumulate vs discard, global_step, state."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks.multi_rate import MultiRateStepping


class TwoRate(L.LightningModule):
    """loss = c * (w_fast + w_slow) for a batch value c, so each gradient is exactly c (SGD lr 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.w_fast, self.w_slow = nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))
        self.slow_seen: list[float] = []

    def training_step(self, batch, batch_idx):
        (c,) = batch
        self.slow_seen.append(float(self.w_slow.detach()))
        loss = (c * (self.w_fast + self.w_slow)).sum()
        self.manual_backward(loss)
        return loss

    def configure_optimizers(self):
        return [torch.optim.SGD([self.w_fast], lr=1.0), torch.optim.SGD([self.w_slow], lr=1.0)]


def _fit(callback: MultiRateStepping, tmp_path) -> TwoRate:
    data = DataLoader(TensorDataset(torch.arange(1.0, 11.0)), batch_size=1, shuffle=False)
    module = TwoRate()
    trainer = L.Trainer(max_epochs=1, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    module.trainer_global_step = trainer.global_step
    return module


@pytest.mark.parametrize("interval", [0, 1])
def test_interval_one_steps_slow_every_batch(interval, tmp_path):
    cb = MultiRateStepping(slow_update_interval=interval)
    m = _fit(cb, tmp_path)
    assert cb.fast_steps == 10 and cb.slow_steps == 10 and m.trainer_global_step == 10
    assert float(m.w_fast) == float(m.w_slow) == -55.0


def test_interval_three_accumulates_the_window_sum(tmp_path):
    cb = MultiRateStepping(slow_update_interval=3, slow_grad_mode="accumulate")
    m = _fit(cb, tmp_path)
    assert cb.fast_steps == 10 and cb.slow_steps == 3 and m.trainer_global_step == 10
    assert float(m.w_fast) == -55.0
    assert float(m.w_slow) == -(1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9)  # batch 10 is in an unfinished window
    # between updates the slow parameter does not move
    assert m.slow_seen == [0, 0, 0, -6, -6, -6, -21, -21, -21, -45]


def test_interval_three_discard_keeps_only_the_last_gradient(tmp_path):
    cb = MultiRateStepping(slow_update_interval=3, slow_grad_mode="discard")
    m = _fit(cb, tmp_path)
    assert cb.slow_steps == 3 and float(m.w_slow) == -(3 + 6 + 9)
    assert m.slow_seen == [0, 0, 0, -3, -3, -3, -9, -9, -9, -18]


def test_interval_read_from_module_and_state_round_trip(tmp_path):
    module_interval = TwoRate()
    module_interval.slow_update_interval = 5
    cb = MultiRateStepping()
    assert cb.interval(module_interval) == 5
    cb.fast_steps, cb.slow_steps, cb.window = 7, 2, 1
    other = MultiRateStepping()
    other.load_state_dict(cb.state_dict())
    assert (other.fast_steps, other.slow_steps, other.window) == (7, 2, 1)


def test_bad_options_and_automatic_optimization(tmp_path):
    with pytest.raises(ValueError, match="slow_grad_mode"):
        MultiRateStepping(slow_grad_mode="sum")
    with pytest.raises(ValueError, match="slow_update_interval"):
        MultiRateStepping(slow_update_interval=-1)
    auto = TwoRate()
    auto.automatic_optimization = True
    trainer = L.Trainer(max_epochs=1, callbacks=[MultiRateStepping()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="manual optimization"):
        trainer.fit(auto, DataLoader(TensorDataset(torch.ones(2)), batch_size=1))


def test_resume_keeps_the_gradients_of_an_open_slow_window(tmp_path):
    """Interval 3, 4 batches per epoch: the first epoch leaves batch 4 in an open window. Resumed from the
    checkpoint, epoch 2 closes that window after its second batch with the sum 4 + 1 + 2, as one run does."""
    data = DataLoader(TensorDataset(torch.arange(1.0, 11.0)), batch_size=1, shuffle=False)
    kw = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_train_batches=4,
              default_root_dir=tmp_path)

    def fit(max_epochs, ckpt_path=None, save=None):
        cb = MultiRateStepping(slow_update_interval=3)
        module = TwoRate()
        trainer = L.Trainer(max_epochs=max_epochs, callbacks=[cb], enable_checkpointing=False, **kw)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        if save:
            trainer.save_checkpoint(save)
        return module, cb

    straight, cb_straight = fit(2)
    first, _ = fit(1, save=tmp_path / "mid.ckpt")
    assert float(first.w_slow) == -6.0 and float(first.w_slow.grad) == 4.0  # window open with batch 4
    assert torch.load(tmp_path / "mid.ckpt", weights_only=False)["multi_rate_slow_grads"] == [[torch.tensor(4.0)]]
    resumed, cb_resumed = fit(2, ckpt_path=tmp_path / "mid.ckpt")
    assert float(straight.w_slow) == float(resumed.w_slow) == -(6 + 4 + 1 + 2)
    assert cb_resumed.slow_steps == cb_straight.slow_steps == 2 and cb_resumed.window == cb_straight.window == 2
