"""Triton kernels of the BK resolvent scan ``g_t = 1 / (d_t - k_t g_{t-1})`` and its exact reverse-scan backward.

Complex numbers travel as real pairs (``torch.view_as_real``: the last dimension holds Re, Im). Like a selective
scan, one program owns a batch row and a tile of ``BLOCK_C`` channels and walks the tokens in order, so a
layer's forward is one launch and its backward one more, whatever the length (the torch path of
:mod:`models.layers.bk_mixer` runs Python loops over chunk positions instead). The backward is the reverse
linear scan of the recurrence (PyTorch's complex-gradient convention, ``w_t = conj(g_t)^2 lambda_t``)::

    lambda_t = G_t + k_{t+1} w_{t+1},   grad d_t = -w_t,   grad k_t = Re(conj(g_{t-1}) w_t),   grad g0 = k_0 w_0.

Compute is float32 (float64 for float64 inputs); float16 / bfloat16 pairs are read and written in their own
type. ``1 / x`` is formed as ``conj(x) / |x|^2``: ``|x| >= Im(-x) >= eta``, so nothing underflows, and
``|x|^2`` overflows float32 only beyond ``|x| ~ 1e19``.

Triton is optional: without it this module imports, ``HAS_TRITON`` is False and the entry points raise. With
``TRITON_INTERPRET=1`` set before triton is imported the kernels run on CPU tensors (how the tests compare them
with the torch reference).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional
    triton = None

HAS_TRITON = triton is not None
BLOCK_C = 64  # channels per program

if HAS_TRITON:

    @triton.jit
    def _bk_forward_kernel(
        d_ptr,  # (B, N, C, 2) shifted diagonal, real pairs
        k_ptr,  # (B, N, C) couplings
        g0_ptr,  # (B, C, 2) carried g (read when HAS_G0)
        g_ptr,  # (B, N, C, 2) output
        N,
        C,
        HAS_G0: tl.constexpr,
        F64: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        dt = tl.float64 if F64 else tl.float32
        pid_b = tl.program_id(0).to(tl.int64)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = offs_c < C
        if HAS_G0:
            gr = tl.load(g0_ptr + (pid_b * C + offs_c) * 2, mask=mask, other=0.0).to(dt)
            gi = tl.load(g0_ptr + (pid_b * C + offs_c) * 2 + 1, mask=mask, other=0.0).to(dt)
        else:
            gr = tl.zeros([BLOCK_C], dtype=dt)
            gi = tl.zeros([BLOCK_C], dtype=dt)
        base = pid_b * N * C
        for t in range(N):
            off = base + t * C + offs_c
            dr = tl.load(d_ptr + off * 2, mask=mask, other=1.0).to(dt)
            di = tl.load(d_ptr + off * 2 + 1, mask=mask, other=0.0).to(dt)
            kk = tl.load(k_ptr + off, mask=mask, other=0.0).to(dt)
            xr = dr - kk * gr
            xi = di - kk * gi
            inv = 1.0 / (xr * xr + xi * xi)
            gr = xr * inv
            gi = -xi * inv
            tl.store(g_ptr + off * 2, gr.to(g_ptr.dtype.element_ty), mask=mask)
            tl.store(g_ptr + off * 2 + 1, gi.to(g_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _bk_backward_kernel(
        g_ptr,  # (B, N, C, 2) forward output
        k_ptr,  # (B, N, C)
        g0_ptr,  # (B, C, 2) (read when HAS_G0)
        grad_ptr,  # (B, N, C, 2) dL/dg
        grad_d_ptr,  # (B, N, C, 2) out
        grad_k_ptr,  # (B, N, C) out
        grad_g0_ptr,  # (B, C, 2) out (written when HAS_G0)
        N,
        C,
        HAS_G0: tl.constexpr,
        F64: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        dt = tl.float64 if F64 else tl.float32
        pid_b = tl.program_id(0).to(tl.int64)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = offs_c < C
        if HAS_G0:
            g0r = tl.load(g0_ptr + (pid_b * C + offs_c) * 2, mask=mask, other=0.0).to(dt)
            g0i = tl.load(g0_ptr + (pid_b * C + offs_c) * 2 + 1, mask=mask, other=0.0).to(dt)
        else:
            g0r = tl.zeros([BLOCK_C], dtype=dt)
            g0i = tl.zeros([BLOCK_C], dtype=dt)
        sr = tl.zeros([BLOCK_C], dtype=dt)  # s = k_{t+1} w_{t+1}
        si = tl.zeros([BLOCK_C], dtype=dt)
        base = pid_b * N * C
        for i in range(N):
            t = N - 1 - i
            off = base + t * C + offs_c
            gr = tl.load(g_ptr + off * 2, mask=mask, other=0.0).to(dt)
            gi = tl.load(g_ptr + off * 2 + 1, mask=mask, other=0.0).to(dt)
            ar = tl.load(grad_ptr + off * 2, mask=mask, other=0.0).to(dt) + sr
            ai = tl.load(grad_ptr + off * 2 + 1, mask=mask, other=0.0).to(dt) + si
            cr = gr * gr - gi * gi  # conj(g)^2
            ci = -2.0 * gr * gi
            wr = cr * ar - ci * ai
            wi = cr * ai + ci * ar
            prev = mask & (t > 0)
            pr = tl.load(g_ptr + (off - C) * 2, mask=prev, other=0.0).to(dt)
            pi = tl.load(g_ptr + (off - C) * 2 + 1, mask=prev, other=0.0).to(dt)
            pr = tl.where(t > 0, pr, g0r)
            pi = tl.where(t > 0, pi, g0i)
            kk = tl.load(k_ptr + off, mask=mask, other=0.0).to(dt)
            tl.store(grad_d_ptr + off * 2, (-wr).to(grad_d_ptr.dtype.element_ty), mask=mask)
            tl.store(grad_d_ptr + off * 2 + 1, (-wi).to(grad_d_ptr.dtype.element_ty), mask=mask)
            tl.store(grad_k_ptr + off, (pr * wr + pi * wi).to(grad_k_ptr.dtype.element_ty), mask=mask)
            sr = kk * wr
            si = kk * wi
        if HAS_G0:
            tl.store(grad_g0_ptr + (pid_b * C + offs_c) * 2, sr.to(grad_g0_ptr.dtype.element_ty), mask=mask)
            tl.store(grad_g0_ptr + (pid_b * C + offs_c) * 2 + 1, si.to(grad_g0_ptr.dtype.element_ty), mask=mask)


def _grid(batch: int, channels: int) -> tuple[tuple[int, int], int]:
    block = min(BLOCK_C, triton.next_power_of_2(channels))
    return (batch, triton.cdiv(channels, block)), block


class _ResolventScanTriton(torch.autograd.Function):
    """(d pairs (B, N, C, 2), k (B, N, C), g0 pairs (B, C, 2) or None) -> g pairs; saves g, k and g0."""

    @staticmethod
    def forward(ctx, d: Tensor, k: Tensor, g0: Tensor | None) -> Tensor:
        batch, n, channels, _ = d.shape
        g = torch.empty_like(d)
        grid, block = _grid(batch, channels)
        _bk_forward_kernel[grid](d, k, d if g0 is None else g0, g, n, channels, HAS_G0=g0 is not None,
                                 F64=d.dtype == torch.float64, BLOCK_C=block)
        ctx.save_for_backward(g, k, g0)
        return g

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        g, k, g0 = ctx.saved_tensors
        batch, n, channels, _ = g.shape
        grad_d, grad_k = torch.empty_like(g), torch.empty_like(k)
        grad_g0 = None if g0 is None else torch.empty_like(g0)
        grid, block = _grid(batch, channels)
        _bk_backward_kernel[grid](g, k, g if g0 is None else g0, grad.contiguous(), grad_d, grad_k,
                                  grad_d if grad_g0 is None else grad_g0, n, channels, HAS_G0=g0 is not None,
                                  F64=g.dtype == torch.float64, BLOCK_C=block)
        return grad_d, grad_k, grad_g0 if g0 is not None and ctx.needs_input_grad[2] else None


def resolvent_scan_pairs(d: Tensor, k: Tensor, g0: Tensor | None = None) -> Tensor:
    """The resolvent scan on real pairs: ``d`` (..., N, C, 2), ``k`` (..., N, C), ``g0`` (..., C, 2) or None, all of
    one floating dtype; returns g (..., N, C, 2) in that dtype. Differentiable in all three (first order)."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton BK scan needs triton, which is not installed")
    if not d.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton BK scan runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1, for "
                           "tests); use backend 'torch' on the CPU")
    if d.dim() < 3 or d.shape[-1] != 2 or d.shape[-3] < 1 or k.shape != d.shape[:-1] or k.dtype != d.dtype:
        raise ValueError(f"expected d (..., N>=1, C, 2) and k (..., N, C) of one dtype, got {tuple(d.shape)} "
                         f"{d.dtype} and {tuple(k.shape)} {k.dtype}")
    *lead, n, channels, _ = d.shape
    if g0 is not None and (g0.shape != (*lead, channels, 2) or g0.dtype != d.dtype):
        raise ValueError(f"g0 must be {d.dtype} of shape {(*lead, channels, 2)}, got {g0.dtype} {tuple(g0.shape)}")
    d3 = d.reshape(-1, n, channels, 2).contiguous()
    k3 = k.reshape(-1, n, channels).contiguous()
    g0_2 = None if g0 is None else g0.reshape(-1, channels, 2).contiguous()
    return _ResolventScanTriton.apply(d3, k3, g0_2).reshape(d.shape)


def resolvent_diagonal_triton(d: Tensor, k: Tensor, g0: Tensor | None = None) -> Tensor:
    """Same contract as :func:`models.layers.bk_mixer.resolvent_diagonal` (complex ``d``, real ``k``), by the
    kernels."""
    g = resolvent_scan_pairs(torch.view_as_real(d), k, None if g0 is None else torch.view_as_real(g0))
    return torch.view_as_complex(g)
