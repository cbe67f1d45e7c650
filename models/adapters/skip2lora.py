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
        block_indices: the block each branch reads (its key in the state dict); default ``0..K-1``.
    """

    def __init__(self, dim: int, num_branches: int, r: int, alpha: float,
                 block_indices: list[int] | None = None) -> None:
        super().__init__(LoRAAdapter(dim, dim, r, alpha) for _ in range(num_branches))
        if block_indices is not None and len(block_indices) != num_branches:
            raise ValueError(f"block_indices {block_indices} must name {num_branches} blocks")
        self.block_indices = list(range(num_branches)) if block_indices is None else list(block_indices)
        # Saved under the block index (``skip2lora.<block>.lora_A``), not the position in this list, so a branch
        # can only load onto the block it was trained on.
        self._register_state_dict_hook(Skip2LoRA._positions_to_blocks)
        self._register_load_state_dict_pre_hook(self._blocks_to_positions)

    @staticmethod
    def _rename(state: dict, prefix: str, mapping: dict[int, int]) -> None:
        renamed = {}
        for key in [k for k in state if k.startswith(prefix)]:
            head, _, tail = key[len(prefix):].partition(".")
            if head.isdigit() and int(head) in mapping:
                renamed[f"{prefix}{mapping[int(head)]}.{tail}"] = state.pop(key)
        state.update(renamed)

    @staticmethod
    def _positions_to_blocks(module: "Skip2LoRA", state: dict, prefix: str, local_metadata: dict) -> dict:
        Skip2LoRA._rename(state, prefix, dict(enumerate(module.block_indices)))
        return state

    def _blocks_to_positions(self, state: dict, prefix: str, *args) -> None:
        Skip2LoRA._rename(state, prefix, {b: i for i, b in enumerate(self.block_indices)})

    def forward(self, skip: torch.Tensor) -> torch.Tensor:
        """``sum_i scaling_i * h_i A_i^T B_i^T``: the same as summing each branch's output, in two batched
        matmuls instead of 2K small ones."""
        A = torch.stack([branch.lora_A * branch.scaling for branch in self])  # (K, r, C)
        B = torch.cat([branch.lora_B for branch in self], dim=1)  # (C, K*r)
        down = torch.einsum("bktc,krc->btkr", skip.to(A.dtype), A)
        return down.flatten(2) @ B.t()
