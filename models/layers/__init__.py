"""Shared layers, one concept per file; :mod:`models.layers.create` picks norms and MLPs by name."""

from models.layers.create import MLP_LAYERS, NORM_LAYERS, create_mlp, create_norm
from models.layers.mlp import GptNeoxMLP, LLaMAMLP
from models.layers.norms import RMSNorm
from models.layers.rotary import apply_rope, rope_cache

__all__ = ["MLP_LAYERS", "NORM_LAYERS", "GptNeoxMLP", "LLaMAMLP", "RMSNorm", "apply_rope", "create_mlp",
           "create_norm", "rope_cache"]
