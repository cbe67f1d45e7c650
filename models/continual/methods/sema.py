"""``sema``: self-expanding mixture of adapters (``models.adapters.sema``): at a new task each expandable layer
tests the task's images against its descriptors and adds an adapter where they look new; after the task the
new descriptors are fitted in their own phase.

Expansion order (``expansion_order``): ``joint`` tests every layer on the unexpanded model at the task start and
trains all new adapters together in the task's epochs; ``layerwise`` (SEMA-CL's) gives a later task one training
phase per expandable layer (:meth:`SEMAMethod.phases`, scheduled by the LightningModule as Lightning epochs): phase
``p`` tests layer ``p``; where it expands, its new adapter trains (with its router row and the head) in the
phase's epochs, then its descriptor is fitted and the adapter frozen before the next layer is tested; where it
does not, the phase is skipped. The last phase is the task's regular epochs.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable, Iterator, Literal, Sequence

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
        layer-by-layer order closes a layer's new adapter at the end of its phase)."""
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

    @property
    def expansions(self) -> list[dict[str, float]]:
        """The decisions that added an adapter: task, layer, z."""
        return [{k: d[k] for k in ("task", "layer", "z")} for d in self.decisions if d["expanded"]]

    def state(self) -> dict[str, Any]:
        return {"sema_layout": {str(k): v for k, v in self.layout().items()}, "expansions": self.expansions,
                "sema_decisions": self.decisions, "sema_trained_between": self.trained_between}

    def load_state(self, state: dict[str, Any]) -> None:
        # checkpoints written before every decision was kept hold only the expansions
        self.decisions = list(state.get("sema_decisions") or
                              [{**e, "expanded": True} for e in state.get("expansions", [])])
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

    def expand_layer(self, task: int, layer: int, batches: Sequence[torch.Tensor], threshold: float,
                     generator: torch.Generator | None = None) -> tuple[float, bool]:
        """Test ``layer`` on the new task's batches and add one adapter there if the rule fires; returns
        ``(score, expanded)``. New adapters start as no-ops (zero up-projection)."""
        expand, score = expansion_decisions(self.zscores(batches, [layer])[layer], threshold)
        if expand:
            self.layers[layer].add_adapter(task, generator)
        return score, expand

    def expand(self, task: int, batches: Iterable[torch.Tensor], threshold: float,
               generator: torch.Generator | None = None) -> dict[int, tuple[float, bool]]:
        """The joint order: test every expandable layer (shallow to deep, each on the unexpanded model since new
        adapters start as no-ops) and add at most one adapter per layer; returns ``{layer: (score, expanded)}``."""
        batches = list(batches)
        return {i: self.expand_layer(task, i, batches, threshold, generator) for i in self.expansion_layers}

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
    def phases(self, task: int) -> int:
        """Layer by layer: one phase per expandable layer at every task after the first; otherwise one."""
        return len(self.expansion_layers) if self.order == "layerwise" and task > 0 else 1

    def _check_batches(self, ctx: TaskContext) -> list[torch.Tensor]:
        """The new task's images the expansion test scores (shuffled from the task index)."""
        batches = [x for x, _ in ctx.batches("train", self.expansion_batch_size, True)]
        return batches[: self.expansion_batches or len(batches)]

    def _decided(self, ctx: TaskContext, layer: int, z: float, expanded: bool) -> None:
        self.decisions.append({"task": ctx.task, "layer": layer, "z": z, "expanded": bool(expanded)})
        ctx.info(f"[sema] task {ctx.task}, layer {layer}: largest batch |z| (smallest over descriptors) {z:.2f} "
                 f"{'> ' if expanded else '<= '}{self.threshold}: "
                 f"{'new adapter added' if expanded else 'no expansion'}")

    def _log_expansions(self, ctx: TaskContext, scores: dict[int, float]) -> None:
        metrics = {f"sema/z_layer{layer}": z for layer, z in scores.items()}
        metrics["sema/expansions"] = float(sum(e["task"] == ctx.task for e in self.expansions))
        metrics["sema/adapters"] = float(sum(len(v) for v in self.layout().values()))
        ctx.log(metrics)

    def on_task_start(self, ctx: TaskContext) -> None:
        """The joint order's expansion test (every layer at once; also layer by layer with one expandable layer)."""
        task = ctx.task
        if task == 0 or self.phases(task) > 1:
            return
        decisions = self.expand(task, self._check_batches(ctx), self.threshold, torch.Generator().manual_seed(task))
        for layer, (z, expanded) in decisions.items():
            self._decided(ctx, layer, z, expanded)
        self._log_expansions(ctx, {layer: z for layer, (z, _) in decisions.items()})

    def on_phase_start(self, ctx: TaskContext) -> bool:
        """Layer by layer: test the phase's layer; the phase trains its new adapter, or is skipped when the layer
        did not expand (the last phase, the task's regular epochs, always trains)."""
        if self.phases(ctx.task) == 1:
            return True
        layer, last = self.expansion_layers[ctx.phase], ctx.phase == len(self.expansion_layers) - 1
        z, expanded = self.expand_layer(ctx.task, layer, self._check_batches(ctx), self.threshold,
                                        torch.Generator().manual_seed(1000 * ctx.task + layer))
        self._decided(ctx, layer, z, expanded)
        if last:
            self._log_expansions(ctx, {layer: z})
        else:
            ctx.log({f"sema/z_layer{layer}": z})
        return expanded or last

    def on_phase_end(self, ctx: TaskContext) -> None:
        """Layer by layer: fit the phase's new descriptor and close its adapter before the next layer is tested."""
        task, layer = ctx.task, self.expansion_layers[ctx.phase]
        if not self.open_adapters(layer, task):
            return  # the layer did not expand (its phase was skipped)
        errors = self.fit_descriptors([x for x, _ in ctx.batches("train", 0, False)], task, self.descriptor_epochs,
                                      self.lr_descriptor, generator=torch.Generator().manual_seed(1000 * task + layer))
        self.closed.add((layer, task))
        self.trained_between.append({"task": task, "layer": layer, "steps": ctx.steps})
        ctx.log({f"sema/descriptor_error_layer{layer}": errors[layer]})
        ctx.info(f"[sema] task {task}, layer {layer}: new adapter trained {ctx.steps} steps and its descriptor fitted "
                 f"(error {errors[layer]:.4f}) before the next layer")

    def on_task_end(self, ctx: TaskContext) -> None:
        errors = self.fit_descriptors([x for x, _ in ctx.batches("train", 0, False)], ctx.task,
                                      self.descriptor_epochs, self.lr_descriptor,
                                      generator=torch.Generator().manual_seed(ctx.task))
        ctx.log({f"sema/descriptor_error_layer{i}": e for i, e in errors.items()})
