"""SEMA: self-expanding mixture of adapters (Wang et al., CVPR 2025), pure PyTorch.

Each adapted ViT block gets a :class:`SEMALayer` parallel to its MLP: a list of bottleneck adapters
(``d -> 16 -> d`` with ReLU), one representation descriptor per adapter (an autoencoder ``d -> 128 -> d``
trained with MSE on the adapter's input, keeping a buffer of its last ~500 per-sample reconstruction
errors for a running mean/std), and a router (softmax over the adapters from token-averaged features).

Expansion: on a new task's batches, each descriptor of a layer scores
``z = (batch-mean reconstruction error - mean) / std``; when the smallest z of the layer (the best-fitting
descriptor still finds the data unusual) exceeds ``threshold``, a new adapter + descriptor is added there
and trained while the old ones stay frozen. The adapter input is the MLP input (``norm2`` output), which
the descriptors and the router read too. Two simplifications of the public SEMA code, for one-pass
Lightning training: detection scores every expandable layer in one pass of the unexpanded model (a new
adapter's up-projection starts at zero, so it does not change deeper features) instead of re-detecting after
each expansion, and descriptors train jointly with the adapters (their loss is added, on detached inputs)
instead of in a separate phase; their error buffers are filled after the task with the trained descriptors.
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
    """Autoencoder ``d -> hidden -> d`` plus a ring buffer of recent per-sample reconstruction errors."""

    def __init__(self, dim: int, hidden: int = 128, buffer_size: int = 500) -> None:
        super().__init__()
        self.encoder, self.decoder = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.register_buffer("errors", torch.zeros(buffer_size))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def sample_errors(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample MSE over tokens and features of ``x`` (B, N, d) -> (B,)."""
        recon = self.decoder(F.relu(self.encoder(x)))
        return (recon - x).square().flatten(1).mean(1)

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
    def zscore(self, x: torch.Tensor) -> float:
        mean, std = self.stats()
        return (float(self.sample_errors(x).mean()) - mean) / std


class SEMALayer(nn.Module):
    """A mixture of adapters with descriptors and a router for one block (parallel to its MLP)."""

    def __init__(self, dim: int, bottleneck: int = 16, descriptor_hidden: int = 128, buffer_size: int = 500) -> None:
        super().__init__()
        self.dim, self.bottleneck = dim, bottleneck
        self.descriptor_hidden, self.buffer_size = descriptor_hidden, buffer_size
        self.adapters = nn.ModuleList()
        self.descriptors = nn.ModuleList()
        self.router: nn.Linear | None = None
        self.descriptor_loss: torch.Tensor | None = None  # set by forward() while training descriptors
        self.collect_z: list[list[float]] | None = None  # set to [] to collect z-scores per batch
        self.created_task: list[int] = []  # task in which each adapter was added (it trains only then)
        self.add_adapter(task=0)

    @property
    def num_adapters(self) -> int:
        return len(self.adapters)

    def add_adapter(self, task: int, generator: torch.Generator | None = None) -> None:
        """Append an adapter + descriptor created in ``task``; widen the router (old rows kept, new row zero)."""
        self.created_task.append(task)
        ref = next(self.parameters(), None)
        device = ref.device if ref is not None else None
        with torch.random.fork_rng(devices=[]):
            if generator is not None:
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=generator)))
            self.adapters.append(BottleneckAdapter(self.dim, self.bottleneck).to(device))
            self.descriptors.append(
                RepresentationDescriptor(self.dim, self.descriptor_hidden, self.buffer_size).to(device)
            )
        n = self.num_adapters
        if n > 1:
            router = nn.Linear(self.dim, n).to(device)
            nn.init.zeros_(router.weight)
            nn.init.zeros_(router.bias)
            if self.router is not None:
                with torch.no_grad():
                    router.weight[: n - 1] = self.router.weight
                    router.bias[: n - 1] = self.router.bias
            self.router = router

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        outs = torch.stack([a(h) for a in self.adapters], dim=-1)  # (B, N, d, n)
        if self.router is None:
            mixed = outs[..., 0]
        else:
            weights = self.router(h.mean(dim=1)).softmax(dim=-1)  # (B, n)
            mixed = torch.einsum("bndk,bk->bnd", outs, weights)
        trainable = [d for d in self.descriptors if d.encoder.weight.requires_grad]
        self.descriptor_loss = None
        if self.training and trainable:
            self.descriptor_loss = sum(d.sample_errors(h.detach()).mean() for d in trainable)
        if self.collect_z is not None:
            self.collect_z.append([d.zscore(h) for d in self.descriptors])
        return mixed


class MLPWithSEMA(nn.Module):
    """A block's MLP plus a SEMA layer reading the same input: ``mlp(h) + sema(h)``."""

    def __init__(self, mlp: nn.Module, sema: SEMALayer) -> None:
        super().__init__()
        self.mlp, self.sema = mlp, sema

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(h) + self.sema(h)


def inject_sema(blocks: nn.ModuleList, layers: Sequence[int], dim: int, bottleneck: int = 16,
                descriptor_hidden: int = 128, buffer_size: int = 500) -> dict[int, SEMALayer]:
    """Wrap ``blocks[i].mlp`` for each ``i`` in ``layers``; returns the SEMA layers by block index."""
    out = {}
    for i in layers:
        if not -len(blocks) <= i < len(blocks):
            raise ValueError(f"SEMA layer index {i} out of range for a backbone with {len(blocks)} blocks")
        i = i % len(blocks)
        block = blocks[i]
        if not hasattr(block, "mlp"):
            raise TypeError(f"block {i} ({type(block).__name__}) has no `mlp` to put SEMA adapters beside")
        out[i] = SEMALayer(dim, bottleneck, descriptor_hidden, buffer_size)
        block.mlp = MLPWithSEMA(block.mlp, out[i])
    return out


def expansion_decisions(z_per_batch: list[list[float]], threshold: float) -> tuple[bool, float]:
    """(expand?, mean over batches of the smallest z): expand when that mean exceeds ``threshold``."""
    if not z_per_batch:
        return False, float("nan")
    z_min = sum(min(z) for z in z_per_batch) / len(z_per_batch)
    return (z_min > threshold and math.isfinite(z_min)), z_min
