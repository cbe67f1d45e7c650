"""The Phase 2 language model: non-Hermitian forgetting, dissipative Hebbian fast weights (pure PyTorch).

Byte-level decoder with no attention and no positional embedding. Every block is pre-norm with two parallel
token mixers on the same normalised input h, then an MLP:

    Gamma_t = softplus(W_Gamma h_t + b) + base_decay                     (B, N, n_heads), positive by construction
    x <- x + BK(h, decay = Gamma) + Memory(h)                          h = norm_1(x)
    x <- x + MLP(norm_2(x))

* ``Memory`` is :class:`models.layers.fast_weights.DissipativeHebbianMemory` (fast weights decayed by
  exp(-Gamma_t delta), SNR filter, resonance damping, Lyapunov diagnostics). Gamma_t above is the memory's own
  ``gamma(h)``; the same values decay the memory and enter the BK mixer.
* ``BK`` is the resolvent mixer of the Phase 1 family (:class:`models.layers.bk_mixer.BKMixer`) with Gamma as the
  imaginary part of its potential, a_t - i (eta + Gamma_t): each head's Gamma covers its d_model / n_heads
  channels. A larger Gamma shrinks |g_t| and with it the coupling of a token to the past. ``bk_enabled: false``
  drops the BK branch (an ablation).

Documents: a ``reset_token`` (default 0, the NUL byte that :class:`datamodules.text.TextDataModule` puts between
files) starts a new document: both mixers forget everything before it (the memory is zeroed before that token's
write, the BK coupling to the previous token is cut), so a document's logits never depend on the one before.

State: ``forward(idx)`` starts from an empty state every call (nothing persists between batches);
``forward(idx, state, return_state=True)`` continues a sequence, which is what :meth:`Phase2LM.generate` does.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass
from typing import Callable, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers.bk_mixer import BKMixer
from models.layers.create import create_mlp, create_norm
from models.layers.fast_weights import BACKENDS as MEMORY_BACKENDS
from models.layers.fast_weights import DissipativeHebbianMemory, FastWeightState
from models.layers.fast_weights_fla import HAS_FLA
from models.lm.sampling import generate_with_state

#: Size presets (issue 11): d_model, layers, heads x head_dim; the training sequence length is a data key.
PRESETS: dict[str, dict[str, int]] = {
    "small": {"d_model": 256, "n_layers": 4, "n_heads": 4, "head_dim": 64},
    "base": {"d_model": 512, "n_layers": 6, "n_heads": 8, "head_dim": 64},
    "large": {"d_model": 1024, "n_layers": 12, "n_heads": 16, "head_dim": 64},
}
#: Training sequence length of each preset (``data.seq_len`` in its YAML).
PRESET_SEQ_LEN = {"small": 512, "base": 1024, "large": 2048}


@dataclass
class Phase2Config:
    """Architecture and memory options of :class:`Phase2LM` (the ``model.config`` keys of the YAML files).

    ``base_decay``, ``hebbian_eta``, ``snr_threshold`` (``None``: filter off), ``gamma_bounds``, ``eta_bounds``,
    ``resonance_threshold``, ``resonance_damping``, ``chunk_size`` and ``delta`` go to every
    :class:`DissipativeHebbianMemory`; ``bk_eta`` and ``bk_chunk_size`` to every BK mixer. ``backend``:
    ``torch`` (default; every device), ``triton`` (the fused rule kernel and the length-independent chunked
    attention for the memory, the Triton scan for the BK mixer; CUDA) or ``fla`` (as ``triton`` with
    flash-linear-attention's ``chunk_simple_gla`` for the memory's attention; CUDA and the optional
    ``fla-core``). The fused backends have no resonance damping. ``use_triton: true`` is ``backend: triton``.
    """

    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int = 64
    mlp_class: Literal["GptNeoxMLP", "LLaMAMLP"] = "GptNeoxMLP"
    intermediate_size: int | None = None
    norm_class: Literal["LayerNorm", "RMSNorm"] = "RMSNorm"
    norm_eps: float = 1e-5
    dropout: float = 0.0
    base_decay: float = 0.01
    hebbian_eta: float = 1.0
    snr_threshold: float | None = 2.0
    gamma_bounds: tuple[float, float] = (1.0, 4.0)
    eta_bounds: tuple[float, float] = (1.0, 2.0)
    resonance_threshold: float = 4.0
    resonance_damping: float = 0.0
    chunk_size: int = 64
    delta: float = 1.0
    bk_enabled: bool = True
    bk_eta: float = 1.0
    bk_chunk_size: int = 256
    reset_token: int | None = 0
    backend: Literal["torch", "triton", "fla"] = "torch"
    use_triton: bool = False

    def __post_init__(self) -> None:
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "chunk_size", "bk_chunk_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"config.{key} must be positive, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"config.d_model ({self.d_model}) must be divisible by config.n_heads ({self.n_heads}): "
                             "each head's Gamma drives d_model / n_heads BK channels")
        for f in dataclasses.fields(self):  # NaN/inf pass every comparison below: refuse them first
            values = getattr(self, f.name)
            for v in values if isinstance(values, (tuple, list)) else (values,):
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError(f"config.{f.name} must be finite, got {values}")
        if self.norm_eps <= 0:
            raise ValueError(f"config.norm_eps must be > 0, got {self.norm_eps}")
        if self.base_decay < 0:
            raise ValueError(f"config.base_decay must be >= 0, got {self.base_decay}")
        for key in ("delta", "bk_eta", "hebbian_eta"):
            if getattr(self, key) <= 0:
                raise ValueError(f"config.{key} must be positive, got {getattr(self, key)}")
        if self.snr_threshold is not None and self.snr_threshold <= 0:
            raise ValueError(f"config.snr_threshold must be positive or null, got {self.snr_threshold}")
        for key in ("gamma_bounds", "eta_bounds"):
            lo, hi = getattr(self, key)
            if not 1.0 <= lo <= hi:
                raise ValueError(f"config.{key} must satisfy 1 <= low <= high, got {(lo, hi)}")
        if not 0.0 <= self.resonance_damping < 1.0:
            raise ValueError(f"config.resonance_damping must be in [0, 1), got {self.resonance_damping}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"config.dropout must be in [0, 1), got {self.dropout}")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ValueError(f"config.intermediate_size must be positive or null, got {self.intermediate_size}")
        if self.reset_token is not None and not 0 <= self.reset_token < self.vocab_size:
            raise ValueError(f"config.reset_token must be a token id below vocab_size or null, got {self.reset_token}")
        choices = {"norm_class": ("LayerNorm", "RMSNorm"), "mlp_class": ("GptNeoxMLP", "LLaMAMLP")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"config.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.backend not in MEMORY_BACKENDS:
            raise ValueError(f"config.backend must be one of {MEMORY_BACKENDS}, got {self.backend!r}")
        if self.use_triton and self.backend == "torch":
            self.backend = "triton"
        if self.backend != "torch" and self.resonance_damping > 0:
            raise ValueError(f"config.backend {self.backend!r} has no resonance damping: set resonance_damping: 0.0 "
                             "or backend: torch")
        if self.backend != "torch" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"config.backend {self.backend!r} needs a CUDA GPU (none here): use backend: torch")
        if self.backend == "fla" and not HAS_FLA:
            raise ValueError("config.backend 'fla' needs the optional package fla-core: pip install fla-core")
        self.gamma_bounds, self.eta_bounds = tuple(self.gamma_bounds), tuple(self.eta_bounds)

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size or 4 * self.d_model

    @classmethod
    def from_preset(cls, name: str, **overrides) -> Phase2Config:
        """``small`` / ``base`` / ``large`` sizes (:data:`PRESETS`), any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown Phase 2 preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


class LayerState(NamedTuple):
    """What one block carries between calls: the BK mixer's last g (B, d_model), complex, or None, and the
    fast-weight memory state."""

    bk: Tensor | None
    memory: FastWeightState


def bk_mix(mixer: BKMixer, x: Tensor, decay: Tensor, state: Tensor | None, reset: Tensor | None
           ) -> tuple[Tensor, Tensor]:
    """BKMixer forward with document resets: the coupling k_t of a reset token to its predecessor is zeroed, so
    g_t = 1 / d_t restarts there (and ``state`` is ignored for a row whose first token is a reset). Without
    resets this is exactly ``mixer(x, state, decay, return_state=True)`` (a test checks it)."""
    y, g = mixer.mix(x, state, decay, reset)
    return y, g[..., -1, :]


class Phase2Block(nn.Module):
    """``h = norm_1(x); x + BK(h, decay=Gamma(h)) + Memory(h)``, then ``+ MLP(norm_2(x))``."""

    def __init__(self, config: Phase2Config, index: int = 0) -> None:
        super().__init__()
        c = config
        self.norm_1 = create_norm(c.norm_class, c.d_model, c.norm_eps, True)
        self.norm_2 = create_norm(c.norm_class, c.d_model, c.norm_eps, True)
        self.memory = DissipativeHebbianMemory(
            c.d_model, c.n_heads, c.head_dim, base_decay=c.base_decay, hebbian_eta=c.hebbian_eta,
            snr_threshold=c.snr_threshold, chunk_size=c.chunk_size, delta=c.delta, gamma_bounds=c.gamma_bounds,
            eta_bounds=c.eta_bounds, resonance_damping=c.resonance_damping, num_basis_seed=index,
            resonance_threshold=c.resonance_threshold, backend=c.backend)
        self.bk = (BKMixer(c.d_model, eta=c.bk_eta, chunk_size=c.bk_chunk_size,
                           backend="torch" if c.backend == "torch" else "triton") if c.bk_enabled else None)
        self.mlp = create_mlp(c.mlp_class, c.d_model, c.mlp_size, True)
        self.drop = nn.Dropout(c.dropout)
        self.channels_per_head = c.d_model // c.n_heads

    def bk_decay(self, gamma: Tensor) -> Tensor:
        """Gamma per head (B, N, H) -> per BK channel (B, N, d_model)."""
        return gamma.repeat_interleave(self.channels_per_head, dim=-1)

    def forward(self, x: Tensor, state: LayerState | None, reset: Tensor | None, scan: str = "chunked"
                ) -> tuple[Tensor, LayerState]:
        h = self.norm_1(x)
        mem_out, mem_state = self.memory(h, None if state is None else state.memory, reset, return_state=True,
                                         scan=scan)
        mixed, bk_state = mem_out, None
        if self.bk is not None:
            gamma = self.memory.gamma(h)  # the Gamma the memory decays with, now the BK potential's imaginary part
            bk_out, bk_state = bk_mix(self.bk, h, self.bk_decay(gamma), None if state is None else state.bk, reset)
            mixed = mixed + bk_out
        x = x + self.drop(mixed)
        x = x + self.drop(self.mlp(self.norm_2(x)))
        return x, LayerState(bk_state, mem_state)


#: Diagnostics averaged over blocks (gamma_min / gamma_max take the min / max, snr_* ignore NaN).
DIAGNOSTIC_KEYS = ("gamma_mean", "gamma_std", "gamma_min", "gamma_max", "snr_mean", "snr_low_ratio", "resonant_modes",
                   "resonance_energy", "stability_ratio", "fast_weight_energy")


class Phase2LM(nn.Module):
    """Embedding -> Phase 2 blocks -> final norm -> head tied to the embedding.

    ``forward(idx, state=None, return_state=False, scan="chunked")``: logits (B, N, vocab) and, with
    ``return_state``, the per-block :class:`LayerState` list to continue from.
    """

    #: ``forward(idx, state, return_state=True)`` continues a sequence (:func:`models.lm.sampling.generate`)
    carries_state = True

    def __init__(self, config: Phase2Config | None = None) -> None:
        super().__init__()
        self.config = config = config or Phase2Config()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.wte.weight, 0.0, 0.02)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Phase2Block(config, i) for i in range(config.n_layers))
        self.ln_f = create_norm(config.norm_class, config.d_model, config.norm_eps, True)

    def reset_mask(self, idx: Tensor) -> Tensor | None:
        """(B, N) bool, True at every document start (``reset_token``); None when documents are not marked."""
        return None if self.config.reset_token is None else idx == self.config.reset_token

    def forward(self, idx: Tensor, state: list[LayerState] | None = None, return_state: bool = False,
                scan: str = "chunked") -> Tensor | tuple[Tensor, list[LayerState]]:
        if state is not None and len(state) != len(self.blocks):
            raise ValueError(f"state has {len(state)} layers, the model {len(self.blocks)}")
        reset = self.reset_mask(idx)
        x = self.drop(self.wte(idx))
        new_state = []
        for i, block in enumerate(self.blocks):
            x, layer_state = block(x, None if state is None else state[i], reset, scan)
            new_state.append(layer_state)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied head
        return (logits, new_state) if return_state else logits

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, top_p: float | None = None,
                 on_token: Callable[[Tensor], None] | None = None) -> Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx (B, T)`` (``temperature=0``: greedy). The prompt runs
        once; every new token is one step on the carried state (O(1) per token, no re-reading)."""
        return generate_with_state(self, idx, max_new_tokens, temperature, top_k, generator, top_p, on_token)

    def diagnostics(self) -> dict[str, Tensor]:
        """Memory diagnostics of the last forward over all blocks, detached 0-dim tensors (no host sync):
        gamma_min / gamma_max are the extremes over blocks, the others block means (snr_* over blocks with a
        defined value); ``bk_max_abs_g`` is the largest |g| of the BK mixers. Empty before the first forward."""
        per_block = [b.memory.diagnostics() for b in self.blocks]
        if not per_block or not per_block[0]:
            return {}
        out = {}
        for key in DIAGNOSTIC_KEYS:
            values = torch.stack([d[key].float() for d in per_block])
            if key == "gamma_min":
                out[key] = values.min()
            elif key == "gamma_max":
                out[key] = values.max()
            else:
                out[key] = values.nanmean()
        stats = [b.bk.stats() for b in self.blocks if b.bk is not None]
        if stats and stats[0]:
            out["bk_max_abs_g"] = torch.stack([s["max_abs_g"].float() for s in stats]).max()
        return out

    def health_signals(self) -> dict[str, Tensor]:
        """Larger = less healthy (for ``StabilityMonitor``): ``gamma_max`` (forgetting out of range high),
        ``memory_horizon`` = 1 / (gamma_min delta), the longest memory in tokens (out of range low), and
        ``memory_over_bound`` = 1 - stability_ratio, the share of memory states above their Lyapunov bound."""
        diag = self.diagnostics()
        if not diag:
            return {}
        return {"gamma_max": diag["gamma_max"], "memory_horizon": 1.0 / (diag["gamma_min"] * self.config.delta),
                "memory_over_bound": 1.0 - diag["stability_ratio"]}
