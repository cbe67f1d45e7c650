"""Transformer MLPs: ``GptNeoxMLP`` (fc -> GELU -> proj) and ``LLaMAMLP`` (SwiGLU), LitGPT's module names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GptNeoxMLP(nn.Module):
    """``proj(gelu(fc(x)))``."""

    def __init__(self, n_embd: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden, bias=bias)
        self.proj = nn.Linear(hidden, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class LLaMAMLP(nn.Module):
    """SwiGLU: ``proj(silu(fc_1(x)) * fc_2(x))``."""

    def __init__(self, n_embd: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.fc_1 = nn.Linear(n_embd, hidden, bias=bias)
        self.fc_2 = nn.Linear(n_embd, hidden, bias=bias)
        self.proj = nn.Linear(hidden, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.fc_1(x)) * self.fc_2(x))
