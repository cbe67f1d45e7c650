"""A frozen timm ViT with continual-learning adapters and a class-incremental head (pure PyTorch).

``adapter_type``: ``none`` (head only), ``lora``, ``nested_lora`` (slow + fast LoRA, see
``models.adapters.nested_lora``) or ``sema`` (self-expanding mixture of adapters, see ``models.adapters.sema``).

The head has one row per class of the whole sequence; ``forward(x, n_seen, n_old)`` returns the logits of
the ``n_seen`` classes seen so far with the ``n_old`` classes of earlier tasks set to ``-inf`` (SEMA's
masking while training a new task). Because masked logits get exactly zero gradient, the old classes'
rows stay fixed, so this is a growing head whose parameter set never changes (which keeps DDP and
checkpoints simple).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from torch import nn

from models.adapters.lora import LoRAAdapter, inject_lora
from models.adapters.nested_lora import FAST, SLOW, adapter_parameters, inject_nested_lora
from models.adapters.sema import SEMALayer, expansion_decisions, inject_sema
from models.vision.vit import create_vit, embed_dim, freeze

AdapterType = Literal["none", "lora", "sema", "nested_lora"]
ADAPTER_TYPES = ("none", "lora", "sema", "nested_lora")


class ContinualViT(nn.Module):
    """Backbone + adapters + masked head.

    Args:
        backbone / img_size / patch_size / pretrained_file / backbone_kwargs: see ``models.vision.vit.create_vit``
            (``backbone_kwargs`` such as ``{depth: 4}`` shrink the timm model for CPU runs).
        num_classes: classes of the whole sequence.
        adapter_type: see module docstring.
        lora_r / lora_alpha / lora_target_modules: ``lora`` settings (``lora_alpha`` None = the rank,
            scaling 1; also used by ``nested_lora``).
        nested_lora_r: rank of each of the slow and fast adapters (total rank ``2 * nested_lora_r``).
        sema_layers: blocks that get a SEMA layer at the first task (``None``: every block).
        expansion_layers: blocks where SEMA may add adapters (negative = from the end; SEMA: last three).
        sema_bottleneck / sema_descriptor_hidden / sema_buffer_size: SEMA sizes (16, 128, 500).
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        num_classes: int = 10,
        img_size: int = 32,
        patch_size: int | None = 8,
        pretrained_file: str | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        adapter_type: AdapterType = "nested_lora",
        lora_r: int = 8,
        lora_alpha: float | None = None,
        lora_target_modules: None | str | Sequence[str] = None,
        nested_lora_r: int = 4,
        sema_layers: Sequence[int] | None = None,
        expansion_layers: Sequence[int] = (-3, -2, -1),
        sema_bottleneck: int = 16,
        sema_descriptor_hidden: int = 128,
        sema_buffer_size: int = 500,
    ) -> None:
        super().__init__()
        if adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"adapter_type must be one of {ADAPTER_TYPES}, got {adapter_type!r}")
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.adapter_type = adapter_type
        self.backbone = create_vit(backbone, img_size, pretrained_file=pretrained_file, patch_size=patch_size,
                                   **(backbone_kwargs or {}))
        freeze(self.backbone)
        dim = embed_dim(self.backbone)
        self.sema: dict[int, SEMALayer] = {}
        if adapter_type == "lora":
            inject_lora(self.backbone, lora_target_modules, r=lora_r,
                        lora_alpha=float(lora_r if lora_alpha is None else lora_alpha))
        elif adapter_type == "nested_lora":
            inject_nested_lora(self.backbone, lora_target_modules, nested_lora_r, lora_alpha)
        elif adapter_type == "sema":
            blocks = self.backbone.blocks
            n = len(blocks)
            for key, values in (("sema_layers", sema_layers or []), ("expansion_layers", expansion_layers)):
                bad = [i for i in values if not -n <= i < n]
                if bad:
                    raise ValueError(f"{key} {bad} out of range for a backbone with {n} blocks")
            layers = range(n) if sema_layers is None else [i % n for i in sema_layers]
            self.expansion_layers = sorted({i % n for i in expansion_layers})
            missing = [i for i in self.expansion_layers if i not in layers]
            if missing:
                raise ValueError(f"expansion_layers {missing} have no SEMA layer (sema_layers={sema_layers})")
            self.sema = inject_sema(blocks, layers, dim, sema_bottleneck, sema_descriptor_hidden, sema_buffer_size)
        self.sema_closed: set[tuple[int, int]] = set()  # (layer, task): adapters trained before the task's epochs
        self._backbone_names = {n for n, _ in self.backbone.named_parameters() if not self._is_adapter(n)}
        self.head = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.head.bias)  # as SEMA: Kaiming-uniform rows, zero bias
        self.num_classes = num_classes

    @staticmethod
    def _is_adapter(name: str) -> bool:
        return ".adapters." in name or ".sema." in name

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, n_seen: int | None = None, n_old: int = 0) -> torch.Tensor:
        logits = self.head(self.backbone(x))
        if n_seen is not None:
            logits = logits[:, :n_seen]
        if n_old > 0:
            logits = torch.cat([torch.full_like(logits[:, :n_old], float("-inf")), logits[:, n_old:]], dim=1)
        return logits

    def auxiliary_loss(self) -> torch.Tensor | None:
        """An extra training loss of the adapters (None: SEMA's descriptors train in their own phase)."""
        return None

    # ------------------------------------------------------------------ trainability per task
    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.backbone.named_parameters() if n in self._backbone_names]

    def parameter_groups(self, task: int, train_backbone: bool = False) -> dict[str, list[nn.Parameter]]:
        """The parameters trained in ``task``: ``head``, ``fast`` (adapters; Nested LoRA's fast ones; SEMA's new
        adapters and their router rows), ``slow`` (Nested LoRA's slow adapters), ``descriptors`` (SEMA's new
        autoencoders, trained in their own phase by :meth:`sema_fit_descriptors`) and ``backbone``."""
        groups: dict[str, list[nn.Parameter]] = {"head": list(self.head.parameters()), "fast": [], "slow": [],
                                                 "descriptors": []}
        if self.adapter_type == "lora":
            groups["fast"] += [p for m in self.backbone.modules() if isinstance(m, LoRAAdapter) for p in m.parameters()]
        elif self.adapter_type == "nested_lora":
            groups["fast"] += adapter_parameters(self.backbone, FAST)
            groups["slow"] = adapter_parameters(self.backbone, SLOW)
        elif self.adapter_type == "sema":
            for i, layer in self.sema.items():
                for k in self.sema_open_adapters(i, task):
                    groups["fast"] += list(layer.adapters[k].parameters())
                    if layer.num_adapters > 1:  # a lone adapter's softmax weight is 1: its row gets no gradient
                        groups["fast"] += list(layer.router[k].parameters())
                    groups["descriptors"] += list(layer.descriptors[k].parameters())
        groups["backbone"] = self.backbone_parameters() if train_backbone else []
        return groups

    def sema_open_adapters(self, layer: int, task: int) -> list[int]:
        """Indices of the adapters of SEMA layer ``layer`` that train in ``task``: those created in ``task``,
        unless closed early. In the layer-by-layer order a shallow layer's new adapter trains (and its descriptor
        is fitted) while the deeper layers are still to be tested; :meth:`sema_expand` then closes it (listed in
        ``sema_closed`` as ``(layer, task)``): from then on it, its router row and its descriptor stay frozen."""
        if (layer, task) in self.sema_closed:
            return []
        return [k for k, t in enumerate(self.sema[layer].created_task) if t == task]

    def set_trainable(self, task: int, train_backbone: bool = False) -> dict[str, list[nn.Parameter]]:
        """Freeze everything, then unfreeze what ``task`` trains; returns :meth:`parameter_groups`."""
        freeze(self)
        groups = self.parameter_groups(task, train_backbone)
        for params in groups.values():
            for p in params:
                p.requires_grad_(True)
        return groups

    # ------------------------------------------------------------------ SEMA expansion
    @torch.no_grad()
    def sema_zscores(self, batches: Iterable[torch.Tensor], layers: Sequence[int] | None = None
                     ) -> dict[int, list[list[float]]]:
        """Per layer (default: the expandable ones), per batch, every descriptor's batch mean of |z|."""
        chosen = {i: self.sema[i] for i in (self.expansion_layers if layers is None else layers)}
        was_training = self.training
        self.eval()
        try:
            for layer in chosen.values():
                layer.collect_z = []
            for x in batches:
                self.backbone(x)
            return {i: layer.collect_z for i, layer in chosen.items()}
        finally:
            for layer in chosen.values():
                layer.collect_z = None
            self.train(was_training)

    def sema_expand(self, task: int, batches: Iterable[torch.Tensor], threshold: float,
                    generator: torch.Generator | None = None,
                    train_new: Callable[[int], None] | None = None) -> dict[int, tuple[float, bool]]:
        """Test the expandable layers one after another (shallow to deep) on the new task's batches and add
        at most one adapter per layer where the rule fires; returns ``{layer: (score, expanded)}``.

        ``train_new`` (SEMA-CL's layer-by-layer order): when a layer expands and a deeper expandable layer
        remains to be tested, ``train_new(layer)`` is called first; it must train that layer's new adapter
        and fit its descriptor; the adapter is then closed (``sema_closed``), so the deeper layers are tested on
        features that pass through the trained adapter. The last expansion is left open for the task's regular
        training.
        Without it (joint order) every layer is tested before any new adapter trains; new adapters start as
        no-ops (zero up-projection), so that equals testing every layer on the unexpanded model."""
        batches = list(batches)
        out: dict[int, tuple[float, bool]] = {}
        pending: int | None = None
        for i in self.expansion_layers:
            if pending is not None and train_new is not None:
                train_new(pending)
                self.sema_closed.add((pending, task))
                pending = None
            expand, score = expansion_decisions(self.sema_zscores(batches, [i])[i], threshold)
            if expand:
                self.sema[i].add_adapter(task, generator)
                pending = i
            out[i] = (score, expand)
        return out

    def sema_features(self, batches: Iterable[torch.Tensor], layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Token-averaged inputs of the SEMA layers ``layers`` (what descriptors and routers read), (N, d) each."""
        captured: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        hooks = [self.sema[i].register_forward_pre_hook(lambda m, args, i=i: captured[i].append(args[0].mean(1)))
                 for i in layers]
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                for x in batches:
                    self.backbone(x)
        finally:
            for h in hooks:
                h.remove()
            self.train(was_training)
        return {i: torch.cat(v) for i, v in captured.items()}

    def sema_fit_descriptors(self, batches: Iterable[torch.Tensor], task: int, epochs: int = 20, lr: float = 1e-2,
                             batch_size: int = 32, generator: torch.Generator | None = None) -> dict[int, float]:
        """SEMA's descriptor phase: train the descriptors created in ``task`` and not fitted yet (linear
        autoencoders) on the frozen model's token-averaged features of ``batches`` (SGD, momentum 0.9, cosine),
        then fill their error buffers; returns the final mean reconstruction error per layer."""
        new = {i: [k for k, t in enumerate(layer.created_task) if t == task and int(layer.descriptors[k].count) == 0]
               for i, layer in self.sema.items()}
        new = {i: ks for i, ks in new.items() if ks}
        if not new:
            return {}
        feats = self.sema_features(batches, list(new))
        out = {}
        for i, ks in new.items():
            f = feats[i]
            for k in ks:
                d = self.sema[i].descriptors[k]
                params = list(d.parameters())
                for p in params:
                    p.requires_grad_(True)
                opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
                steps = epochs * math.ceil(len(f) / batch_size)
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
                with torch.enable_grad():
                    for _ in range(epochs):
                        order = torch.randperm(len(f), generator=generator)
                        for j in range(0, len(f), batch_size):
                            loss = d.sample_errors(f[order[j : j + batch_size]]).mean()
                            opt.zero_grad(set_to_none=True)
                            loss.backward()
                            opt.step()
                            sched.step()
                for p in params:
                    p.requires_grad_(False)
                with torch.no_grad():
                    errors = d.sample_errors(f)
                d.record(errors)
                out[i] = float(errors.mean())
        return out

    def sema_layout(self) -> dict[int, list[int]]:
        """Creation task of every adapter per SEMA layer (what a checkpoint needs to rebuild the structure)."""
        return {i: list(layer.created_task) for i, layer in self.sema.items()}

    def restore_sema_layout(self, layout: dict[int | str, list[int]]) -> None:
        """Add the adapters a checkpoint has beyond the initial ones (before loading its state dict)."""
        for key, tasks in layout.items():
            layer = self.sema[int(key)]
            for task in tasks[layer.num_adapters :]:
                layer.add_adapter(task)
