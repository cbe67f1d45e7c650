"""Memory model of Phase 1 training and the 8 / 10 / 24 GB presets derived from it.

Training memory (fp32 weights, AdamW) of a :class:`Phase1Config` at micro-batch ``B`` and ``T = n_seq`` tokens:

* **parameters, gradients, optimizer state**: ``P * (4 + 4 + 8)`` bytes (weights, grads, Adam's two moments);
* **activations**: what autograd saves for the backward, per token and layer (float32 numbers, counted
  with ``torch.autograd.graph.saved_tensors_hooks`` on each layer, see ``tests/test_phase1_memory.py``):
  BK mixer ``10.5 d``, AR-SSM ``3.1 d + 11.7 r + 1.2 h`` (``r`` = max rank, ``h`` = gate hidden), GptNeoxMLP
  ``2 d + 2 m`` / LLaMAMLP ``2 d + 4 m`` (``m`` = intermediate size), each norm ``d + 2``. Without
  checkpointing every layer's activations are alive at the start of the backward; with
  ``use_gradient_checkpointing`` only each block's input (``d``) is kept, plus one block's activations
  while it is recomputed;
* **the head**: the logits, their log-softmax and their gradient, ``3 V`` numbers per token (the TT head
  adds its contraction intermediate, ``d_1 r V_2`` for two cores), and a few ``d``-sized gradients of the
  residual stream.

:func:`estimate_memory` returns the parts; ``tests/test_phase1_memory.py`` checks the total against the
measured peak of real training steps over several sizes (CPU RSS; on CUDA ``max_memory_allocated`` with
the same function). :func:`fit_to_budget` picks the largest width/depth on a ladder whose estimate fits
``target_vram_gb`` times :data:`BUDGET_FRACTION` (room for the CUDA context, the allocator's fragmentation
and kernels' workspaces); the presets are that search at 8, 10 and 24 GB.
"""

from __future__ import annotations

import math
from typing import Any

from models.lm.phase1.config import Phase1Config

GIB = 2**30
#: share of the device the estimate may use (the rest: CUDA context, fragmentation, workspaces)
BUDGET_FRACTION = 0.8
#: (d_model, n_layers) ladder searched by fit_to_budget, smallest first (depth ~ d_model / 64)
SIZE_LADDER: tuple[tuple[int, int], ...] = (
    (128, 4), (256, 4), (384, 6), (512, 8), (640, 10), (768, 12), (896, 14), (1024, 16), (1152, 18), (1280, 20),
    (1536, 24), (2048, 32),
)
#: preset name -> (target_vram_gb, n_seq, batch_size)
PRESETS: dict[str, tuple[float, int, int]] = {"8gb": (8.0, 1024, 8), "10gb": (10.0, 1024, 8), "24gb": (24.0, 2048, 8)}
#: preset name -> the features each preset sets besides its size (as the guide's presets vary them): the AR-SSM
#: rank range and gate L1 weight, the TT embedding rank, gradient checkpointing. Checkpointing stays on in all
#: three: off, the memory model would fit only d_model 768 x 12 layers (96 M parameters) into 24 GB at 2048 x 8
#: tokens instead of 1536 x 24 (759 M); ``memory.gradient_checkpointing: false`` trades that size for speed.
PRESET_FEATURES: dict[str, dict[str, Any]] = {
    "8gb": {"ar_ssm_max_rank": 16, "ar_ssm_min_rank": 4, "ar_ssm_l1_regularization": 2e-3, "htt_rank": 8,
            "use_gradient_checkpointing": True},
    "10gb": {"ar_ssm_max_rank": 32, "ar_ssm_min_rank": 4, "ar_ssm_l1_regularization": 1e-3, "htt_rank": 16,
             "use_gradient_checkpointing": True},
    "24gb": {"ar_ssm_max_rank": 64, "ar_ssm_min_rank": 8, "ar_ssm_l1_regularization": 5e-4, "htt_rank": 32,
             "use_gradient_checkpointing": True},
}


def count_parameters(config: Phase1Config) -> int:
    """Parameters of ``Phase1LM(config)`` without building it (equals ``model.num_parameters()``)."""
    d, m, v, b = config.d_model, config.mlp_size, config.vocab_size, int(config.bias)
    norm = 2 * d if config.norm_class == "LayerNorm" and config.bias else d
    mlp = (2 * d * m + b * (m + d)) if config.mlp_class == "GptNeoxMLP" else (3 * d * m + b * (2 * m + d))
    per_layer = norm + mlp
    if config.bk_enabled:
        per_layer += norm + 3 * d * d + 3 * d + 2 * d * d + d
    if config.ar_ssm_enabled:
        r, k = config.ar_ssm_max_rank, config.ar_ssm_conv_kernel
        h = max(r, d // 4)
        per_layer += norm + d * k + d + d * h + h + h * r + r + 3 * d * r + r
    if config.htt_enabled:
        from models.layers import tt_embedding as tt_mod  # its factorisation rules, without allocating

        vf = tt_mod._vocab_factors(v, config.htt_num_cores)
        df = tt_mod._dim_factors(d, config.htt_num_cores)
        sizes = [a * c for a, c in zip(vf, df)]
        k = config.htt_num_cores
        ranks = [1] + [min(config.htt_rank, math.prod(sizes[:i]), math.prod(sizes[i:])) for i in range(1, k)] + [1]
        embed = sum(ranks[i] * vf[i] * df[i] * ranks[i + 1] for i in range(k))
        embed += sum(ranks[i + 1] // 2 for i in range(k - 1)) if config.htt_phase_encoding else 0
    else:
        embed = v * d
    head = 0 if config.tie_embeddings else v * d
    return embed + config.n_layers * per_layer + norm + head


def activation_floats_per_token(config: Phase1Config) -> dict[str, float]:
    """Saved float32 numbers per token: ``layer`` (one block) and ``head`` (final norm, logits, TT head)."""
    d, m, v = config.d_model, config.mlp_size, config.vocab_size
    norm = d + 2
    layer = norm + (2 * d + 2 * m if config.mlp_class == "GptNeoxMLP" else 2 * d + 4 * m)
    if config.bk_enabled:
        layer += norm + 10.5 * d
    if config.ar_ssm_enabled:
        r = config.ar_ssm_max_rank
        layer += norm + 3.1 * d + 11.7 * r + 1.2 * max(r, d // 4)
    head = norm + 3 * v
    if config.htt_enabled:
        from models.layers import tt_embedding as tt_mod

        vf = tt_mod._vocab_factors(v, config.htt_num_cores)
        df = tt_mod._dim_factors(d, config.htt_num_cores)
        head += df[0] * config.htt_rank * math.prod(vf[1:]) + math.prod(vf) - v
    return {"layer": layer, "head": head}


def estimate_memory(config: Phase1Config, batch_size: int | None = None, n_seq: int | None = None) -> dict[str, Any]:
    """Bytes of one training step (fp32, AdamW): ``weights``, ``gradients``, ``optimizer``, ``activations``
    (peak of the saved tensors), ``head`` (logits and their gradient), ``total_bytes`` and ``total_gb``."""
    b = config.batch_size if batch_size is None else batch_size
    t = config.n_seq if n_seq is None else n_seq
    tokens = b * t
    p = count_parameters(config)
    per = activation_floats_per_token(config)
    if config.use_gradient_checkpointing:
        act = tokens * (config.n_layers * config.d_model + per["layer"])
    else:
        act = tokens * config.n_layers * per["layer"]
    act += tokens * 3 * config.d_model  # gradients of the residual stream in flight
    out = {
        "parameters": p,
        "weights": 4 * p,
        "gradients": 4 * p,
        "optimizer": 8 * p,
        "activations": 4 * act,
        "head": 4 * tokens * per["head"],
    }
    out["total_bytes"] = sum(v for k, v in out.items() if k != "parameters")
    out["total_gb"] = out["total_bytes"] / GIB
    return out


def fit_to_budget(config: Phase1Config, target_vram_gb: float | None = None) -> Phase1Config:
    """The largest ``(d_model, n_layers)`` of :data:`SIZE_LADDER` whose :func:`estimate_memory` fits
    ``BUDGET_FRACTION * target_vram_gb`` (default ``config.target_vram_gb``); other fields are kept.
    Raises ``ValueError`` when not even the smallest rung fits."""
    target = config.target_vram_gb if target_vram_gb is None else target_vram_gb
    budget = target * GIB * BUDGET_FRACTION
    best = None
    for d, n_layers in SIZE_LADDER:
        candidate = config.replace(d_model=d, n_layers=n_layers, intermediate_size=None, target_vram_gb=target)
        if estimate_memory(candidate)["total_bytes"] <= budget:
            best = candidate
    if best is None:
        raise ValueError(f"target_vram_gb={target:g} is too small for d_model="
                         f"{SIZE_LADDER[0][0]} at batch_size={config.batch_size}, n_seq={config.n_seq}")
    return best


def get_preset_config(name: str, **overrides: Any) -> Phase1Config:
    """``"8gb"``, ``"10gb"`` or ``"24gb"``: every Phase 1 feature on, sequence length and micro-batch of
    :data:`PRESETS`, the features of :data:`PRESET_FEATURES`, width and depth from :func:`fit_to_budget`.
    ``overrides`` are applied before sizing."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    vram, n_seq, batch = PRESETS[name]
    base = Phase1Config(n_seq=n_seq, batch_size=batch, target_vram_gb=vram, **PRESET_FEATURES[name])
    return fit_to_budget(base.replace(**overrides))
