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


@triton.jit
def _matmul_4bit_kernel(
    a_ptr,
    packed_ptr,
    absmax_ptr,
    absmax_q_ptr,
    absmax_scale_ptr,
    absmax_offset_ptr,
    table_ptr,
    dynamic_map_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_cm,
    stride_cn,
    w_stride_k,
    w_stride_n,
    block_size,
    DOUBLE_QUANT: tl.constexpr,
    GROUP: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """``C = A @ W'`` where ``W'[k, n]`` is the weight element at flat index ``k * w_stride_k + n * w_stride_n``,
    dequantized tile by tile inside the K loop (no dense weight in memory)."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (ks[None, :] < K), other=0.0)
        wmask = (ks[:, None] < K) & (rn[None, :] < N)
        idx = ks[:, None] * w_stride_k + rn[None, :] * w_stride_n
        byte = tl.load(packed_ptr + idx // 2, mask=wmask, other=0).to(tl.int32)
        code = tl.where(idx % 2 == 0, byte >> 4, byte & 15)
        value = tl.load(table_ptr + code, mask=wmask, other=0.0)
        block = idx // block_size
        if DOUBLE_QUANT:
            q = tl.load(absmax_q_ptr + block, mask=wmask, other=0).to(tl.int32)
            absmax = tl.load(dynamic_map_ptr + q, mask=wmask, other=0.0) * \
                tl.load(absmax_scale_ptr + block // GROUP, mask=wmask, other=0.0) + tl.load(absmax_offset_ptr)
        else:
            absmax = tl.load(absmax_ptr + block, mask=wmask, other=0.0)
        w = (value * absmax).to(a.dtype)  # as the torch path: fp32 product, then the compute dtype
        if UPCAST:  # the CPU interpreter's dot mishandles bf16/fp16 operands: same values, fp32 products
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc += tl.dot(a, w, input_precision="ieee")
        else:
            acc += tl.dot(a, w)
    cmask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty), mask=cmask)


def matmul_4bit_triton(a: torch.Tensor, state: QuantState, transpose: bool = True,
                       block_m: int = 32, block_n: int = 64, block_k: int = 32) -> torch.Tensor:
    """Fused dequantize + matmul: ``a @ W^T`` (``transpose``, a linear layer's forward) or ``a @ W`` (its input
    gradient), ``W`` = the 4-bit weight of ``state`` (``(out, in)``), in ``a.dtype`` with fp32 accumulation.

    Same result as ``a @ dequantize_4bit(state, a.dtype).t()`` up to the order of the fp32 sums (float32
    inputs use IEEE products, not TF32).
    """
    out_f, in_f = state.shape
    a2 = a.reshape(-1, a.shape[-1])
    m, k = a2.shape
    if transpose:
        n, w_stride_k, w_stride_n, need = out_f, 1, in_f, in_f
    else:
        n, w_stride_k, w_stride_n, need = in_f, in_f, 1, out_f
    if k != need:
        raise ValueError(f"matmul_4bit_triton: input has {k} features, the weight {tuple(state.shape)} needs {need}")
    c = torch.empty(m, n, dtype=a.dtype, device=a.device)
    device = a.device
    if state.double_quant:
        absmax_q, scale = state.absmax_q.contiguous(), state.absmax_scale.float().contiguous()
        offset = state.absmax_offset.float().reshape(1)
        absmax = scale  # unused by the kernel in this branch
    else:
        absmax = state.absmax.float().contiguous()
        absmax_q = scale = offset = absmax  # unused by the kernel in this branch
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _matmul_4bit_kernel[grid](
        a2, state.packed.contiguous(), absmax, absmax_q, scale, offset,
        cached_table(state.quant_type, device), cached_table("dynamic", device), c,
        m, n, k, a2.stride(0), a2.stride(1), c.stride(0), c.stride(1), w_stride_k, w_stride_n, state.block_size,
        DOUBLE_QUANT=state.double_quant, GROUP=DOUBLE_QUANT_BLOCK_SIZE, IEEE=a.dtype == torch.float32 or not a.is_cuda,
        UPCAST=not a.is_cuda, BM=block_m, BN=block_n, BK=block_k,
    )
    return c.view(*a.shape[:-1], n)
