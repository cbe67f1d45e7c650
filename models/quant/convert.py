"""Model-wide 4-bit conversion: swap every ``nn.Linear`` (LoRA bases included) for a 4-bit layer, back again,
and report how many bytes the linear weights take."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from models.adapters.lora import LoRALinear
from models.module_swap import find_modules, matches, replace_modules
from models.quant.linear4bit import Linear4bit
from models.quant.nf4 import (
    DOUBLE_QUANT_BLOCK_SIZE,
    QuantMode,
    QuantType,
    _check_block_size,
    _check_quant_type,
    auto_compute_dtype,
    resolve_compute_dtype,
    resolve_double_quant,
)


def _parent(model: nn.Module, name: str) -> nn.Module:
    parent_name = name.rpartition(".")[0]
    return model.get_submodule(parent_name) if parent_name else model


def _skip_match_name(model: nn.Module, name: str) -> str:
    """The name ``skip_modules`` is matched against: a LoRA layer's ``base`` goes by the LoRA layer's name."""
    parent_name = name.rpartition(".")[0]
    return parent_name if name.endswith(".base") and isinstance(_parent(model, name), LoRALinear) else name


def _quantizable(model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """Linears with a float weight (not already quantized), except those ``nn.MultiheadAttention`` owns (it
    reads ``out_proj.weight`` directly)."""
    return lambda name, m: m.weight.is_floating_point() and not isinstance(_parent(model, name), nn.MultiheadAttention)


def _hf_linear4bit(
    linear: nn.Linear, quant_type: str, compute_dtype: torch.dtype, double_quant: bool, block_size: int
) -> nn.Module:
    """bitsandbytes' ``Linear4bit`` holding ``linear``'s weights (quantized when moved to the GPU)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
        compress_statistics=double_quant, quant_type=quant_type, device=linear.weight.device,
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.detach().clone(), requires_grad=False, compress_statistics=double_quant,
        quant_type=quant_type, blocksize=block_size,
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    return layer


def quantize_model(
    model: nn.Module,
    quant_type: QuantType = "nf4",
    compute_dtype: str | torch.dtype = "auto",
    skip_modules: Sequence[str] | None = (),
    use_double_quant: bool | None = None,
    mode: QuantMode = "manual",
    block_size: int = 64,
    compress_statistics: bool | None = None,
    save_dequantized: bool = False,
) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` in place by a 4-bit layer; returns the replaced names.

    Args:
        quant_type: ``"nf4"`` or ``"fp4"``.
        compute_dtype: dtype of the dequantized weight and the matmul (string or torch dtype); ``"auto"`` =
            bfloat16 where the device computes it natively, else float32 (decided when the layer runs; for
            ``mode="hf"``, decided for CUDA now).
        skip_modules: names, name suffixes or regexes (matched like LoRA ``target_modules``) kept in full
            precision. The ``base`` of a LoRA layer is matched under the LoRA layer's name. Nothing is
            skipped by default, the output head included: list it (``"head"``) to keep it full precision.
        use_double_quant: quantize the absmax statistics too (~4.127 instead of 4.5 bits per parameter);
            ``None`` = not set (see ``compress_statistics``).
        mode: ``"manual"`` (this module, any device) or ``"hf"`` (``bitsandbytes.nn.Linear4bit``, which
            quantizes when the model moves to the GPU).
        compress_statistics: bitsandbytes' name for ``use_double_quant``. Neither set: double quantization
            on; one set: its value; both set: on when either is true (:func:`models.quant.nf4.resolve_double_quant`).
        save_dequantized: keep each weight's dense forward copy for the backward (one dequantization per
            step instead of two, more memory during the step); ``manual`` mode only.

    LoRA adapters are not ``nn.Linear`` and stay full precision: call ``inject_lora`` first, then this.

    Raises:
        ValueError: bad option, a ``skip_modules`` entry matching no linear, or nothing left to quantize.
        ImportError: ``mode="hf"`` without bitsandbytes.
    """
    _check_quant_type(quant_type)
    _check_block_size(block_size)
    dtype = resolve_compute_dtype(compute_dtype)
    double_quant = resolve_double_quant(use_double_quant, compress_statistics)
    if mode not in ("manual", "hf"):
        raise ValueError(f"quantization `mode` must be 'manual' or 'hf', got {mode!r}")
    if mode == "hf" and save_dequantized:
        raise ValueError("quantization `save_dequantized` is a `mode: manual` option (bitsandbytes always "
                         "dequantizes again in the backward)")
    skip_modules = [skip_modules] if isinstance(skip_modules, str) else list(skip_modules or [])
    if mode == "hf":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as err:
            raise ImportError(
                "quantization `mode: hf` needs the `bitsandbytes` package, which is not installed "
                "(pip install bitsandbytes, CUDA); use `mode: manual` for the built-in pure-PyTorch 4-bit layers"
            ) from err
    candidates = find_modules(model, nn.Linear, accept=_quantizable(model), what="quantize_model (already quantized?)")
    skip_names = {name: _skip_match_name(model, name) for name in candidates}
    for pattern in skip_modules:
        if not any(matches(m, [pattern]) for m in skip_names.values()):
            shown = ", ".join(list(skip_names.values())[:40])
            raise ValueError(
                f"quantization `skip_modules` entry {pattern!r} matches no linear layer; available: {shown}"
            )
    chosen = [name for name, m in skip_names.items() if not (skip_modules and matches(m, skip_modules))]
    if not chosen:
        raise ValueError(f"quantize_model found no nn.Linear to quantize in {type(model).__name__} "
                         f"(skip_modules={list(skip_modules)} skips them all)")

    def build(_: str, linear: nn.Module) -> nn.Module:
        if mode == "hf":
            hf_dtype = auto_compute_dtype("cuda") if dtype == "auto" else dtype
            return _hf_linear4bit(linear, quant_type, hf_dtype, double_quant, block_size)
        return Linear4bit.from_linear(linear, quant_type, dtype, double_quant, block_size, save_dequantized)

    return replace_modules(model, chosen, build)


def dequantize_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Put plain ``nn.Linear`` layers (dequantized weights, frozen) back for every :class:`Linear4bit`.

    Used before ``merge_and_unload`` to fold LoRA adapters into dense weights; returns the replaced names.
    """
    def build(_: str, q: nn.Module) -> nn.Linear:
        w = q.dequantize_weight(dtype)
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=w.device, dtype=dtype)
        linear.weight = nn.Parameter(w, requires_grad=False)
        if q.bias is not None:
            linear.bias = nn.Parameter(q.bias.detach().to(dtype), requires_grad=q.bias.requires_grad)
        return linear

    return replace_modules(model, [n for n, m in model.named_modules() if isinstance(m, Linear4bit)], build)


def quantized_storage_bytes(model: nn.Module) -> int:
    """Bytes of every :class:`Linear4bit` weight in ``model`` (codes + statistics, biases excluded)."""
    return sum(m.storage_bytes() for m in model.modules() if isinstance(m, Linear4bit))


def _is_hf_4bit(m: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` (recognised by its ``Params4bit`` weight, so bitsandbytes need not be
    imported): an ``nn.Linear`` whose weight carries ``quant_type``, ``blocksize`` and ``compress_statistics``."""
    w = getattr(m, "weight", None)
    return isinstance(m, nn.Linear) and all(hasattr(w, a) for a in ("quant_type", "blocksize", "compress_statistics"))


def hf_4bit_storage_bytes(m: nn.Module) -> int:
    """Bytes of a bitsandbytes ``Linear4bit`` weight in its 4-bit storage format, counted like
    :meth:`Linear4bit.storage_bytes` (codes + per-layer statistics; the shared code tables are not counted).

    bitsandbytes quantizes when the layer moves to the GPU; before that the weight is still float, and after
    it ``weight`` is the packed ``uint8`` tensor (``numel = params / 2``), so neither can be read off the
    tensor. The format is the same as ``mode: manual``'s: ``ceil(n / blocksize)`` blocks of ``blocksize``
    4-bit codes, one fp32 absmax per block, or with ``compress_statistics`` one uint8 per block plus an fp32
    scale per 256 blocks and an fp32 offset.
    """
    n = m.in_features * m.out_features
    blocksize = int(m.weight.blocksize)
    n_blocks = max(1, -(-n // blocksize))
    codes = n_blocks * blocksize // 2
    if m.weight.compress_statistics:
        return codes + n_blocks + 4 * -(-n_blocks // DOUBLE_QUANT_BLOCK_SIZE) + 4
    return codes + 4 * n_blocks


def linear_weight_report(model: nn.Module) -> dict[str, float]:
    """Storage of all linear weights (``nn.Linear`` at their dtype, :class:`Linear4bit` and bitsandbytes'
    ``Linear4bit`` in their 4-bit format, before or after bitsandbytes has quantized on the GPU).

    Returns ``params``, ``bytes``, ``bytes_per_param``, ``bits_per_param`` and ``ratio_vs_fp32``.
    """
    params = stored = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            params += m.in_features * m.out_features
            stored += m.storage_bytes()
        elif _is_hf_4bit(m):
            params += m.in_features * m.out_features
            stored += hf_4bit_storage_bytes(m)
        elif isinstance(m, nn.Linear):
            params += m.weight.numel()
            stored += m.weight.numel() * m.weight.element_size()
    per = stored / params if params else 0.0
    return {"params": params, "bytes": stored, "bytes_per_param": per, "bits_per_param": 8 * per,
            "ratio_vs_fp32": per / 4}
