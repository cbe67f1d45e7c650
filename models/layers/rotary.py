"""Rotary position embeddings (rotate-half convention, as LitGPT and LLaMA)."""

from __future__ import annotations

import torch


def rope_cache(seq_len: int, head_size: int, base: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cos/sin tables ``(seq_len, head_size)`` for rotary embeddings."""
    theta = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), theta).repeat(1, 2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last dimension of ``x (..., T, head_size)`` by the angles of positions ``0..T-1``."""
    half = x.size(-1) // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
