"""A small LitGPT-style decoder-only transformer with LoRA and Skip2-LoRA (pure PyTorch).

Layout (names follow LitGPT where it has one): ``wte`` token embedding, optional ``wpe`` learned positions
(or rotary), ``blocks[i]`` = pre-norm attention (separate ``query``/``key``/``value``/``proj`` linears so
LoRA can target each) + MLP (``GptNeoxMLP``: fc -> GELU -> proj, or ``LLaMAMLP``: SwiGLU), ``ln_f``,
``lm_head``.

Skip2-LoRA (Matsutani et al., ASP-DAC 2025): for every selected block i, a standalone
:class:`models.adapters.skip2lora.Skip2LoRA` branch maps the block's output ``h_i`` to
``alpha/r * B_i A_i h_i``; the branches
are summed into the final normalised hidden state just before ``lm_head``. Nothing flows back into the
frozen blocks, so :meth:`GPT.forward_backbone` (frozen) and :meth:`GPT.forward_from_cache` (branches +
head) split the model at that point, which is what :mod:`models.cache.skip_cache` caches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.adapters.lora import inject_lora, mark_only_lora_as_trainable
from models.adapters.skip2lora import Skip2LoRA
from models.layers.create import create_mlp, create_norm
from models.layers.mlp import GptNeoxMLP
from models.layers.rotary import apply_rope, rope_cache
from models.lm.sampling import generate
from models.utils.checkpoint import CheckpointError, safe_load

#: Fields that define the weights' shapes; a checkpoint must agree on them.
ARCH_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias", "norm_class", "mlp_class",
               "intermediate_size", "position", "gelu_approximate")


@dataclass
class Config:
    """Architecture, LoRA and Skip2-LoRA options (LitGPT names where they exist).

    Standard LoRA is on when any ``lora_query/key/value/projection/mlp/head`` flag is true (rank
    ``lora_r``). Skip2-LoRA branches are on with ``skip2lora_enabled``; ``skip2lora_block_indices`` picks
    the blocks (``None`` = all, negative indices count from the end). With any adapter present, only
    adapters train.
    """

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 256
    vocab_size: int = 256
    bias: bool = True
    norm_class: Literal["LayerNorm", "RMSNorm"] = "LayerNorm"
    norm_eps: float = 1e-5
    mlp_class: Literal["GptNeoxMLP", "LLaMAMLP"] = "GptNeoxMLP"
    intermediate_size: int | None = None
    gelu_approximate: Literal["none", "tanh"] = "none"
    position: Literal["rotary", "learned"] = "rotary"
    rope_base: int = 10000
    dropout: float = 0.0
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_query: bool = False
    lora_key: bool = False
    lora_value: bool = False
    lora_projection: bool = False
    lora_mlp: bool = False
    lora_head: bool = False
    skip2lora_enabled: bool = False
    skip2lora_block_indices: list[int] | None = None
    skip2lora_output_layer: Literal["lm_head"] = "lm_head"
    skip2lora_r: int = 8
    skip2lora_alpha: float = 16.0

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"config.{key} must be positive, got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"config.n_embd ({self.n_embd}) must be divisible by config.n_head ({self.n_head})")
        if self.position == "rotary" and self.head_size % 2:
            raise ValueError(f"rotary positions need an even head size, got n_embd/n_head = {self.head_size}")
        choices = {"norm_class": ("LayerNorm", "RMSNorm"), "mlp_class": ("GptNeoxMLP", "LLaMAMLP"),
                   "position": ("rotary", "learned"), "skip2lora_output_layer": ("lm_head",),
                   "gelu_approximate": ("none", "tanh")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"config.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        for key in ("dropout", "lora_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"config.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.intermediate_size is not None and self.intermediate_size <= 0:
            raise ValueError(f"config.intermediate_size must be positive or null, got {self.intermediate_size}")
        if self.gelu_approximate != "none" and self.mlp_class != "GptNeoxMLP":
            raise ValueError("config.gelu_approximate applies to mlp_class GptNeoxMLP only (LLaMAMLP uses SiLU)")
        if self.lora_enabled and self.lora_r <= 0:
            raise ValueError(f"config.lora_r must be positive when a lora_* target is on, got {self.lora_r}")
        if self.skip2lora_enabled:
            if self.skip2lora_r <= 0:
                raise ValueError(f"config.skip2lora_r must be positive, got {self.skip2lora_r}")
            _ = self.skip_indices  # raises on bad skip2lora_block_indices

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size or 4 * self.n_embd

    @property
    def lora_enabled(self) -> bool:
        return any((self.lora_query, self.lora_key, self.lora_value, self.lora_projection, self.lora_mlp,
                    self.lora_head))

    @property
    def skip_indices(self) -> list[int]:
        """Skip2-LoRA block indices, normalised to ``0..n_layer-1`` (empty when disabled)."""
        if not self.skip2lora_enabled:
            return []
        raw = list(range(self.n_layer)) if self.skip2lora_block_indices is None else self.skip2lora_block_indices
        if not raw:
            raise ValueError("config.skip2lora_block_indices is empty; use null for all blocks")
        out = []
        for i in raw:
            if not isinstance(i, int) or not -self.n_layer <= i < self.n_layer:
                raise ValueError(
                    f"config.skip2lora_block_indices has {i!r}, outside [-{self.n_layer}, {self.n_layer - 1}] "
                    f"for n_layer={self.n_layer}"
                )
            out.append(i % self.n_layer)
        if len(set(out)) != len(out):
            raise ValueError(f"config.skip2lora_block_indices {raw} names a block twice (after resolving negatives)")
        return sorted(out)


def make_norm(config: Config) -> nn.Module:
    return create_norm(config.norm_class, config.n_embd, config.norm_eps, config.bias)


class TanhGeluMLP(GptNeoxMLP):
    """``GptNeoxMLP`` with the tanh approximation of GELU (GPT-2's ``gelu_new``; LitGPT ``gelu_approximate:
    tanh``); same weights and names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def make_mlp(config: Config) -> nn.Module:
    if config.gelu_approximate == "tanh":
        return TanhGeluMLP(config.n_embd, config.mlp_size, config.bias)
    return create_mlp(config.mlp_class, config.n_embd, config.mlp_size, config.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: Config) -> None:
        super().__init__()
        d = config.n_embd
        self.query = nn.Linear(d, d, bias=config.bias)
        self.key = nn.Linear(d, d, bias=config.bias)
        self.value = nn.Linear(d, d, bias=config.bias)
        self.proj = nn.Linear(d, d, bias=config.bias)
        self.n_head, self.dropout = config.n_head, config.dropout

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, -1).transpose(1, 2) for lin in (self.query, self.key, self.value))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm_1(x))``, then ``+ mlp(norm_2(x))``."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.norm_1, self.norm_2 = make_norm(config), make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.mlp = make_mlp(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm_1(x), rope))
        return x + self.drop(self.mlp(self.norm_2(x)))


def lora_target_patterns(config: Config) -> list[str]:
    """Module-name regexes for the enabled ``lora_*`` flags."""
    flags = {
        "lora_query": r"^blocks\.\d+\.attn\.query$",
        "lora_key": r"^blocks\.\d+\.attn\.key$",
        "lora_value": r"^blocks\.\d+\.attn\.value$",
        "lora_projection": r"^blocks\.\d+\.attn\.proj$",
        "lora_mlp": r"^blocks\.\d+\.mlp\.(fc|fc_1|fc_2|proj)$",
        "lora_head": r"^lm_head$",
    }
    return [pattern for flag, pattern in flags.items() if getattr(config, flag)]


class GPT(nn.Module):
    """Decoder-only transformer; ``forward(idx) -> logits (B, T, vocab_size)``.

    With LoRA or Skip2-LoRA adapters in the config, everything but the adapters is frozen.
    """

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.position == "rotary":
            cos, sin = rope_cache(config.block_size, config.head_size, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        self.skip_indices = config.skip_indices
        self.skip2lora = Skip2LoRA(config.n_embd, len(self.skip_indices), config.skip2lora_r, config.skip2lora_alpha,
                                  block_indices=self.skip_indices)
        if config.lora_enabled:
            inject_lora(self, lora_target_patterns(config), r=config.lora_r, lora_alpha=config.lora_alpha,
                        lora_dropout=config.lora_dropout)
        if config.lora_enabled or self.skip_indices:
            mark_only_lora_as_trainable(self)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def backbone_modules(self) -> dict[str, nn.Module]:
        """Everything upstream of the Skip2-LoRA merge point (what the Skip-Cache assumes frozen)."""
        mods = {"wte": self.wte, "drop": self.drop, "ln_f": self.ln_f}
        if self.wpe is not None:
            mods["wpe"] = self.wpe
        mods.update({f"blocks.{i}": b for i, b in enumerate(self.blocks)})
        return mods

    def forward_backbone(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Frozen part: ``final`` = ``ln_f`` of the last block ``(B, T, C)`` and, with Skip2-LoRA, ``skip`` =
        the selected blocks' outputs ``(B, K, T, C)``."""
        T = idx.size(1)
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds config.block_size={self.config.block_size}")
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(T, device=idx.device))
        rope = (self.rope_cos[:T], self.rope_sin[:T]) if self.wpe is None else None
        x = self.drop(x)
        skips = []
        for i, block in enumerate(self.blocks):
            x = block(x, rope)
            if i in self.skip_indices:
                skips.append(x)
        out = {"final": self.ln_f(x)}
        if skips:
            out["skip"] = torch.stack(skips, dim=1)
        return out

    def forward_from_cache(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        """Trainable part: ``final + sum_i alpha/r B_i A_i h_i``, then ``lm_head``."""
        x = features["final"]
        if len(self.skip2lora):
            x = x + self.skip2lora(features["skip"]).to(x.dtype)
        return self.lm_head(x)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.forward_from_cache(self.forward_backbone(idx))

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
        generator: torch.Generator | None = None, top_p: float | None = None,
        on_token: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx (B, T)`` (``temperature=0``: greedy). No KV cache:
        each step re-reads the last ``block_size`` tokens, which is fine for short samples."""
        return generate(self, idx, max_new_tokens, temperature, top_k, generator, top_p, on_token,
                        block_size=self.config.block_size)


def _canonical(key: str) -> str:
    """State-dict key without LoRA wrapping (``attn.query.base.weight`` -> ``attn.query.weight``)."""
    return key.replace(".base.", ".")


def _is_adapter_key(key: str) -> bool:
    return key.startswith("skip2lora.") or ".adapters." in key


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Weights from a ``.safetensors``/``.pt`` state dict or a Lightning ``.ckpt`` (``model.`` prefix
    stripped); also returns the checkpoint's model config when it has one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GPT checkpoint {str(path)!r} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), None
        except Exception as e:  # safetensors raises its own error type on a truncated or foreign file
            raise CheckpointError(f"GPT checkpoint {str(path)!r} is not a readable safetensors file ({e})") from e
    # weights_only loading; our own Config dataclass (in a checkpoint's hyper-parameters) is let through.
    obj = safe_load(path, what="GPT checkpoint")
    config = None
    if isinstance(obj, dict) and "state_dict" in obj:
        cfg = (obj.get("hyper_parameters") or {}).get("config")
        config = asdict(cfg) if isinstance(cfg, Config) else cfg if isinstance(cfg, dict) else None
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{str(path)!r} holds a {type(obj).__name__}, not a state dict or Lightning checkpoint")
    if obj and all(k.startswith("model.") for k in obj):
        obj = {k[len("model."):]: v for k, v in obj.items()}
    return obj, config


def load_pretrained(model: GPT, path: str | Path) -> list[str]:
    """Load backbone weights (and matching adapters, if present) from a file; returns the loaded keys.

    Works whether or not ``model`` has LoRA layers. Raises when the file's architecture differs from
    ``model.config`` (naming the fields) or when backbone weights are missing.
    """
    state, saved_cfg = read_state_dict(path)
    return load_backbone_state(model, state, saved_cfg, source=f"checkpoint {str(path)!r}")


@torch.no_grad()
def load_backbone_state(
    model: GPT, state: dict[str, torch.Tensor], saved_cfg: dict | None = None, source: str = "state dict"
) -> list[str]:
    """:func:`load_pretrained` for an in-memory state dict (plain GPT keys map onto LoRA-wrapped layers)."""
    if saved_cfg is not None:
        diff = {k: (saved_cfg.get(k), getattr(model.config, k)) for k in ARCH_FIELDS
                if k in saved_cfg and saved_cfg[k] != getattr(model.config, k)}
        if diff:
            shown = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{source} was trained with another architecture ({shown})")
    own = model.state_dict()
    by_canonical = {_canonical(k): k for k in own if not _is_adapter_key(k)}
    loaded: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        target = key if key in own else by_canonical.get(_canonical(key))
        if target is None:
            unknown.append(key)
            continue
        if own[target].shape != value.shape:
            raise ValueError(
                f"{source}: {key} has shape {tuple(value.shape)}, model expects "
                f"{tuple(own[target].shape)} (does the config match the pre-training config?)"
            )
        loaded[target] = value
    missing = [k for k in by_canonical.values() if k not in loaded]
    if missing or unknown:
        raise KeyError(f"{source} does not match the GPT: missing {missing[:5]}, unknown {unknown[:5]}")
    for key, value in loaded.items():
        own[key].copy_(value)
    return sorted(loaded)
