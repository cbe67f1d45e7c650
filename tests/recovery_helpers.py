"""Test-local modules for the recovery callbacks: a linear regressor (automatic and manual optimization)
that can fake out-of-memory errors and NaNs at chosen steps, and records the sample ids it trained on."""

from __future__ import annotations

import os
import signal

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.aggregation import CatMetric, MeanMetric

N_SAMPLES, N_FEATURES = 30, 4


class IdDataset(Dataset):
    """``(x, y, index)`` for a fixed random linear problem."""

    def __init__(self, n: int = N_SAMPLES) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, N_FEATURES, generator=g)
        self.y = self.x @ torch.randn(N_FEATURES, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class _OOMInBackward(torch.autograd.Function):
    """Identity whose backward raises a (fake) CUDA out-of-memory error."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        raise torch.OutOfMemoryError("CUDA out of memory (fake, in backward)")


class _NaNGrad(torch.autograd.Function):
    """A zero scalar whose gradient is NaN: a finite loss with a diverged gradient."""

    @staticmethod
    def forward(ctx, w):
        ctx.shape = w.shape
        return w.new_zeros(())

    @staticmethod
    def backward(ctx, g):
        return torch.full(ctx.shape, float("nan"))


class Regressor(L.LightningModule):
    """Linear regression with fault injection.

    Args:
        oom_forward / oom_backward: ``{global_step: largest micro-batch that fits}``; bigger ones raise an
            out-of-memory error in the forward / the backward at that step.
        nan_loss_steps / nan_grad_steps: steps whose loss / a gradient becomes NaN (once per step).
        signal_faults: ``{step: factor}`` multiplying the ``bound`` health signal; loss_spikes: steps whose
            loss is multiplied by 1000.
        manual: manual optimization: ``training_step`` only calls ``manual_backward``; ``ManualStepper``
            steps the optimizer at ``on_train_batch_end`` (the multi-rate stepping contract).
    """

    def __init__(self, oom_forward=None, oom_backward=None, nan_loss_steps=(), nan_grad_steps=(),
                 manual=False, lr=0.1, cpu_oom_message=False, signal_faults=None, loss_spikes=()) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Linear(N_FEATURES, 1)
        self.oom_forward, self.oom_backward = dict(oom_forward or {}), dict(oom_backward or {})
        self.nan_loss_steps, self.nan_grad_steps = set(nan_loss_steps), set(nan_grad_steps)
        self.automatic_optimization = not manual
        self.lr, self.cpu_oom_message = lr, cpu_oom_message
        self.signal_faults, self.loss_spikes = dict(signal_faults or {}), set(loss_spikes)
        self._step = 0
        self.seen = CatMetric()
        self.epoch_ids: list[list[int]] = []
        self.micro_sizes: list[int] = []
        self.epoch_losses: list[float] = []
        self.loss_mean = MeanMetric(nan_strategy="ignore")  # sample-weighted; restored on OOM retries

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        step = self.trainer.current_epoch * self.trainer.num_training_batches + batch_idx  # = global_step
        if x.shape[0] > self.oom_forward.get(step, 10**9):
            if self.cpu_oom_message:
                raise RuntimeError(
                    "[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"
                )
            raise torch.OutOfMemoryError("CUDA out of memory (fake, in forward)")
        h = _OOMInBackward.apply(x) if x.shape[0] > self.oom_backward.get(step, 10**9) else x
        self._step = step
        self.seen.update(idx.float())
        self.micro_sizes.append(x.shape[0])
        loss = F.mse_loss(self.net(h), y)
        if step in self.nan_loss_steps:
            self.nan_loss_steps.discard(step)
            loss = loss * float("nan")
        if step in self.loss_spikes:
            self.loss_spikes.discard(step)
            loss = loss * 1000.0
        if step in self.nan_grad_steps:
            self.nan_grad_steps.discard(step)
            loss = loss + _NaNGrad.apply(self.net.weight)
        if not self.automatic_optimization:
            self.manual_backward(loss)
        self.loss_mean.update(loss.detach(), weight=x.shape[0])
        return loss

    def health_signals(self) -> dict[str, torch.Tensor]:
        """A stand-in for a model's own bound: the weight norm, times a fault factor at chosen steps."""
        return {"bound": self.net.weight.detach().norm() * self.signal_faults.pop(self._step, 1.0)}

    def on_train_epoch_end(self):
        self.epoch_ids.append(sorted(int(i) for i in self.seen.compute().tolist()))
        self.seen.reset()
        self.epoch_losses.append(float(self.loss_mean.compute()))
        self.loss_mean.reset()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(IdDataset(), batch_size=8, shuffle=False)


class ManualStepper(L.Callback):
    """Steps and zeroes every optimizer at ``on_train_batch_end`` (as the continual family's stepping does)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opts = pl_module.optimizers()
        for opt in opts if isinstance(opts, list) else [opts]:
            opt.step()
            opt.zero_grad()
        self.steps += 1


def trainer(tmp_path, callbacks=(), max_epochs=2, **kw) -> L.Trainer:
    kw.setdefault("logger", L.pytorch.loggers.CSVLogger(tmp_path, name="log"))
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("log_every_n_steps", 1)
    return L.Trainer(default_root_dir=tmp_path, max_epochs=max_epochs, callbacks=list(callbacks),
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1, **kw)


class FaultInjector(L.Callback):
    """Kills the process (``os._exit``, no cleanup) after ``kill_at_step`` optimizer steps, before that
    step's checkpoint, or sends it SIGTERM when step ``sigterm_at_step`` starts; at the end of fit saves the
    trainable weights and the recovery callbacks' states."""

    def __init__(self, kill_at_step: int | None = None, save_final_to: str = "final.pt",
                 sigterm_at_step: int | None = None) -> None:
        self.kill_at_step, self.save_final_to = kill_at_step, save_final_to
        self.sigterm_at_step = sigterm_at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # SIGTERM as a scheduler sends it: while a step runs (here: as it starts), not between steps.
        if self.sigterm_at_step is not None and trainer.global_step == self.sigterm_at_step:
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.kill_at_step:
            os._exit(17)

    def on_train_end(self, trainer, pl_module):
        states = {type(cb).__name__: cb.state_dict() for cb in trainer.callbacks if cb.state_dict()}
        weights = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        torch.save({"weights": weights, "callbacks": states, "global_step": trainer.global_step}, self.save_final_to)


class Killed(BaseException):
    """Stands for SIGKILL: not an ``Exception``, so no clean-up of the project runs."""


class Interrupt(L.Callback):
    """SIGTERM to this process as step ``sigterm_at_step`` starts (it runs to its end), or a kill as step
    ``kill_at_step`` starts (before it; the checkpoints of the steps before it are written)."""

    def __init__(self, sigterm_at_step: int | None = None, kill_at_step: int | None = None) -> None:
        self.sigterm_at_step, self.kill_at_step = sigterm_at_step, kill_at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.kill_at_step:
            raise Killed
        if trainer.global_step == self.sigterm_at_step:
            os.kill(os.getpid(), signal.SIGTERM)
