"""Skip2-LoRA branches (Matsutani et al., ASP-DAC 2025): one LoRA branch per selected block, all into the head.

Block ``i``'s output ``h_i`` feeds ``scaling_i * B_i A_i h_i``; the branches are summed into the final
normalised hidden state just before the output layer. Nothing flows back into the frozen blocks, which is
what lets :mod:`models.cache.skip_cache` cache their outputs.
"""

from __future__ import annotations

import torch
from torch import nn

from models.adapters.lora import LoRAAdapter


class Skip2LoRA(nn.ModuleList):
    """One :class:`LoRAAdapter` (``dim -> dim``) per selected block; ``forward(skip (B, K, T, C)) -> (B, T, C)``.

    Args:
        dim: hidden size of the blocks and of the output layer's input.
        num_branches: number of selected blocks (K).
        r: rank of every branch.
        alpha: LoRA alpha of every branch (scaling ``alpha / r``).
    """

    def __init__(self, dim: int, num_branches: int, r: int, alpha: float) -> None:
        super().__init__(LoRAAdapter(dim, dim, r, alpha) for _ in range(num_branches))

    def forward(self, skip: torch.Tensor) -> torch.Tensor:
        """``sum_i scaling_i * h_i A_i^T B_i^T``: the same as summing each branch's output, in two batched
        matmuls instead of 2K small ones."""
        A = torch.stack([branch.lora_A * branch.scaling for branch in self])  # (K, r, C)
        B = torch.cat([branch.lora_B for branch in self], dim=1)  # (C, K*r)
        down = torch.einsum("bktc,krc->btkr", skip.to(A.dtype), A)
        return down.flatten(2) @ B.t()
