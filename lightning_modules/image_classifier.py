"""Image classification with a timm ViT: full fine-tuning, frozen (head only) or LoRA.

Backbone weights: ``pretrained_file`` (a local timm file), or ``pretrain`` (adaptlab's offline glyph backbone,
``datamodules.glyph_backbone``: pre-trained on rendered glyph classes, built on first use and cached by its
settings, the same one the continual main job uses), or neither (random init: a frozen random backbone, so only
LoRA and the head learn and accuracy stays far below a pre-trained start).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from callbacks.adapter_checkpoint import AdapterCheckpoint, load_adapter
from callbacks.class_predictions import ClassPredictionWriter, classify
from datamodules.glyph_backbone import GlyphPretraining, ensure_glyph_backbone
from models.adapters.lora import count_parameters, inject_lora
from models.vision.vit import create_vit, embed_dim, freeze


class ImageClassifier(L.LightningModule):
    """A timm ViT plus a linear head.

    Args:
        backbone: timm model name.
        num_classes: classifier width.
        img_size: input image size (square).
        patch_size: ViT patch size (``None``: the model's own).
        pretrained_file: local weights file for the backbone (never downloaded).
        pretrain: build (once, cached) and load adaptlab's offline glyph backbone; exclusive with ``pretrained_file``.
        backbone_kwargs: extra timm keyword arguments of the backbone (depth, embed_dim, ...).
        finetune: ``full`` trains everything, ``head`` only the classifier, ``lora`` the classifier and LoRA.
        lora_r: LoRA rank (``finetune: lora``).
        lora_alpha: LoRA alpha (scaling ``lora_alpha / lora_r``).
        lora_dropout: dropout on the LoRA input.
        lora_target_modules: layers that get LoRA (``None``: attention qkv/proj and MLP fc1/fc2).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        adapter_path: an ``adapter/`` folder (or its ``adapter.safetensors``) of an earlier ``lora``/``head`` run,
            loaded onto this freshly built model (``predict`` then needs no ``--ckpt_path``).
    """

    def logged_metrics(self) -> list[str]:
        """Every name this module logs (``checkpoint.monitor`` is checked against it before training)."""
        return ["train/loss", "train/acc", "val/loss", "val/acc", "test/acc"]

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        num_classes: int = 10,
        img_size: int = 32,
        patch_size: int | None = 8,
        pretrained_file: str | None = None,
        pretrain: GlyphPretraining | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        finetune: Literal["full", "head", "lora"] = "lora",
        lora_r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: str | Sequence[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        adapter_path: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for key, value, ok, rule in (
            ("num_classes", num_classes, num_classes >= 1, ">= 1"),
            ("img_size", img_size, img_size >= 1, ">= 1"),
            ("patch_size", patch_size, patch_size is None or patch_size >= 1, ">= 1 or null"),
            ("lora_r", lora_r, finetune != "lora" or lora_r >= 1, ">= 1"),
            ("lora_dropout", lora_dropout, 0 <= lora_dropout < 1, "in [0, 1)"),
            ("lr", lr, lr > 0 and math.isfinite(lr), "positive"),
            ("weight_decay", weight_decay, weight_decay >= 0, ">= 0"),
        ):
            if not ok:
                raise ValueError(f"`{key}` must be {rule}, got {value}")
        if patch_size is not None and img_size % patch_size:
            raise ValueError(f"`img_size` ({img_size}) is not a multiple of `patch_size` ({patch_size}): the last "
                             f"{img_size % patch_size} pixel rows and columns would be silently dropped")
        if pretrain is not None and pretrained_file is not None:
            raise ValueError("`pretrain` and `pretrained_file` are exclusive: set one of them to null")
        if pretrain is not None:
            pretrained_file = str(ensure_glyph_backbone(backbone, img_size, patch_size, backbone_kwargs, pretrain))
        self.backbone_file = pretrained_file
        self.backbone = create_vit(backbone, img_size, pretrained_file=pretrained_file, patch_size=patch_size,
                                   **(backbone_kwargs or {}))
        own = getattr(getattr(self.backbone, "patch_embed", None), "patch_size", None)
        own = own[0] if isinstance(own, (tuple, list)) else own
        if patch_size is None and isinstance(own, int) and img_size % own:
            raise ValueError(f"`img_size` ({img_size}) is not a multiple of {backbone}'s patch size ({own}): the last "
                             f"{img_size % own} pixel rows and columns would be silently dropped")
        if finetune != "full":
            freeze(self.backbone)
        if finetune == "lora":
            inject_lora(self.backbone, lora_target_modules, r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
        self.head = nn.Linear(embed_dim(self.backbone), num_classes)
        if adapter_path is not None:
            if finetune == "full":
                raise ValueError("`adapter_path` needs finetune: lora or head (a full fine-tune has no frozen "
                                 "backbone)")
            load_adapter(self, adapter_path)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def check_data(self, datamodule: L.LightningDataModule) -> None:
        """Image size and class count must fit the data (``callbacks.protocols.DataCompatibility``)."""
        size = getattr(getattr(datamodule, "hparams", {}), "get", lambda k: None)("image_size")
        if size is not None and size != self.hparams.img_size:
            raise ValueError(f"data.image_size ({size}) differs from model.img_size ({self.hparams.img_size}); "
                             "set both to the same value")
        classes = getattr(datamodule, "num_classes", None)
        if classes is not None and classes > self.hparams.num_classes:
            raise ValueError(f"the data has {classes} classes but model.num_classes is {self.hparams.num_classes}")

    def on_fit_start(self) -> None:
        if self.logger is not None:
            self.logger.log_hyperparams(
                self.hparams,
                {"params/trainable": count_parameters(self), "params/total": count_parameters(self, False)},
            )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test/acc", (self(x).argmax(-1) == y).float().mean())

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> dict[str, torch.Tensor]:
        """Class and probability per sample of a ``(x, y, index)`` batch (``ClassPredictionWriter`` writes them)."""
        return classify(self(batch[0]), batch)

    def trained_weights_source(self) -> str | None:
        """``adapter_path``, when given (``TrainedWeights`` protocol: ``predict`` then needs no ``--ckpt_path``)."""
        return self.hparams.adapter_path

    def configure_callbacks(self) -> list[Callback]:
        """``predict`` writes ``predictions.csv`` to the run folder, a ``lora``/``head`` fit an adapter-only
        checkpoint to ``adapter/`` (unless the config adds its own)."""
        have = {type(c) for c in self.trainer.callbacks}
        out: list[Callback] = [] if ClassPredictionWriter in have else [ClassPredictionWriter()]
        if self.hparams.finetune != "full" and AdapterCheckpoint not in have:
            out.append(AdapterCheckpoint())
        return out

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
