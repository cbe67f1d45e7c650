"""Phase 1 language modelling (BK mixer + AR-SSM blocks, HTT embedding, LNS inference) as a LightningModule."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from callbacks.stability import StabilityMonitor
from lightning_modules.lm_evaluation import NextTokenEvaluation, next_token_loss, warn_if_gpu_sized
from lightning_modules.lm_predict import LMPrediction, check_lm_data
from lightning_modules.text_samples import log_text_sample
from models.layers.ar_ssm import curriculum_rank
from models.lm.phase1.config import Phase1Config
from models.lm.phase1.diagnostics import check_model_stability, gate_statistics, htt_compression_ratio, phase1_health
from models.lm.phase1.model import Phase1LM
from models.lm.phase1.presets import estimate_memory
from models.lm.phase1.stability import NumericalInstabilityError, VRAMExhaustedError
from models.lm.sampling import GenerationConfig


class Phase1LanguageModel(LMPrediction, NextTokenEvaluation, L.LightningModule):
    """Next-token prediction with :class:`models.lm.phase1.model.Phase1LM` on ``TextDataModule`` batches.

    The loss is cross-entropy plus the AR-SSM gate L1 penalty (``ar_ssm_l1_regularization``). Health signals
    for ``callbacks.stability.StabilityMonitor``: ``bk_bound_ratio`` (eta max|g|, inf once the bound breaks)
    and ``bk_transfer_log10_condition``. Without that callback a broken bound raises
    ``NumericalInstabilityError`` (with it, the callback rolls back and lowers the learning rate). On CUDA a
    configuration whose memory model exceeds the device even at micro-batch 1 raises ``VRAMExhaustedError``
    at fit start (``callbacks.oom_recovery.OOMRecovery`` handles ordinary batch-size overruns).

    Args:
        config: sizes and Phase 1 features (flat form).
        phase1: the guide's nested form (``enabled``, ``preset``, ``ar_ssm``, ``htt``, ``lns``, ``stability``,
            ``memory``, ``model``, ``bk``); applied on top of ``config``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: steps of linear learning-rate warm-up.
        sample_prompt: after each validation a continuation of this prompt goes to TensorBoard (``samples``).
        sample_tokens: length of that sample; 0 turns it off.
        prompts: ``predict`` continues each of these prompts on the carried state (streamed to the console,
            written to the run folder); default ``[sample_prompt]``.
        prompt_file: more prompts: a ``.txt`` file (one per line) or ``.jsonl`` (a ``prompt`` field per line).
        generation: ``predict``'s sampling options (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
            ``seed``).
    """

    EXTRA_METRICS = ("train/gate_l1", "phase1/*")

    def __init__(
        self,
        config: Phase1Config | None = None,
        phase1: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        sample_prompt: str = "def ",
        sample_tokens: int = 120,
        prompts: list[str] | None = None,
        prompt_file: str | None = None,
        generation: GenerationConfig | None = None,
    ) -> None:
        super().__init__()
        config = config or Phase1Config()
        if phase1 is not None:
            config = Phase1Config.from_nested(phase1, base=config)
        self.save_hyperparameters()
        if lr <= 0 or warmup_steps < 0 or sample_tokens < 0:
            raise ValueError(f"`lr` must be positive, `warmup_steps` and `sample_tokens` >= 0, "
                             f"got {lr}, {warmup_steps}, {sample_tokens}")
        self.config = config
        warn_if_gpu_sized(int(estimate_memory(config, batch_size=1)["weights"]) // 4, "this Phase 1 model")
        self.model = Phase1LM(config)
        self.init_evaluation()
        self.init_prediction(prompts, prompt_file, generation, sample_prompt)

    @classmethod
    def check_given_arguments(cls, given: dict[str, Any]) -> None:
        """A flat ``config`` key given beside a ``phase1`` group that sets it otherwise is refused even when the
        flat value is the default (``callbacks.protocols.GivenArguments``; ``__init__`` can only compare with
        the defaults)."""
        config, phase1 = given.get("config"), given.get("phase1")
        if isinstance(config, dict) and isinstance(phase1, dict):
            Phase1Config.from_nested(phase1, base=Phase1Config(**config), given=set(config))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def check_data(self, datamodule: L.LightningDataModule) -> None:
        """The data's tokenizer must fit ``vocab_size`` (``callbacks.protocols.DataCompatibility``)."""
        check_lm_data(datamodule, self.config.vocab_size, None, "vocab_size")

    # ------------------------------------------------------------------------------------------- fit
    def on_fit_start(self) -> None:
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
            need = estimate_memory(self.config, batch_size=1)["total_bytes"]
            if need > total:
                raise VRAMExhaustedError(
                    f"the Phase 1 memory model needs {need / 2**30:.1f} GiB at micro-batch 1, the device has "
                    f"{total / 2**30:.1f} GiB; choose a smaller phase1.preset or sizes")
        if self.logger is not None:
            metrics = {"params/total": sum(p.numel() for p in self.parameters()),
                       "phase1/htt_compression_ratio": htt_compression_ratio(self.model)}
            self.logger.log_hyperparams(self.hparams, metrics)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        cfg = self.config
        if cfg.ar_ssm_enabled and cfg.ar_ssm_curriculum_steps:
            self.model.set_active_rank(curriculum_rank(self.global_step, cfg.ar_ssm_curriculum_steps,
                                                       cfg.ar_ssm_min_rank, cfg.ar_ssm_max_rank))

    def _has_stability_monitor(self) -> bool:
        trainer = self._trainer
        return trainer is not None and any(isinstance(cb, StabilityMonitor) for cb in trainer.callbacks)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ce = next_token_loss(self.model(batch["input_ids"]), batch["labels"])
        aux = self.model.aux_loss
        if self.config.stability_monitoring_enabled and not self._has_stability_monitor():
            verdict = check_model_stability(self.model)
            if not verdict["is_stable"]:
                raise NumericalInstabilityError(
                    f"step {self.global_step}: {'; '.join(verdict['warnings'])}. Add "
                    "callbacks.stability.StabilityMonitor to trainer.callbacks to roll back and lower the LR")
        self.log_train_loss(ce)
        if self.config.ar_ssm_enabled:
            self.log("train/gate_l1", aux.detach())
            trainer = self._trainer
            every = trainer.log_every_n_steps if trainer is not None else 1
            if self.global_step % max(every, 1) == 0:
                for key, value in gate_statistics(self.model).items():
                    self.log(f"phase1/{key}", value)
        return ce + aux

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Under DDP each rank updated AR-SSM's running max gate from its own shard; the max over ranks is what
        one process would have recorded from the whole batch (``lerp(old, .)`` is increasing and ``old`` is
        the same on every rank), so replicas keep identical buffers and prune the same ranks in eval."""
        if self.trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            for layer in self.model.ar_ssm_layers():
                torch.distributed.all_reduce(layer.gate_running_max, op=torch.distributed.ReduceOp.MAX)

    def health_signals(self) -> dict[str, torch.Tensor]:
        """BK bound ratio and transfer-matrix conditioning of the last forward (see ``phase1_health``)."""
        return phase1_health(self.model) if self.config.stability_monitoring_enabled else {}

    # ------------------------------------------------------------------------------------ evaluation
    def on_validation_epoch_end(self) -> None:
        self.log_evaluation("val")
        if self.config.stability_monitoring_enabled and self.model.bk_mixers():
            verdict = check_model_stability(self.model)
            self.log("phase1/bk_bound_ratio", min(verdict["bound_ratio"], 1e6))
            self.log("phase1/bk_transfer_log10_condition", min(verdict["transfer_log10_condition"], 1e6))
        for key, value in gate_statistics(self.model).items():
            self.log(f"phase1/val_{key}", value)
        log_text_sample(self, self.hparams.sample_prompt, self.hparams.sample_tokens)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if not self.hparams.warmup_steps:
            return opt
        warmup = self.hparams.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
