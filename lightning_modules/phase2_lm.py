"""Phase 2 language modelling: :class:`models.lm.phase2.Phase2LM` trained with the issue-11 recipe.

AdamW (weight decay on matrices and embeddings only), cosine annealing from ``lr`` to ``min_lr`` over the run's
total optimizer steps (``trainer.estimated_stepping_batches``) after an optional linear warm-up; gradient
clipping is the Trainer's ``gradient_clip_val`` (1.0 in ``configs/phase2_*.yaml``). Every batch starts from an
empty memory; documents inside a window are separated by the NUL byte and reset the memory there.
"""

from __future__ import annotations

import math

import lightning as L
import torch

from lightning_modules.lm_evaluation import NextTokenEvaluation, next_token_loss, warn_if_gpu_sized
from lightning_modules.lm_predict import LMPrediction, check_lm_data
from lightning_modules.text_samples import log_text_sample
from models.lm.phase2 import Phase2Config, Phase2LM
from models.lm.sampling import GenerationConfig


class Phase2LanguageModel(LMPrediction, NextTokenEvaluation, L.LightningModule):
    """Next-byte prediction with the Phase 2 model on batches from :class:`datamodules.text.TextDataModule`.

    Logs ``train/loss`` and ``train/perplexity`` per step, ``val/loss`` and ``val/perplexity`` per validation;
    the memory diagnostics, history file and epoch checkpoints come from
    :class:`callbacks.phase2_diagnostics.Phase2Diagnostics`. ``health_signals`` feeds ``StabilityMonitor``.

    Args:
        config: architecture and memory options (``base_decay``, ``hebbian_eta``, ``snr_threshold``, sizes...).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay of weight matrices and embeddings (not of biases and norms).
        min_lr: learning rate at the end of the cosine annealing.
        warmup_steps: steps of linear warm-up before the cosine annealing.
        sample_prompt: after each validation, a text sample continuing this prompt goes to TensorBoard
            (``samples``, top-k 20 at temperature 0.8, generated on the carried state).
        sample_tokens: length of that sample; 0 turns it off.
        prompts: ``predict`` continues each of these prompts on the carried state (streamed to the console,
            written to the run folder); default ``[sample_prompt]``.
        prompt_file: more prompts: a ``.txt`` file (one per line) or ``.jsonl`` (a ``prompt`` field per line).
        generation: ``predict``'s sampling options (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
            ``seed``).
    """

    def __init__(
        self,
        config: Phase2Config | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        min_lr: float = 1e-6,
        warmup_steps: int = 0,
        sample_prompt: str = "def ",
        sample_tokens: int = 64,
        prompts: list[str] | None = None,
        prompt_file: str | None = None,
        generation: GenerationConfig | None = None,
    ) -> None:
        super().__init__()
        config = config or Phase2Config()
        self.save_hyperparameters()
        if lr <= 0 or not 0 <= min_lr <= lr:
            raise ValueError(f"`lr` must be positive and `min_lr` in [0, lr], got lr={lr}, min_lr={min_lr}")
        if weight_decay < 0 or warmup_steps < 0 or sample_tokens < 0:
            raise ValueError(f"`weight_decay`, `warmup_steps` and `sample_tokens` must be >= 0, got {weight_decay}, "
                             f"{warmup_steps}, {sample_tokens}")
        warn_if_gpu_sized(12 * config.n_layers * config.d_model**2 + config.vocab_size * config.d_model,
                          "this Phase 2 model")
        self.model = Phase2LM(config)
        self.init_evaluation()
        self.init_prediction(prompts, prompt_file, generation, sample_prompt)

    def check_data(self, datamodule: L.LightningDataModule) -> None:
        """The data's tokenizer must fit ``vocab_size`` (``callbacks.protocols.DataCompatibility``)."""
        check_lm_data(datamodule, self.model.config.vocab_size, None, "vocab_size")

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Memory diagnostics of the last forward (see :meth:`Phase2LM.diagnostics`)."""
        return self.model.diagnostics()

    def health_signals(self) -> dict[str, torch.Tensor]:
        """Gamma range and memory energy against its Lyapunov bound (see :meth:`Phase2LM.health_signals`)."""
        return self.model.health_signals()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = next_token_loss(self.model(batch["input_ids"]), batch["labels"])
        self.log_train_loss(loss)
        return loss

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation("val")
        log_text_sample(self, self.hparams.sample_prompt, self.hparams.sample_tokens)

    def lr_factor(self, step: int, total_steps: int) -> float:
        """Multiplier of ``lr`` at optimizer step ``step``: linear warm-up, then cosine from 1 to min_lr / lr."""
        hp = self.hparams
        if step < hp.warmup_steps:
            return (step + 1) / hp.warmup_steps
        span = max(1, total_steps - hp.warmup_steps)
        progress = min(1.0, (step - hp.warmup_steps) / span)
        floor = hp.min_lr / hp.lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def check_trainer(self, trainer: L.Trainer, datamodule: L.LightningDataModule | None = None) -> None:
        """The cosine schedule needs a length: ``max_epochs: -1`` (no limit) needs ``max_steps``."""
        if trainer.max_epochs == -1 and trainer.max_steps == -1:
            raise ValueError("trainer.max_epochs=-1 (no limit) leaves Phase 2's cosine learning-rate schedule "
                             "without a length: set trainer.max_steps or a number of epochs")

    def configure_optimizers(self):
        hp = self.hparams
        decay = [p for p in self.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.requires_grad and p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": hp.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr)
        total = int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: self.lr_factor(step, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
