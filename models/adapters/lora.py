"""LoRA core shared by every adaptlab family (pure PyTorch, no Lightning).

A :class:`LoRAAdapter` is one low-rank update ``delta(x) = scaling * B A x``; a :class:`LoRALinear`
wraps a frozen linear layer and sums any number of named adapters on top of it:

    y = base(x) + sum_k scaling_k * B_k A_k dropout_k(x)

One adapter named ``"default"`` is plain LoRA; two (``"slow"`` and ``"fast"``) is Nested LoRA; a
standalone adapter with ``in == out`` is a Skip2-LoRA branch. ``A`` is Kaiming-uniform and ``B`` zeros,
so a freshly injected layer computes exactly what the base layer computed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Literal, Sequence

import torch
from torch import nn

from models.module_swap import find_modules, replace_modules
from models.utils.atomic import atomic_path

BiasMode = Literal["none", "all", "lora_only"]
TargetSpec = None | str | Sequence[str]

#: Default targets for timm ViTs (ViT, DeiT, Eva/DINOv3): attention qkv (fused or split) and output
#: projection, MLP fc1/fc2 (SwiGLU variants included). Matched against the module's full name.
TIMM_VIT_DEFAULT_TARGETS: tuple[str, ...] = (
    r"(^|\.)blocks\.\d+\.attn\.(qkv|q_proj|k_proj|v_proj|proj)$",
    r"(^|\.)blocks\.\d+\.mlp\.(fc1|fc1_g|fc1_x|fc2)$",
)
#: Last name components treated as the classifier/output head, never targeted by ``"all-linear"``.
HEAD_NAMES: tuple[str, ...] = ("head", "lm_head", "classifier")


class LoRAAdapter(nn.Module):
    """One low-rank update: ``forward(x) = scaling * dropout(x) @ A^T @ B^T``.

    Args:
        in_features: input width of the wrapped (or virtual) linear map.
        out_features: output width.
        r: rank, must be positive.
        lora_alpha: scaling numerator; ``scaling = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
        lora_dropout: dropout on the adapter's input only.
        use_rslora: use the rank-stabilised scaling ``alpha / sqrt(r)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        lora_alpha: float = 1.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank `r` must be a positive integer, got {r!r}")
        if r > min(in_features, out_features):
            raise ValueError(
                f"LoRA rank `r`={r} is larger than the layer allows "
                f"(min(in_features={in_features}, out_features={out_features}))"
            )
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"`lora_dropout` must be in [0, 1), got {lora_dropout}")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.lora_alpha, self.use_rslora = float(lora_alpha), use_rslora
        self.scaling = self.lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, r))
        self.dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A Kaiming-uniform (as ``nn.Linear`` does), B zeros: the update starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The dense update ``scaling * B @ A`` with the shape of the wrapped weight (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x).to(self.lora_A.dtype)
        return (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def extra_repr(self) -> str:
        return f"{self.in_features}->{self.out_features}, r={self.r}, scaling={self.scaling:g}"


class LoRALinear(nn.Module):
    """A frozen linear layer plus named, summed LoRA adapters.

    ``base`` is usually an ``nn.Linear``; any module with ``in_features``/``out_features`` (such as a
    4-bit quantized linear) works, except that :meth:`merge` needs a floating-point ``weight``.
    The base weight is frozen; its bias is kept (and trainable only under ``bias="all"/"lora_only"``).
    """

    def __init__(
        self,
        base: nn.Module,
        r: int | None = None,
        lora_alpha: float = 1.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        adapter_name: str = "default",
    ) -> None:
        super().__init__()
        if isinstance(base, LoRALinear):
            raise ValueError("this layer already has LoRA: add adapters with `add_adapter` instead")
        for attr in ("in_features", "out_features"):
            if not hasattr(base, attr):
                raise TypeError(f"LoRALinear needs a linear-like base with `{attr}`, got {type(base).__name__}")
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        weight = getattr(base, "weight", None)
        if isinstance(weight, nn.Parameter):
            weight.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        self.merged_adapters: list[str] = []
        if r is not None:
            self.add_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora)

    def add_adapter(
        self,
        name: str,
        r: int,
        lora_alpha: float = 1.0,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
    ) -> LoRAAdapter:
        """Add a new adapter summed with the existing ones; returns it."""
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if self.merged_adapters:
            raise RuntimeError("unmerge() before adding an adapter")
        ref = getattr(self.base, "weight", None)
        adapter = LoRAAdapter(self.in_features, self.out_features, r, lora_alpha, lora_dropout, use_rslora)
        if isinstance(ref, torch.Tensor) and ref.is_floating_point():
            adapter.to(device=ref.device)
        self.adapters[name] = adapter
        return adapter

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (without the adapters' update), for code that reads ``layer.weight``."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base, "bias", None)

    def delta_weight(self, names: Iterable[str] | None = None) -> torch.Tensor:
        """Sum of the chosen adapters' dense updates (all adapters by default)."""
        names = list(self.adapters) if names is None else list(names)
        return sum((self.adapters[n].delta_weight() for n in names), torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for name, adapter in self.adapters.items():
            if name not in self.merged_adapters:
                y = y + adapter(x).to(y.dtype)
        return y

    def _float_weight(self) -> nn.Parameter:
        w = getattr(self.base, "weight", None)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise TypeError(
                f"cannot merge LoRA into a {type(self.base).__name__} base (no floating-point weight); "
                "dequantize it first"
            )
        return w

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every unmerged adapter's ``scaling * B @ A`` into the base weight."""
        w = self._float_weight()
        for name, adapter in self.adapters.items():
            if name not in self.merged_adapters:
                w += adapter.delta_weight().to(w.dtype)
                self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapters' updates again (exact up to float rounding)."""
        w = self._float_weight()
        for name in reversed(self.merged_adapters):
            w -= self.adapters[name].delta_weight().to(w.dtype)
        self.merged_adapters.clear()

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)


def _resolve_targets(target_modules: TargetSpec) -> list[str] | None:
    """Turn a target spec into regex patterns; ``None`` means 'every linear that is not a head'."""
    if target_modules is None:
        return list(TIMM_VIT_DEFAULT_TARGETS)
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return None
        return [target_modules]
    if not target_modules:
        raise ValueError("`target_modules` is an empty list; use None, 'all-linear' or a list of names")
    return list(target_modules)


def _is_head(name: str) -> bool:
    return name.split(".")[-1] in HEAD_NAMES or name.startswith("head.")


def inject_lora(
    model: nn.Module,
    target_modules: TargetSpec = None,
    exclude_modules: Sequence[str] = (),
    r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    use_rslora: bool = False,
    bias: BiasMode = "none",
    adapter_name: str = "default",
) -> list[str]:
    """Replace matching ``nn.Linear`` layers of ``model`` in place by :class:`LoRALinear`.

    Args:
        target_modules: ``None`` = the timm ViT default (attention ``qkv``/``proj``, MLP ``fc1``/``fc2``
            inside ``blocks``); ``"all-linear"`` = every linear except the output head
            (``head``/``lm_head``/``classifier``); or a list of exact names, name suffixes
            (``"qkv"``) or regular expressions matched against the full module name.
        exclude_modules: same forms; matching modules are skipped.
        bias: which biases train afterwards (applied via :func:`mark_only_lora_as_trainable`).

    Returns:
        The full names of the replaced modules, in model order.

    Raises:
        ValueError: when nothing matches (the message lists the available linear layers), when ``r <= 0``,
            or when the model already has LoRA layers.
    """
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"LoRA rank `r` must be a positive integer, got {r!r}")
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"`bias` must be 'none', 'all' or 'lora_only', got {bias!r}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError(
            "model already has LoRA layers (inject_lora was called twice); call merge_and_unload first "
            "or use LoRALinear.add_adapter for a second adapter"
        )
    patterns = _resolve_targets(target_modules)
    include = (lambda name: not _is_head(name)) if patterns is None else patterns
    chosen = find_modules(model, nn.Linear, include, exclude_modules, what=f"target_modules={target_modules!r}")
    replace_modules(model, chosen, lambda _, base: LoRALinear(base, r, lora_alpha, lora_dropout, use_rslora,
                                                              adapter_name))
    mark_only_lora_as_trainable(model, bias=bias)
    return chosen


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """All :class:`LoRALinear` layers of ``model`` by full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def mark_only_lora_as_trainable(model: nn.Module, bias: BiasMode = "none") -> None:
    """Freeze everything except LoRA adapter parameters and the chosen biases.

    ``bias="all"`` trains every bias in the model; ``"lora_only"`` trains the biases of LoRA-wrapped layers.
    """
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"`bias` must be 'none', 'all' or 'lora_only', got {bias!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, LoRAAdapter):
            for p in m.parameters():
                p.requires_grad_(True)
    if bias == "all":
        for n, p in model.named_parameters():
            if n == "bias" or n.endswith(".bias"):
                p.requires_grad_(True)
    elif bias == "lora_only":
        for layer in lora_layers(model).values():
            if layer.bias is not None:
                layer.bias.requires_grad_(True)


def lora_state_dict(model: nn.Module, bias: BiasMode = "none") -> dict[str, torch.Tensor]:
    """The adapter-only state: every LoRA A/B (and the biases ``bias`` selects), detached copies."""
    keep = {n for n, m in model.named_modules() if isinstance(m, LoRAAdapter)}
    if bias == "lora_only":
        keep |= {f"{n}.base" for n in lora_layers(model)}
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        is_bias = leaf == "bias"
        if (owner in keep and (leaf.startswith("lora_") or is_bias)) or (bias == "all" and is_bias):
            out[key] = value.detach().clone()
    return out


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load an adapter-only state dict; every key must exist in the model with the same shape."""
    own = model.state_dict()
    missing_adapters = [k for k in lora_state_dict(model) if k not in state_dict]
    unknown = [k for k in state_dict if k not in own]
    if unknown:
        raise KeyError(f"adapter state has keys the model lacks (was LoRA injected the same way?): {unknown[:5]}")
    if missing_adapters:
        raise KeyError(f"adapter state lacks keys the model has: {missing_adapters[:5]}")
    for k, v in state_dict.items():
        if own[k].shape != v.shape:
            raise ValueError(f"shape mismatch for {k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}")
    model.load_state_dict(state_dict, strict=False)


def save_lora(model: nn.Module, path: str | Path, bias: BiasMode = "none", metadata: dict | None = None) -> Path:
    """Write the adapter-only state to a ``.safetensors`` file (atomically: temp file then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.contiguous() for k, v in lora_state_dict(model, bias).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


def load_lora(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Load adapters saved by :func:`save_lora` into a model with the same LoRA layout; returns metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA adapter file not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    load_lora_state_dict(model, load_file(str(path)))
    return metadata


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter into its base weight and put plain ``nn.Linear`` layers back; returns ``model``."""
    for name, layer in list(lora_layers(model).items()):
        layer.merge()
        model.set_submodule(name, layer.base)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
