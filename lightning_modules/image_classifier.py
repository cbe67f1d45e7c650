"""Image classification with a timm ViT: full fine-tuning, frozen (head only) or LoRA."""

from __future__ import annotations

from typing import Literal, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

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
        finetune: ``full`` trains everything, ``head`` only the classifier, ``lora`` the classifier and LoRA.
        lora_r: LoRA rank (``finetune: lora``).
        lora_alpha: LoRA alpha (scaling ``lora_alpha / lora_r``).
        lora_dropout: dropout on the LoRA input.
        lora_target_modules: layers that get LoRA (``None``: attention qkv/proj and MLP fc1/fc2).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        num_classes: int = 10,
        img_size: int = 32,
        patch_size: int | None = 8,
        pretrained_file: str | None = None,
        finetune: Literal["full", "head", "lora"] = "lora",
        lora_r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_target_modules: str | Sequence[str] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = create_vit(backbone, img_size, pretrained_file=pretrained_file, patch_size=patch_size)
        if finetune != "full":
            freeze(self.backbone)
        if finetune == "lora":
            inject_lora(self.backbone, lora_target_modules, r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
        self.head = nn.Linear(embed_dim(self.backbone), num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

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

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
