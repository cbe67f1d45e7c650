"""Next-token loss and perplexity, shared by the language-model families (GPT, Phase 1, Phase 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics import MeanMetric


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over every (B, T) position, computed in float32 whatever the logits' dtype."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


#: Above this many parameters a model is GPU-sized: on a CPU it builds for minutes and trains for hours.
CPU_PARAMETER_WARNING = 50_000_000


def warn_if_gpu_sized(parameters: int, what: str) -> None:
    """Say up front (before the minutes of building) that a model this large is meant for a GPU, when none is
    present."""
    if parameters > CPU_PARAMETER_WARNING and not torch.cuda.is_available():
        rank_zero_warn(f"{what} has about {parameters / 1e6:.0f}M parameters, a GPU-sized preset, and this machine "
                       "has no GPU: building it takes minutes and training hours on the CPU; for a CPU run choose "
                       "a small config (configs/phase1_lm.yaml, configs/phase2_small.yaml) or smaller sizes")


class NextTokenEvaluation:
    """Mixin (listed before ``L.LightningModule``): ``validation_step`` / ``test_step`` and their logging.

    The module's ``forward(input_ids)`` returns logits. Losses are averaged over tokens across the whole split
    (a ``MeanMetric`` weighted by token count, synced across ranks), then logged as ``{stage}/loss`` and
    ``{stage}/perplexity``; call :meth:`init_evaluation` in ``__init__`` and :meth:`log_evaluation` from
    ``on_validation_epoch_end`` (which each family extends with its own diagnostics).
    """

    #: metrics the family logs besides the ones below (``LoggedMetrics``)
    EXTRA_METRICS: tuple[str, ...] = ()

    def logged_metrics(self) -> list[str]:
        """Every name this module logs (``checkpoint.monitor`` is checked against it before training)."""
        return [f"{stage}/{name}" for stage in ("train", "val", "test") for name in ("loss", "perplexity")] + \
            list(self.EXTRA_METRICS)

    def init_evaluation(self) -> None:
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()

    def log_train_loss(self, loss: torch.Tensor) -> None:
        """``train/loss`` (progress bar) and ``train/perplexity`` of a training step."""
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/perplexity", loss.detach().exp())

    def _update(self, metric: MeanMetric, batch: dict[str, torch.Tensor]) -> None:
        metric.update(next_token_loss(self(batch["input_ids"]), batch["labels"]), batch["labels"].numel())

    def log_evaluation(self, stage: str) -> None:
        """Log and reset the split's token-weighted mean loss."""
        metric = self.val_loss if stage == "val" else self.test_loss
        loss = metric.compute()
        metric.reset()
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}/perplexity", loss.exp())

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._update(self.val_loss, batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._update(self.test_loss, batch)

    def on_test_epoch_end(self) -> None:
        self.log_evaluation("test")
