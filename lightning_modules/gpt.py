"""GPT language modelling: pre-training, LoRA and Skip2-LoRA fine-tuning (with Skip-Cache) in one module."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch

from lightning_modules.lm_evaluation import NextTokenEvaluation, next_token_loss
from lightning_modules.lm_predict import LMPrediction, check_lm_data
from lightning_modules.text_samples import log_text_sample
from models.adapters.lora import count_parameters
from models.cache.skip_cache import CacheDtype, SkipCache, Storage, check_cacheable, weights_fingerprint
from models.lm.gpt import GPT, Config, load_backbone_state, load_pretrained
from models.lm.interop import read_folder, with_architecture
from models.lm.sampling import GenerationConfig

PRETRAIN_COMMAND = "python -m cli fit --config configs/gpt_pretrain.yaml"


class GPTLanguageModel(LMPrediction, NextTokenEvaluation, L.LightningModule):
    """Next-token prediction with :class:`models.lm.gpt.GPT` on batches from :class:`TextDataModule`.

    Without adapters in ``config`` every weight trains (pre-training); with ``lora_*`` flags or
    ``skip2lora_enabled`` only the adapters train (plus ``lm_head`` when ``train_head``).

    Args:
        config: architecture, LoRA and Skip2-LoRA options.
        pretrained_path: a state dict, our own ``last.ckpt`` (e.g. from ``configs/gpt_pretrain.yaml``), or a
            Hugging Face GPT-2 / LitGPT checkpoint folder (its architecture replaces ``config``'s; the adapter
            options of ``config`` stay).
        train_head: also train ``lm_head`` (downstream of the cache point, so Skip-Cache still works).
        skip_cache: cache each training sample's frozen features in epoch 1 and skip the backbone
            afterwards; refused (at init) when anything upstream of the cache point trains.
        cache_dir: folder of the disk cache (``None``: a temporary folder).
        cache_dtype: dtype of cached features (``float32`` exact; ``bfloat16``/``float16`` halve memory).
        cache_max_memory_mb: memory budget of the cache; over it the cache goes to disk (or errors).
        cache_storage: ``auto`` (memory within budget, else disk), ``memory`` or ``disk``.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: steps of linear learning-rate warm-up.
        sample_prompt: after each validation, a text sample continuing this prompt goes to TensorBoard
            (``samples``, top-k 20 at temperature 0.8); also ``predict``'s prompt when no other is given.
        sample_tokens: length of that sample; 0 turns it off.
        prompts: ``predict`` continues each of these prompts (streamed to the console, written to the run folder).
        prompt_file: more prompts: a ``.txt`` file (one per line) or ``.jsonl`` (a ``prompt`` field per line).
        generation: ``predict``'s sampling options (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
            ``seed``).
    """

    EXTRA_METRICS = ("time/train_epoch_s", "skip_cache/hit_rate", "skip_cache/filled")

    def __init__(
        self,
        config: Config | None = None,
        pretrained_path: str | None = None,
        train_head: bool = False,
        skip_cache: bool = False,
        cache_dir: str | None = None,
        cache_dtype: CacheDtype = "float32",
        cache_max_memory_mb: float = 2048.0,
        cache_storage: Storage = "auto",
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
        config = config or Config()
        self.save_hyperparameters()
        if pretrained_path is not None and not Path(pretrained_path).expanduser().exists():
            raise FileNotFoundError(
                f"model.pretrained_path {pretrained_path!r} does not exist. Pre-train first: "
                f"`{PRETRAIN_COMMAND}` (it writes runs/gpt_pretrain/checkpoints/last.ckpt), "
                "or point --model.pretrained_path at your own checkpoint"
            )
        if not lr > 0 or not math.isfinite(lr) or warmup_steps < 0 or sample_tokens < 0:
            raise ValueError(f"`lr` must be positive, `warmup_steps` and `sample_tokens` >= 0, "
                             f"got {lr}, {warmup_steps}, {sample_tokens}")
        if weight_decay < 0 or cache_max_memory_mb <= 0:
            raise ValueError(f"`weight_decay` must be >= 0 and `cache_max_memory_mb` positive, got {weight_decay}, "
                             f"{cache_max_memory_mb}")
        folder = None
        if pretrained_path is not None and Path(pretrained_path).expanduser().is_dir():
            folder = read_folder(Path(pretrained_path).expanduser())
            config = with_architecture(config, folder[0])
            self.hparams["config"] = config  # the checkpoint records the architecture really used
        self.model = GPT(config)
        if folder is not None:
            load_backbone_state(self.model, folder[1], asdict(folder[0]), source=f"model.pretrained_path "
                                f"{pretrained_path!r}")
        elif pretrained_path is not None:
            load_pretrained(self.model, pretrained_path)
        if train_head:
            self.model.lm_head.requires_grad_(True)
        if skip_cache:
            check_cacheable(self.model.backbone_modules())
        self.init_evaluation()
        self.init_prediction(prompts, prompt_file, generation, sample_prompt)
        self.cache: SkipCache | None = None
        self._epoch_start = self._epoch_time = 0.0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def check_data(self, datamodule: L.LightningDataModule) -> None:
        """Windows must fit the context and tokens the vocabulary (``callbacks.protocols.DataCompatibility``)."""
        cfg, hp = self.model.config, getattr(datamodule, "hparams", {})
        seq_len = hp.get("seq_len") if hasattr(hp, "get") else None
        if seq_len is not None and seq_len > cfg.block_size:
            raise ValueError(f"data.seq_len ({seq_len}) exceeds model.config.block_size ({cfg.block_size}); "
                             "lower data.seq_len or raise block_size")
        check_lm_data(datamodule, cfg.vocab_size, cfg.block_size, "vocab_size")

    def trained_weights_source(self) -> str | None:
        """``pretrained_path``, when given (``predict`` then needs no ``--ckpt_path``)."""
        return self.hparams.pretrained_path

    def on_fit_start(self) -> None:
        if self.logger is not None:
            self.logger.log_hyperparams(
                self.hparams,
                {"params/trainable": count_parameters(self), "params/total": count_parameters(self, False)},
            )

    def on_train_start(self) -> None:
        """Check eligibility again (anything unfrozen since init) and size the cache: a budget error
        comes here, before the first step."""
        if self.hparams.skip_cache:
            check_cacheable(self.model.backbone_modules())
            self.cache = self._make_cache()

    def _train_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        idx = batch["input_ids"]
        if not self.hparams.skip_cache:
            return self.model(idx)
        features = self.cache.lookup(batch["index"], lambda pos: self.model.forward_backbone(idx[pos]), idx.device)
        return self.model.forward_from_cache(features)

    def _make_cache(self) -> SkipCache:
        """One cache per rank, sized for the whole training set (ranks see different samples each epoch)."""
        hp, cfg = self.hparams, self.model.config
        dataset = self.trainer.train_dataloader.dataset
        sample = dataset[0]
        if not isinstance(sample, dict) or "index" not in sample:
            raise KeyError("skip_cache needs samples with a stable integer `index` (TextDataModule provides it)")
        seq_len = len(sample["input_ids"])
        shapes = {"final": (seq_len, cfg.n_embd)}
        if self.model.skip_indices:
            shapes["skip"] = (len(self.model.skip_indices), seq_len, cfg.n_embd)
        num_samples = len(dataset)
        return SkipCache(num_samples, shapes, hp.cache_dtype, hp.cache_dir, hp.cache_max_memory_mb,
                         hp.cache_storage, tag=f"rank{self.global_rank}_",
                         fingerprint=weights_fingerprint(self.model.backbone_modules()))

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()
        if self.cache is not None:
            self.cache.check_fingerprint(weights_fingerprint(self.model.backbone_modules()))
            self.cache.reset_stats()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        self._epoch_time = time.perf_counter() - self._epoch_start  # training only, validation excluded

    def on_train_epoch_end(self) -> None:
        self.log("time/train_epoch_s", self._epoch_time, sync_dist=True)
        if self.cache is not None:
            self.log("skip_cache/hit_rate", self.cache.hit_rate, sync_dist=True)
            self.log("skip_cache/filled", float(len(self.cache)), sync_dist=True)

    def on_fit_end(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = next_token_loss(self._train_logits(batch), batch["labels"])
        self.log_train_loss(loss)
        return loss

    def on_validation_epoch_end(self) -> None:
        self.log_evaluation("val")
        log_text_sample(self, self.hparams.sample_prompt, self.hparams.sample_tokens)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if not self.hparams.warmup_steps:
            return opt
        warmup = self.hparams.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
