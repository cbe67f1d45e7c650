"""SEMA: self-expanding mixture of adapters (Wang et al., CVPR 2025), pure PyTorch, following the public
SEMA-CL code.

Each adapted ViT block gets a :class:`SEMALayer` that reads the residual stream after attention (the input of
``norm2``) and adds its output to the residual in parallel with the MLP: ``x + mlp(norm2(x)) + sema(x)``. A
layer holds bottleneck adapters (``d -> 16 -> d`` with ReLU), one representation descriptor per adapter (a
*linear* autoencoder ``d -> 128 -> d`` on the token-averaged features, with a buffer of its last ~500
per-sample reconstruction errors for a running mean/std) and a router with one row per adapter (softmax over
the rows applied to the token-averaged features).

Expansion (``ContinualViT.sema_expand``): on a new task's batches each existing descriptor of a layer scores
every sample, ``|z| = |error - mean| / std``, averaged over the batch; the layer expands when, for *any*
batch, that average exceeds ``threshold`` against *every* descriptor of the layer (the data is unusual for
all of them). At most one adapter is added per layer per task. The new adapter, its router row and the head
train on the task; old adapters, descriptors and router rows stay frozen. After the adapters' training the new
descriptors train in their own phase (``ContinualViT.sema_fit_descriptors``) on the frozen model's features,
and their error buffers are filled.

Order of the expansion checks (``ContinualClassifier(expansion_order=...)``, default ``joint``, which measured
better on the glyph sequence, see benchmarks/RESULTS.md): ``layerwise`` is SEMA-CL's: the
expandable layers are tested shallow to deep, and when a layer expands and a deeper one remains to be tested,
its new adapter (with its router row and the head) trains for the task's epochs and its descriptor is fitted
before the next layer is tested, so deeper decisions see features that pass through the trained adapter; the
last expansion trains in the task's regular epochs (the published code instead stops after the last
expansion's training, so when the deepest expansion is not in the last expandable layer our task also runs
its regular epochs, on the head alone). ``joint`` is a one-pass simplification: every layer is tested before
any new adapter trains (new adapters start as no-ops, so this equals testing every layer on the unexpanded
model) and all new adapters train together; it costs no extra epochs. Within one check, SEMA-CL adds the
adapter at the first (batch, layer) that fires; we test a layer on all batches before moving deeper.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class BottleneckAdapter(nn.Module):
    """``up(relu(down(x)))``; ``up`` starts at zero so a new adapter is a no-op until trained."""

    def __init__(self, dim: int, bottleneck: int = 16) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(dim, bottleneck), nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(x)))


class RepresentationDescriptor(nn.Module):
    """Linear autoencoder ``d -> hidden -> d`` on token-averaged features plus a ring buffer of recent
    per-sample reconstruction errors."""

    def __init__(self, dim: int, hidden: int = 128, buffer_size: int = 500) -> None:
        super().__init__()
        self.encoder, self.decoder = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.register_buffer("errors", torch.zeros(buffer_size))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def sample_errors(self, f: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE of token-averaged features ``f`` (B, d) -> (B,)."""
        return (self.decoder(self.encoder(f)) - f).square().mean(-1)

    @torch.no_grad()
    def record(self, errors: torch.Tensor) -> None:
        """Append per-sample errors to the ring buffer (the oldest are overwritten)."""
        size = self.errors.numel()
        e = errors.detach().flatten()[-size:].to(self.errors)
        self.errors[(int(self.count) + torch.arange(len(e), device=e.device)) % size] = e
        self.count += len(e)

    def stats(self) -> tuple[float, float]:
        """Mean and std of the buffered errors (std floored to avoid dividing by ~0)."""
        n = int(min(int(self.count), self.errors.numel()))
        if n < 2:
            raise RuntimeError("descriptor has fewer than 2 recorded errors; call record() after training it")
        e = self.errors[:n]
        return float(e.mean()), max(float(e.std()), 1e-6 * max(float(e.mean()), 1e-12))

    @torch.no_grad()
    def zscore(self, f: torch.Tensor) -> float:
        """Batch mean of the per-sample absolute z-scores of token-averaged features ``f`` (B, d)."""
        mean, std = self.stats()
        return float(((self.sample_errors(f) - mean).abs() / std).mean())


class SEMALayer(nn.Module):
    """Adapters, descriptors and per-adapter router rows for one block (reads and writes the residual stream)."""

    def __init__(self, dim: int, bottleneck: int = 16, descriptor_hidden: int = 128, buffer_size: int = 500) -> None:
        super().__init__()
        self.dim, self.bottleneck = dim, bottleneck
        self.descriptor_hidden, self.buffer_size = descriptor_hidden, buffer_size
        self.adapters = nn.ModuleList()
        self.descriptors = nn.ModuleList()
        self.router = nn.ModuleList()  # one Linear(dim, 1) row per adapter: old rows can be frozen alone
        self.collect_z: list[list[float]] | None = None  # set to [] to collect z-scores per batch
        self.disabled = False  # True: the layer adds nothing (accuracy with the adapters zeroed)
        self.created_task: list[int] = []  # task in which each adapter was added (it trains only then)
        self.add_adapter(task=0)

    @property
    def num_adapters(self) -> int:
        return len(self.adapters)

    def add_adapter(self, task: int, generator: torch.Generator | None = None) -> None:
        """Append an adapter + descriptor + router row created in ``task`` (the row with ``nn.Linear``'s default
        initialisation, as SEMA-CL; the new adapter's zero up-projection keeps the layer's output unchanged)."""
        self.created_task.append(task)
        ref = next(self.parameters(), None)
        device = ref.device if ref is not None else None
        with torch.random.fork_rng(devices=[]):
            if generator is not None:
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=generator)))
            self.adapters.append(BottleneckAdapter(self.dim, self.bottleneck).to(device))
            descriptor = RepresentationDescriptor(self.dim, self.descriptor_hidden, self.buffer_size)
            self.descriptors.append(descriptor.to(device))
            self.router.append(nn.Linear(self.dim, 1).to(device))

    def router_weights(self, f: torch.Tensor) -> torch.Tensor:
        """Softmax over the router rows of token-averaged features ``f`` (B, d) -> (B, n_adapters)."""
        return torch.cat([row(f) for row in self.router], dim=-1).softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = x.mean(dim=1)
        if self.collect_z is not None:
            self.collect_z.append([d.zscore(f) for d in self.descriptors])
        if self.disabled:
            return torch.zeros_like(x)
        if self.num_adapters == 1:
            return self.adapters[0](x)
        outs = torch.stack([a(x) for a in self.adapters], dim=-1)  # (B, N, d, n)
        return torch.einsum("bndk,bk->bnd", outs, self.router_weights(f))


class MLPWithSEMA(nn.Module):
    """Takes a block's ``norm2`` and ``mlp`` (the block's ``norm2`` becomes an identity): on the residual stream
    ``x`` it returns ``mlp(norm2(x)) + sema(x)``, so the block computes ``x + mlp(norm2(x)) + sema(x)``
    (times the block's ``ls2`` layer scale, the identity in ViTs without one)."""

    def __init__(self, norm: nn.Module, mlp: nn.Module, sema: SEMALayer) -> None:
        super().__init__()
        self.norm, self.mlp, self.sema = norm, mlp, sema

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x)) + self.sema(x)


def inject_sema(blocks: nn.ModuleList, layers: Sequence[int], dim: int, bottleneck: int = 16,
                descriptor_hidden: int = 128, buffer_size: int = 500) -> dict[int, SEMALayer]:
    """Put a SEMA layer beside ``blocks[i].mlp`` for each ``i`` in ``layers``; returns them by block index."""
    out = {}
    for i in layers:
        if not -len(blocks) <= i < len(blocks):
            raise ValueError(f"SEMA layer index {i} out of range for a backbone with {len(blocks)} blocks")
        i = i % len(blocks)
        block = blocks[i]
        if not (hasattr(block, "mlp") and hasattr(block, "norm2")):
            raise TypeError(f"block {i} ({type(block).__name__}) has no `mlp`/`norm2` to put SEMA adapters beside")
        out[i] = SEMALayer(dim, bottleneck, descriptor_hidden, buffer_size)
        block.mlp = MLPWithSEMA(block.norm2, block.mlp, out[i])
        block.norm2 = nn.Identity()
    return out


def expansion_decisions(z_per_batch: list[list[float]], threshold: float) -> tuple[bool, float]:
    """(expand?, score): per batch the smallest descriptor z (batch mean of |z|); expand when any batch's
    exceeds ``threshold``; the score is the largest of them over the batches."""
    if not z_per_batch:
        return False, float("nan")
    score = max(min(z) for z in z_per_batch)
    return (score > threshold and math.isfinite(score)), score
