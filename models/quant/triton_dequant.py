"""Triton kernel dequantizing packed 4-bit (NF4/FP4) weights, double-quantized statistics included.

One program handles ``BYTES`` packed bytes (``2 * BYTES`` values): it unpacks the high and low nibble,
looks both codes up in the 16-value table, rebuilds the block's absmax (directly, or from its 8-bit
dynamic-map code, the group's scale and the mean offset when double-quantized) and writes
``value * absmax`` in the output dtype. The torch code in :mod:`models.quant.nf4` is the reference;
:class:`models.quant.linear4bit.Linear4bit` calls this on CUDA tensors only. With ``TRITON_INTERPRET=1`` set
before this module is imported, the kernel runs on CPU tensors (how the tests check it).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from models.quant.nf4 import DOUBLE_QUANT_BLOCK_SIZE, QuantState, cached_table

_BYTES_PER_PROGRAM = 512


@triton.jit
def _dequantize_4bit_kernel(
    packed_ptr,
    absmax_ptr,
    absmax_q_ptr,
    absmax_scale_ptr,
    absmax_offset_ptr,
    table_ptr,
    dynamic_map_ptr,
    out_ptr,
    n_bytes,
    bytes_per_block,
    DOUBLE_QUANT: tl.constexpr,
    GROUP: tl.constexpr,
    BYTES: tl.constexpr,
):
    offs = tl.program_id(0) * BYTES + tl.arange(0, BYTES)
    mask = offs < n_bytes
    byte = tl.load(packed_ptr + offs, mask=mask, other=0).to(tl.int32)
    hi = tl.load(table_ptr + (byte >> 4), mask=mask, other=0.0)
    lo = tl.load(table_ptr + (byte & 15), mask=mask, other=0.0)
    block = offs // bytes_per_block
    if DOUBLE_QUANT:
        q = tl.load(absmax_q_ptr + block, mask=mask, other=0).to(tl.int32)
        code = tl.load(dynamic_map_ptr + q, mask=mask, other=0.0)
        scale = tl.load(absmax_scale_ptr + block // GROUP, mask=mask, other=0.0)
        absmax = code * scale + tl.load(absmax_offset_ptr)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + 2 * offs, (hi * absmax).to(out_ty), mask=mask)
    tl.store(out_ptr + 2 * offs + 1, (lo * absmax).to(out_ty), mask=mask)


def dequantize_4bit_triton(state: QuantState, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Same result as :func:`models.quant.dequantize_4bit`, computed by the Triton kernel."""
    packed = state.packed.contiguous()
    device = packed.device
    n_bytes = packed.numel()
    out = torch.empty(2 * n_bytes, dtype=dtype, device=device)
    if state.double_quant:
        absmax_q, scale = state.absmax_q.contiguous(), state.absmax_scale.float().contiguous()
        offset = state.absmax_offset.float().reshape(1)
        absmax = scale  # unused by the kernel in this branch
    else:
        absmax = state.absmax.float().contiguous()
        absmax_q = scale = offset = absmax  # unused by the kernel in this branch
    grid = (triton.cdiv(n_bytes, _BYTES_PER_PROGRAM),)
    _dequantize_4bit_kernel[grid](
        packed, absmax, absmax_q, scale, offset,
        cached_table(state.quant_type, device), cached_table("dynamic", device), out,
        n_bytes, state.block_size // 2,
        DOUBLE_QUANT=state.double_quant, GROUP=DOUBLE_QUANT_BLOCK_SIZE, BYTES=_BYTES_PER_PROGRAM,
    )
    return out[: math.prod(state.shape)].view(state.shape)
