"""Supervised pre-training of a backbone on a labelled image tensor (pure PyTorch, CPU friendly).

Used to make adaptlab's own offline "pretrained" ViTs (``datamodules.glyph_backbone``): a linear head on the
backbone's pooled features, AdamW with linear warm-up and cosine decay, label smoothing, a fixed seed for the
head, the batch order and nothing else random, so one machine rebuilds the same weights.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.vision.vit import embed_dim


def normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``(B, 3, H, W)`` -> float, scaled to [0, 1] and normalised per channel."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


@torch.no_grad()
def accuracy(backbone: nn.Module, head: nn.Module, x: torch.Tensor, y: torch.Tensor, mean: Sequence[float],
             std: Sequence[float], batch_size: int = 256) -> float:
    """Top-1 accuracy of ``head(backbone(x))`` on uint8 images."""
    was = backbone.training
    backbone.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        logits = head(backbone(normalise(x[i : i + batch_size], mean, std)))
        correct += int((logits.argmax(-1) == y[i : i + batch_size]).sum())
    backbone.train(was)
    return correct / max(len(y), 1)


def pretrain_classifier(
    backbone: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    warmup_fraction: float = 0.1,
    label_smoothing: float = 0.1,
    seed: int = 0,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    progress: bool = True,
) -> nn.Linear:
    """Train ``backbone`` + a new linear head on uint8 images ``x`` with labels ``y``; returns the head.

    Batches are drawn without replacement from a seeded permutation (a new one every pass over the data).
    """
    from tqdm.auto import tqdm

    if steps <= 0 or batch_size <= 0:
        raise ValueError(f"steps and batch_size must be positive, got {steps} and {batch_size}")
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(embed_dim(backbone), num_classes)
    with torch.no_grad():
        bound = 1.0 / math.sqrt(head.in_features)
        head.weight.copy_(torch.rand(head.weight.shape, generator=g) * 2 * bound - bound)
        head.bias.zero_()
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    warmup = max(1, int(warmup_fraction * steps))
    def factor(s: int) -> float:
        return (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    backbone.train()
    order, pos = torch.randperm(len(y), generator=g), 0
    bar = tqdm(range(steps), desc="pre-training the backbone", disable=not progress)
    ema = None
    for _ in bar:
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(y), generator=g), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        logits = head(backbone(normalise(x[idx], mean, std)))
        loss = F.cross_entropy(logits, y[idx], label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = float(loss.detach())
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        bar.set_postfix(loss=f"{ema:.3f}")
    backbone.eval()
    return head
