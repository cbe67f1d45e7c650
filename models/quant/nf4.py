"""The 4-bit NF4/FP4 codec (QLoRA style) in pure PyTorch: code tables, blockwise absmax, packing, double quant.

Frozen linear weights are split into blocks of ``block_size`` (64) values; each block stores its absmax
and one 4-bit code per value, the index of the nearest table value to ``w / absmax``. Two codes share a
byte, the first element in the high nibble (bitsandbytes' layout). With double quantization
(``use_double_quant``/``compress_statistics``) the fp32 absmax values are themselves quantized: their mean
is subtracted and the rest is quantized blockwise (blocks of 256) to 8 bits with bitsandbytes' signed
dynamic map, each block with its own fp32 scale: 4 + 8/64 + 32/(64*256) ~ 4.127 bits per parameter
instead of 4.5. Quantization is lossy by design; the tests measure the error.

:class:`models.quant.linear4bit.Linear4bit` keeps the packed codes and statistics as buffers and dequantizes to
``compute_dtype``
on every forward (a Triton kernel on CUDA, this module's torch code elsewhere). Gradients reach the input
through the dequantized weight; the 4-bit weight never gets one. :func:`models.quant.convert.quantize_model` swaps every
``nn.Linear`` (including the ``base`` of LoRA layers) in place, so QLoRA is ``inject_lora`` then
``quantize_model``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

QuantType = Literal["nf4", "fp4"]
QuantMode = Literal["manual", "hf"]

#: bitsandbytes' NF4 values (code 0..15), quantiles of N(0, 1) normalised to [-1, 1].
NF4_TABLE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

#: bitsandbytes' FP4 values (code 0..15): bit 3 = sign, bits 2-1 = exponent, bit 0 = mantissa. The raw
#: E2M1 magnitudes (0, 0.0625, 8, 12, 4, 6, 2, 3) are divided by 12 so the largest is 1.
FP4_TABLE: tuple[float, ...] = (
    0.0,
    0.005208333333,
    0.66666667,
    1.0,
    0.33333333,
    0.5,
    0.16666667,
    0.25,
    -0.0,
    -0.005208333333,
    -0.66666667,
    -1.0,
    -0.33333333,
    -0.5,
    -0.16666667,
    -0.25,
)

#: Block size of the second (8-bit) quantization of the absmax values, as in QLoRA.
DOUBLE_QUANT_BLOCK_SIZE = 256

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
}


def resolve_compute_dtype(compute_dtype: str | torch.dtype) -> torch.dtype | str:
    """``"bfloat16"``/``"float16"``/``"float32"`` (or aliases, or a torch dtype) -> torch dtype; ``"auto"`` stays
    ``"auto"`` (resolved per device by :func:`auto_compute_dtype` when the weight is used).

    ``float64`` is accepted for numerical checks (gradcheck).
    """
    if isinstance(compute_dtype, torch.dtype) and compute_dtype in _DTYPES.values():
        return compute_dtype
    if isinstance(compute_dtype, str):
        key = compute_dtype.removeprefix("torch.").lower()
        if key == "auto":
            return "auto"
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(
        f"quantization `compute_dtype` must be one of 'auto', 'bfloat16', 'float16', 'float32' "
        f"(or 'float64' for checks), got {compute_dtype!r}"
    )


def _cpu_flags() -> set[str]:
    """CPU feature flags from ``/proc/cpuinfo`` (``flags`` on x86, ``Features`` on ARM); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    return set()


_NATIVE_BF16: dict[str, bool] = {}


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 natively (not by converting to float32 and back).

    CUDA: ``torch.cuda.is_bf16_supported(including_emulation=False)`` (Ampere and newer). CPU: the
    ``avx512_bf16`` or ``amx_bf16`` flags (x86) or ``bf16`` (ARMv8.6), read from ``/proc/cpuinfo``; oneDNN's
    bf16 path on a CPU without them converts every element and is several times slower than float32.
    Other devices: False.
    """
    device = torch.device(device)
    if device.type not in _NATIVE_BF16:
        if device.type == "cuda":
            try:
                native = torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:  # older torch without the argument
                native = torch.cuda.is_bf16_supported()
        elif device.type == "cpu":
            native = bool(_cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})
        else:
            native = False
        _NATIVE_BF16[device.type] = native
    return _NATIVE_BF16[device.type]


def auto_compute_dtype(device: torch.device | str) -> torch.dtype:
    """``compute_dtype: auto``: bfloat16 where ``device`` computes it natively (:func:`native_bf16`), else
    float32."""
    return torch.bfloat16 if native_bf16(device) else torch.float32


def resolve_double_quant(use_double_quant: bool | None = None, compress_statistics: bool | None = None) -> bool:
    """Whether double quantization is on, from transformers' ``use_double_quant`` and bitsandbytes'
    ``compress_statistics`` (the same switch under two names; ``None`` = not set).

    Neither set: on (the QLoRA default). One set: that value. Both set: on when either is true, so
    ``use_double_quant: false`` alone turns it off, and only an explicit ``compress_statistics: true`` beside
    it turns it back on.
    """
    given = [bool(v) for v in (use_double_quant, compress_statistics) if v is not None]
    return any(given) if given else True


def _check_quant_type(quant_type: str) -> None:
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quantization `quant_type` must be 'nf4' or 'fp4', got {quant_type!r}")


def _check_block_size(block_size: int) -> None:
    if not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ValueError(f"quantization `block_size` must be a positive even integer, got {block_size!r}")


def code_table(quant_type: QuantType, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16 code values of ``quant_type`` as a float32 tensor."""
    _check_quant_type(quant_type)
    return torch.tensor(NF4_TABLE if quant_type == "nf4" else FP4_TABLE, dtype=torch.float32, device=device)


def dynamic_map_8bit() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted values in [-1, 1]) used for double quantization.

    For exponent ``i`` in 0..6 it holds the midpoints of ``2**i`` equal steps of [0.1, 1] scaled by
    ``10**(i - 6)``, with both signs (254 values), plus 0 and 1.
    """
    values: list[float] = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2.0) * (10.0 ** (i - 6))
        values += mids.tolist() + (-mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


_DYNAMIC_MAP = dynamic_map_8bit()


def _nearest_sorted(x: torch.Tensor, sorted_values: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value in an ascending table; ties go to the lower value (like bitsandbytes)."""
    mids = (sorted_values[1:] + sorted_values[:-1]) / 2
    return torch.bucketize(x, mids, right=False)


def encode_4bit(x: torch.Tensor, quant_type: QuantType) -> torch.Tensor:
    """4-bit codes (uint8, one per value) of values already normalised to [-1, 1].

    NF4: nearest table value. FP4: the sign bit comes from the sign of ``x`` and the other three bits
    from the nearest magnitude, as bitsandbytes does (so tiny negative values become -0, code 8).
    """
    x = x.float()
    if quant_type == "nf4":
        return _nearest_sorted(x, code_table("nf4", x.device)).to(torch.uint8)
    _check_quant_type(quant_type)
    mags = code_table("fp4", x.device)[:8]
    order = torch.argsort(mags)
    idx = order[_nearest_sorted(x.abs(), mags[order])]
    return (idx + 8 * (x < 0)).to(torch.uint8)


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, the first element in the high nibble; ``codes`` has an even number of values."""
    codes = codes.reshape(-1).to(torch.uint8)
    if codes.numel() % 2:
        raise ValueError(f"pack_4bit needs an even number of codes, got {codes.numel()}")
    return (codes[0::2] << 4) | codes[1::2]


def unpack_4bit(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_4bit`: one code (uint8) per value, in order."""
    return torch.stack((packed >> 4, packed & 0x0F), dim=-1).reshape(-1)


@dataclass
class QuantState:
    """Packed 4-bit weight plus what is needed to dequantize it.

    ``absmax`` (fp32, one per block) without double quantization; with it, ``absmax_q`` (uint8 codes of
    the dynamic map), ``absmax_scale`` (fp32, one per 256 blocks) and ``absmax_offset`` (fp32 scalar).
    """

    packed: torch.Tensor
    shape: torch.Size
    quant_type: str
    block_size: int
    absmax: torch.Tensor | None = None
    absmax_q: torch.Tensor | None = None
    absmax_scale: torch.Tensor | None = None
    absmax_offset: torch.Tensor | None = None

    @property
    def double_quant(self) -> bool:
        return self.absmax_q is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (packed codes and statistics)."""
        names = ("packed", "absmax", "absmax_q", "absmax_scale", "absmax_offset")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def nbytes(self) -> int:
        """Bytes actually stored (padding included; the shared code tables are not per-weight state)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization: ``absmax - mean`` to 8-bit dynamic-map codes in blocks of 256.

    Returns ``(codes uint8 [n], scales fp32 [ceil(n/256)], offset fp32 [])``.
    """
    absmax = absmax.float()
    offset = absmax.mean()
    centered = absmax - offset
    n = centered.numel()
    n_groups = -(-n // DOUBLE_QUANT_BLOCK_SIZE)
    padded = torch.zeros(n_groups * DOUBLE_QUANT_BLOCK_SIZE, dtype=torch.float32, device=absmax.device)
    padded[:n] = centered
    groups = padded.view(n_groups, DOUBLE_QUANT_BLOCK_SIZE)
    scale = groups.abs().amax(dim=1)
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    codes = _nearest_sorted(groups * inv[:, None], _DYNAMIC_MAP.to(absmax.device)).to(torch.uint8)
    return codes.reshape(-1)[:n].contiguous(), scale, offset


def dequantize_absmax(absmax_q: torch.Tensor, absmax_scale: torch.Tensor, absmax_offset: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_absmax` (fp32)."""
    code = cached_table("dynamic", absmax_q.device)[absmax_q.long()]
    scale = absmax_scale.float().repeat_interleave(DOUBLE_QUANT_BLOCK_SIZE)[: absmax_q.numel()]
    return code * scale + absmax_offset.float()


def quantize_4bit(
    w: torch.Tensor, quant_type: QuantType = "nf4", block_size: int = 64, double_quant: bool = False
) -> QuantState:
    """Blockwise absmax 4-bit quantization of any tensor (flattened, zero-padded to whole blocks)."""
    _check_quant_type(quant_type)
    _check_block_size(block_size)
    flat = w.detach().float().reshape(-1)
    n_blocks = max(1, -(-flat.numel() // block_size))
    padded = torch.zeros(n_blocks * block_size, dtype=torch.float32, device=w.device)
    padded[: flat.numel()] = flat
    blocks = padded.view(n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    packed = pack_4bit(encode_4bit(blocks * inv[:, None], quant_type))
    state = QuantState(packed=packed, shape=w.shape, quant_type=quant_type, block_size=block_size)
    if double_quant:
        state.absmax_q, state.absmax_scale, state.absmax_offset = quantize_absmax(absmax)
    else:
        state.absmax = absmax
    return state


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def cached_table(name: str, device: torch.device) -> torch.Tensor:
    """Constant tables cached per device (no host-to-device copy per forward).

    ``"nf4"``/``"fp4"``: the 16 values; ``"nf4-bytes"``/``"fp4-bytes"``: ``(256, 2)`` values of the
    (high, low) nibble of every byte; ``"dynamic"``: the 8-bit dynamic map.
    """
    key = (name, torch.device(device))
    if key not in _TABLES:
        if name == "dynamic":
            table = _DYNAMIC_MAP
        elif name.endswith("-bytes"):
            values, byte = code_table(name.removesuffix("-bytes")), torch.arange(256)  # type: ignore[arg-type]
            table = torch.stack((values[byte >> 4], values[byte & 15]), dim=1)
        else:
            table = code_table(name)  # type: ignore[arg-type]
        _TABLES[key] = table.to(device)
    return _TABLES[key]


def dequantize_packed(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_type: QuantType,
    block_size: int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Torch reference dequantization: ``table[code] * absmax[block]`` in fp32, cast to ``dtype``.

    One ``index_select`` per byte on the ``(256, 2)`` table of (high, low) nibble values (about 3x faster on
    CPU than advanced indexing), the block scale multiplied in place.
    """
    table = cached_table(f"{quant_type}-bytes", packed.device)
    values = torch.index_select(table, 0, packed.reshape(-1).int()).view(-1, block_size)
    values.mul_(absmax.float()[:, None])
    return values.reshape(-1)[: math.prod(shape)].view(*shape).to(dtype)


def dequantize_4bit(state: QuantState, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize a :class:`QuantState` to a dense tensor of its original shape."""
    absmax = state.absmax
    if state.double_quant:
        absmax = dequantize_absmax(state.absmax_q, state.absmax_scale, state.absmax_offset)
    return dequantize_packed(state.packed, absmax, state.quant_type, state.block_size, state.shape, dtype)


