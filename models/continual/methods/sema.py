"""``sema``: self-expanding mixture of adapters (``models.adapters.sema``): at a new task each expandable layer
tests the task's images against its descriptors and adds an adapter where they look new; after the task the
new descriptors are fitted in their own phase.

Expansion order (``expansion_order``): ``joint`` tests every layer on the unexpanded model and trains all new
adapters together in the task's epochs; ``layerwise`` (SEMA-CL's) trains a layer's new adapter (with the head,
through ``TaskContext.train_epochs``) and fits its descriptor before the next layer is tested.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
from torch import nn

from models.adapters.sema import SEMALayer, expansion_decisions, inject_sema
from models.continual.base import ContinualMethod, TaskContext, register_method


@register_method("sema")
class SEMAMethod(ContinualMethod):
    """SEMA's adapters, descriptors, routers and expansion rule.

    Args:
        sema_layers: blocks that get a SEMA layer (``None``: all).
        expansion_layers: blocks where SEMA may add adapters (negative: from the end; SEMA: last three).
        expansion_threshold: z-score threshold of the expansion rule.
        expansion_order: ``joint`` or ``layerwise`` (module docstring).
        expansion_batches: batches of the new task scored per check (``None``: all).
        expansion_batch_size: batch size of the check (128 in SEMA; |z| is averaged over a batch).
        descriptor_epochs: epochs of the descriptor phase after each task (20 in SEMA).
        lr_descriptor: SGD learning rate of the descriptor phase.
        sema_bottleneck: adapter bottleneck width (16 in SEMA).
        sema_descriptor_hidden: descriptor autoencoder width (SEMA: 128 for d = 768, i.e. d / 6; keep it below the
            backbone width so the autoencoder cannot learn the identity).
        sema_buffer_size: recent reconstruction errors kept per descriptor (500).
    """

    grows = True

    def __init__(self, sema_layers: Sequence[int] | None = None, expansion_layers: Sequence[int] = (-3, -2, -1),
                 expansion_threshold: float = 2.0, expansion_order: Literal["joint", "layerwise"] = "joint",
                 expansion_batches: int | None = None, expansion_batch_size: int = 128, descriptor_epochs: int = 20,
                 lr_descriptor: float = 1e-2, sema_bottleneck: int = 16, sema_descriptor_hidden: int = 128,
                 sema_buffer_size: int = 500) -> None:
        if expansion_order not in ("layerwise", "joint"):
            raise ValueError(f"expansion_order must be 'joint' or 'layerwise', got {expansion_order!r}")
        for key, value in (("expansion_batches", expansion_batches), ("expansion_batch_size", expansion_batch_size),
                           ("descriptor_epochs", descriptor_epochs), ("sema_bottleneck", sema_bottleneck),
                           ("sema_descriptor_hidden", sema_descriptor_hidden), ("sema_buffer_size", sema_buffer_size)):
            if value is not None and value <= 0:
                raise ValueError(f"{key} must be positive, got {value}")
        self.sema_layers, self.expansion_layer_spec = sema_layers, expansion_layers
        self.threshold, self.order = expansion_threshold, expansion_order
        self.expansion_batches, self.expansion_batch_size = expansion_batches, expansion_batch_size
        self.descriptor_epochs, self.lr_descriptor = descriptor_epochs, lr_descriptor
        self.sizes = (sema_bottleneck, sema_descriptor_hidden, sema_buffer_size)
        self.layers: dict[int, SEMALayer] = {}
        self.closed: set[tuple[int, int]] = set()  # (layer, task): adapters trained before the task's epochs
        self.expansions: list[dict[str, float]] = []
        self.decisions: list[dict[str, float]] = []  # every expansion test: task, layer, z, expanded
        self.trained_between: list[dict[str, float]] = []

    # ------------------------------------------------------------------ structure
    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        blocks = model.backbone.blocks
        n = len(blocks)
        for key, values in (("sema_layers", self.sema_layers or []), ("expansion_layers", self.expansion_layer_spec)):
            bad = [i for i in values if not -n <= i < n]
            if bad:
                raise ValueError(f"{key} {bad} out of range for a backbone with {n} blocks")
        layers = range(n) if self.sema_layers is None else [i % n for i in self.sema_layers]
        self.expansion_layers = sorted({i % n for i in self.expansion_layer_spec})
        missing = [i for i in self.expansion_layers if i not in layers]
        if missing:
            raise ValueError(f"expansion_layers {missing} have no SEMA layer (sema_layers={self.sema_layers})")
        self.layers = inject_sema(blocks, layers, model.backbone_dim, *self.sizes)

    def open_adapters(self, layer: int, task: int) -> list[int]:
        """Adapters of ``layer`` that train in ``task``: those created in ``task``, unless closed early (the
        layer-by-layer order trains a shallow layer's new adapter before the deeper tests, then closes it)."""
        if (layer, task) in self.closed:
            return []
        return [k for k, t in enumerate(self.layers[layer].created_task) if t == task]

    def adapter_groups(self, task: int) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {"fast": [], "slow": [], "descriptors": []}
        for i, layer in self.layers.items():
            for k in self.open_adapters(i, task):
                groups["fast"] += list(layer.adapters[k].parameters())
                if layer.num_adapters > 1:  # a lone adapter's softmax weight is 1: its row gets no gradient
                    groups["fast"] += list(layer.router[k].parameters())
                groups["descriptors"] += list(layer.descriptors[k].parameters())
        return groups

    def layout(self) -> dict[int, list[int]]:
        """Creation task of every adapter per layer (what a checkpoint needs to rebuild the structure)."""
        return {i: list(layer.created_task) for i, layer in self.layers.items()}

    def restore_layout(self, layout: dict[int | str, list[int]]) -> None:
        """Add the adapters a checkpoint has beyond the initial ones (before loading its state dict)."""
        for key, tasks in layout.items():
            layer = self.layers[int(key)]
            for task in tasks[layer.num_adapters :]:
                layer.add_adapter(task)

    def state(self) -> dict[str, Any]:
        return {"sema_layout": {str(k): v for k, v in self.layout().items()}, "expansions": self.expansions,
                "sema_decisions": self.decisions, "sema_trained_between": self.trained_between}

    def load_state(self, state: dict[str, Any]) -> None:
        self.expansions = list(state.get("expansions", []))
        self.decisions = list(state.get("sema_decisions", []))
        self.trained_between = list(state.get("sema_trained_between", []))
        self.closed = {(int(e["layer"]), int(e["task"])) for e in self.trained_between}
        self.restore_layout(state["sema_layout"])

    def results(self) -> dict[str, Any]:
        return {"expansions": self.expansions, "sema_decisions": self.decisions,
                "sema_layout": {str(k): v for k, v in self.layout().items()},
                "expansion_order": self.order, "sema_trained_between": self.trained_between}

    @contextlib.contextmanager
    def adapters_off(self) -> Iterator[None]:
        try:
            for layer in self.layers.values():
                layer.disabled = True
            yield
        finally:
            for layer in self.layers.values():
                layer.disabled = False

    def relative_delta(self) -> float:
        """Root-sum-square over adapters of ``||W_up W_down||_F`` over that of the MLP's ``||W_fc2 W_fc1||_F`` (the
        linear parts of the two parallel branches; a scale indicator, both branches are non-linear)."""
        delta = base = 0.0
        for i, layer in self.layers.items():
            mlp = self.model.backbone.blocks[i].mlp.mlp
            base += float((mlp.fc2.weight @ mlp.fc1.weight).detach().square().sum())
            delta += sum(float((a.up.weight @ a.down.weight).detach().square().sum()) for a in layer.adapters)
        return math.sqrt(delta / base) if base else 0.0

    # ------------------------------------------------------------------ expansion
    @torch.no_grad()
    def zscores(self, batches: Iterable[torch.Tensor], layers: Sequence[int] | None = None
                ) -> dict[int, list[list[float]]]:
        """Per layer (default: the expandable ones), per batch, every descriptor's batch mean of |z|."""
        chosen = {i: self.layers[i] for i in (self.expansion_layers if layers is None else layers)}
        model = self.model
        was_training = model.training
        model.eval()
        try:
            for layer in chosen.values():
                layer.collect_z = []
            for x in batches:
                model.backbone(x)
            return {i: layer.collect_z for i, layer in chosen.items()}
        finally:
            for layer in chosen.values():
                layer.collect_z = None
            model.train(was_training)

    def expand(self, task: int, batches: Iterable[torch.Tensor], threshold: float,
               generator: torch.Generator | None = None,
               train_new: Callable[[int], None] | None = None) -> dict[int, tuple[float, bool]]:
        """Test the expandable layers shallow to deep on the new task's batches and add at most one adapter per
        layer where the rule fires; returns ``{layer: (score, expanded)}``.

        ``train_new`` (layer-by-layer order): when a layer expands and a deeper expandable layer remains,
        ``train_new(layer)`` trains that layer's new adapter and fits its descriptor; the adapter is then closed,
        so deeper layers are tested on features through it. Without it (joint order) new adapters start as no-ops
        (zero up-projection), so every layer is tested on the unexpanded model."""
        batches = list(batches)
        out: dict[int, tuple[float, bool]] = {}
        pending: int | None = None
        for i in self.expansion_layers:
            if pending is not None and train_new is not None:
                train_new(pending)
                self.closed.add((pending, task))
                pending = None
            expand, score = expansion_decisions(self.zscores(batches, [i])[i], threshold)
            if expand:
                self.layers[i].add_adapter(task, generator)
                pending = i
            out[i] = (score, expand)
        return out

    def layer_features(self, batches: Iterable[torch.Tensor], layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """Token-averaged inputs of the SEMA layers ``layers`` (what descriptors and routers read), (N, d) each."""
        captured: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
        hooks = [self.layers[i].register_forward_pre_hook(lambda m, args, i=i: captured[i].append(args[0].mean(1)))
                 for i in layers]
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for x in batches:
                    model.backbone(x)
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
        return {i: torch.cat(v) for i, v in captured.items()}

    def fit_descriptors(self, batches: Iterable[torch.Tensor], task: int, epochs: int = 20, lr: float = 1e-2,
                        batch_size: int = 32, generator: torch.Generator | None = None) -> dict[int, float]:
        """The descriptor phase: train the descriptors created in ``task`` and not fitted yet (linear autoencoders)
        on the frozen model's token-averaged features of ``batches`` (SGD, momentum 0.9, cosine), then fill their
        error buffers; returns the final mean reconstruction error per layer."""
        new = {i: [k for k, t in enumerate(layer.created_task) if t == task and int(layer.descriptors[k].count) == 0]
               for i, layer in self.layers.items()}
        new = {i: ks for i, ks in new.items() if ks}
        if not new:
            return {}
        feats = self.layer_features(batches, list(new))
        out = {}
        for i, ks in new.items():
            f = feats[i]
            for k in ks:
                d = self.layers[i].descriptors[k]
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

    # ------------------------------------------------------------------ task hooks
    def on_task_start(self, ctx: TaskContext) -> None:
        task = ctx.task
        if task == 0:
            return
        batches = [x for x, _ in ctx.batches("train", self.expansion_batch_size, True)]
        batches = batches[: self.expansion_batches or len(batches)]
        train_new = None
        if self.order == "layerwise":
            def train_new(layer: int) -> None:
                trained = ctx.train_epochs() if ctx.train_epochs is not None else {"steps": 0, "loss": float("nan")}
                errors = self.fit_descriptors([x for x, _ in ctx.batches("train", 0, False)], task,
                                              self.descriptor_epochs, self.lr_descriptor,
                                              generator=torch.Generator().manual_seed(1000 * task + layer))
                self.trained_between.append({"task": task, "layer": layer, **trained})
                ctx.info(f"[sema] task {task}, layer {layer}: new adapter trained {trained['steps']} steps (last loss "
                         f"{trained['loss']:.3f}) and its "
                         f"descriptor fitted (error {errors.get(layer, float('nan')):.4f}) before the next layer")
        decisions = self.expand(task, batches, self.threshold, torch.Generator().manual_seed(task), train_new)
        for layer, (z, expanded) in decisions.items():
            self.decisions.append({"task": task, "layer": layer, "z": z, "expanded": bool(expanded)})
            if expanded:
                self.expansions.append({"task": task, "layer": layer, "z": z})
            ctx.info(f"[sema] task {task}, layer {layer}: largest batch |z| (smallest over descriptors) {z:.2f} "
                     f"{'> ' if expanded else '<= '}{self.threshold}: "
                     f"{'new adapter added' if expanded else 'no expansion'}")
        metrics = {f"sema/z_layer{layer}": z for layer, (z, _) in decisions.items()}
        metrics["sema/expansions"] = float(sum(e for _, e in decisions.values()))
        metrics["sema/adapters"] = float(sum(len(v) for v in self.layout().values()))
        ctx.log(metrics)

    def on_task_end(self, ctx: TaskContext) -> None:
        errors = self.fit_descriptors([x for x, _ in ctx.batches("train", 0, False)], ctx.task,
                                      self.descriptor_epochs, self.lr_descriptor,
                                      generator=torch.Generator().manual_seed(ctx.task))
        ctx.log({f"sema/descriptor_error_layer{i}": e for i, e in errors.items()})
