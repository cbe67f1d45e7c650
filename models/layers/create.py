"""Layers chosen by name: the one lookup table that configs' ``norm_class``/``mlp_class`` keys refer to."""

from __future__ import annotations

from typing import Callable

from torch import nn

from models.layers.mlp import GptNeoxMLP, LLaMAMLP
from models.layers.norms import RMSNorm

#: name -> factory ``(size, eps, bias) -> module``.
NORM_LAYERS: dict[str, Callable[[int, float, bool], nn.Module]] = {
    "LayerNorm": lambda size, eps, bias: nn.LayerNorm(size, eps=eps, bias=bias),
    "RMSNorm": lambda size, eps, bias: RMSNorm(size, eps),
}
#: name -> MLP class ``(n_embd, hidden, bias)``.
MLP_LAYERS: dict[str, type[nn.Module]] = {"GptNeoxMLP": GptNeoxMLP, "LLaMAMLP": LLaMAMLP}


def _lookup(table: dict, kind: str, name: str):
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; choose one of {sorted(table)}")
    return table[name]


def create_norm(name: str, size: int, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    """A normalisation layer by name (``LayerNorm`` or ``RMSNorm``)."""
    return _lookup(NORM_LAYERS, "norm_class", name)(size, eps, bias)


def create_mlp(name: str, n_embd: int, hidden: int, bias: bool = True) -> nn.Module:
    """A transformer MLP by name (``GptNeoxMLP`` or ``LLaMAMLP``)."""
    return _lookup(MLP_LAYERS, "mlp_class", name)(n_embd, hidden, bias)
