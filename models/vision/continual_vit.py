"""A frozen timm ViT with a continual-learning method and a class-incremental head (pure PyTorch).

The method (``adapter_type``) is looked up in the registry of ``models.continual`` (one file per method in
``models/continual/methods/``: ``none``, ``lora``, ``nested_lora``, ``sema``, ``aper``, ...); this class only
wires it: the method adds its modules to the backbone, names what trains in a task and computes the features.

The head has one row per class of the whole sequence; ``forward(x, n_seen, n_old)`` returns the logits of
the ``n_seen`` classes seen so far with the ``n_old`` classes of earlier tasks set to ``-inf`` (SEMA's
masking while training a new task). Because masked logits get exactly zero gradient, the old classes'
rows stay fixed, so this is a growing head whose parameter set never changes (which keeps DDP and
checkpoints simple). With ``classifier: ncm | ridge`` a statistics classifier (``models.continual.classifiers``)
is fitted at every task end from the task's training features and classifies in eval mode once it covers the
requested classes; the linear head still trains (it is what gives adapters a gradient).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Literal

import torch
from torch import nn

from models.continual.base import ContinualMethod, create_method
from models.continual.classifiers import create_classifier
from models.vision.vit import create_vit, embed_dim, freeze


class ContinualViT(nn.Module):
    """Backbone + method + masked head (+ statistics classifier).

    Args:
        backbone / img_size / patch_size / pretrained_file / backbone_kwargs: see ``models.vision.vit.create_vit``
            (``backbone_kwargs`` such as ``{depth: 4}`` shrink the timm model for CPU runs).
        num_classes: classes of the whole sequence.
        adapter_type: a registered method name (``models.continual.METHODS``).
        classifier: ``linear`` (the trained head), ``ncm`` or ``ridge``.
        ridge_dim: random-projection width of the ``ridge`` classifier.
        ridge_seed: seed of that projection.
        method_settings: the method's constructor arguments (e.g. ``lora_r``, ``expansion_layers``; keys the
            method does not name are ignored, so one flat settings dict serves every method).
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        num_classes: int = 10,
        img_size: int = 32,
        patch_size: int | None = 8,
        pretrained_file: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        adapter_type: str = "nested_lora",
        classifier: Literal["linear", "ncm", "ridge"] = "linear",
        ridge_dim: int = 1000,
        ridge_seed: int = 0,
        **method_settings: Any,
    ) -> None:
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.method: ContinualMethod = create_method(adapter_type, method_settings)
        self.adapter_type = adapter_type
        self.backbone = create_vit(backbone, img_size, pretrained_file=pretrained_file, patch_size=patch_size,
                                   **(backbone_kwargs or {}))
        freeze(self.backbone)
        self.backbone_dim = embed_dim(self.backbone)
        self.method.attach(self)
        self._backbone_names = {n for n, _ in self.backbone.named_parameters() if not self.method.is_adapter(n)}
        dim = self.method.feature_dim(self.backbone_dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.head.bias)  # as SEMA: Kaiming-uniform rows, zero bias
        self.classifier = create_classifier(classifier, dim, num_classes, ridge_dim, ridge_seed)
        self.num_classes = num_classes

    # ------------------------------------------------------------------ forward
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.features(x)

    def forward(self, x: torch.Tensor, n_seen: int | None = None, n_old: int = 0) -> torch.Tensor:
        f = self.features(x)
        stats = self.classifier
        if stats is not None and not self.training and int(stats.fitted) >= (n_seen or self.num_classes):
            logits = stats(f)
        else:
            logits = self.head(f)
        if n_seen is not None:
            logits = logits[:, :n_seen]
        if n_old > 0:
            logits = torch.cat([torch.full_like(logits[:, :n_old], float("-inf")), logits[:, n_old:]], dim=1)
        return logits

    def auxiliary_loss(self) -> torch.Tensor | None:
        """An extra training loss of the adapters (None: SEMA's descriptors train in their own phase)."""
        return None

    @torch.no_grad()
    def fit_classifier(self, train: Iterable[tuple[torch.Tensor, torch.Tensor]], n_seen: int,
                       val: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, float]:
        """Task end: add the task's training features to the statistics classifier (nothing for ``linear``)."""
        if self.classifier is None:
            return {}
        was_training = self.training
        self.eval()
        try:
            f, y = zip(*[(self.features(x), y) for x, y in train])
            v = None
            if val is not None:
                fv, yv = zip(*[(self.features(x), y) for x, y in val])
                v = (torch.cat(fv), torch.cat(yv).to(f[0].device))
            return self.classifier.fit_task(torch.cat(f), torch.cat(y).to(f[0].device), n_seen, v)
        finally:
            self.train(was_training)

    @contextlib.contextmanager
    def adapters_off(self) -> Iterator[None]:
        """Inside: the method's adapters add nothing (the head and classifier are unchanged)."""
        with self.method.adapters_off():
            yield

    # ------------------------------------------------------------------ trainability per task
    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.backbone.named_parameters() if n in self._backbone_names]

    def parameter_groups(self, task: int, train_backbone: bool = False) -> dict[str, list[nn.Parameter]]:
        """The parameters trained in ``task``: ``head``, ``fast`` (adapters; Nested LoRA's fast ones; SEMA's new
        adapters and their router rows), ``slow`` (Nested LoRA's slow adapters), ``descriptors`` (SEMA's new
        autoencoders, trained in their own phase) and ``backbone``."""
        groups: dict[str, list[nn.Parameter]] = {"head": list(self.head.parameters())}
        groups.update(self.method.adapter_groups(task))
        train_backbone = train_backbone or self.method.trains_backbone(task)
        groups["backbone"] = self.backbone_parameters() if train_backbone else []
        return groups

    def set_trainable(self, task: int, train_backbone: bool = False) -> dict[str, list[nn.Parameter]]:
        """Freeze everything, then unfreeze what ``task`` trains; returns :meth:`parameter_groups`."""
        freeze(self)
        groups = self.parameter_groups(task, train_backbone)
        for params in groups.values():
            for p in params:
                p.requires_grad_(True)
        return groups
