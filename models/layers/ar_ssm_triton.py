"""Triton fused decayed scan ``h_t = decay * h_{t-1} + x_t`` (the AR-SSM state) with its backward.

One program per (batch row, tile of ``BLOCK_R`` ranks) walks the sequence in blocks of ``block_t`` tokens.
Inside a block an associative scan over pairs ``(a, b)`` with ``(a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2)``
gives the block-local states and the decay powers; the state entering the block (the carry, initially
``initial_state``) is added as ``decay^(i+1) * carry`` and the block's last state becomes the next carry (only
the final block can be partial, so its padding rows never feed a carry).

The backward is the same kernel run in reverse time on ``dL/dh``: ``mu_t = dL/dh_t + decay * mu_{t+1}``,
``dL/dx = mu``; it also accumulates ``dL/ddecay = sum_t mu_t h_{t-1}`` (``h_{-1}`` = initial state) per
program; ``dL/dinitial_state = decay * mu_0``. Compute is float32 (float64 for float64 inputs).

Triton is optional: without it this module still imports, ``HAS_TRITON`` is False and
:func:`decayed_scan_triton` raises. With ``TRITON_INTERPRET=1`` set before triton is imported the kernel runs
on CPU tensors, which is how the tests compare it with :func:`models.layers.ar_ssm.decayed_scan`.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional
    triton = None

HAS_TRITON = triton is not None
BLOCK_T = 64  # tokens per block along time

if HAS_TRITON:

    @triton.jit
    def _combine(a1, b1, a2, b2):
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _decayed_scan_kernel(
        x_ptr,  # (B, N, R): inputs (forward) or dL/dh (reverse)
        decay_ptr,  # (R,)
        h0_ptr,  # (B, R) initial state (read when HAS_H0)
        out_ptr,  # (B, N, R): h (forward) or mu = dL/dx (reverse)
        hist_ptr,  # (B, N, R): forward h (reverse only)
        dd_ptr,  # (B, R): per-row dL/ddecay (reverse only)
        N,
        R,
        HAS_H0: tl.constexpr,
        REVERSE: tl.constexpr,
        F64: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        dt = tl.float64 if F64 else tl.float32
        pid_b = tl.program_id(0).to(tl.int64)
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        lam = tl.load(decay_ptr + offs_r, mask=mask_r, other=1.0).to(dt)
        if HAS_H0:
            h0 = tl.load(h0_ptr + pid_b * R + offs_r, mask=mask_r, other=0.0).to(dt)
        else:
            h0 = tl.zeros([BLOCK_R], dtype=dt)
        if REVERSE:
            carry = tl.zeros([BLOCK_R], dtype=dt)  # mu_N = 0
        else:
            carry = h0
        dd = tl.zeros([BLOCK_R], dtype=dt)
        rows = tl.arange(0, BLOCK_T)
        base = pid_b * N * R
        for start in range(0, N, BLOCK_T):
            step = start + rows  # position in scan order
            if REVERSE:
                t = N - 1 - step
            else:
                t = step
            m = (step < N)[:, None] & mask_r[None, :]
            offs = base + t[:, None].to(tl.int64) * R + offs_r[None, :]
            b = tl.load(x_ptr + offs, mask=m, other=0.0).to(dt)
            a = tl.broadcast_to(lam[None, :], (BLOCK_T, BLOCK_R))
            a_cum, h_local = tl.associative_scan((a, b), axis=0, combine_fn=_combine)
            h = h_local + a_cum * carry[None, :]
            tl.store(out_ptr + offs, h.to(out_ptr.dtype.element_ty), mask=m)
            carry = tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, h, 0.0), axis=0)
            if REVERSE:
                prev = tl.load(hist_ptr + offs - R, mask=m & (t[:, None] > 0), other=0.0).to(dt)
                prev = tl.where(t[:, None] == 0, h0[None, :], prev)
                dd += tl.sum(tl.where(m, h * prev, 0.0), axis=0)
        if REVERSE:
            tl.store(dd_ptr + pid_b * R + offs_r, dd, mask=mask_r)


def _launch(
    x: Tensor, decay: Tensor, h0: Tensor | None, block_t: int, hist: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Forward scan (``hist`` None) or reverse scan with the decay gradient (``hist`` = forward h)."""
    batch, n, rank = x.shape
    f64 = x.dtype == torch.float64
    out = torch.empty_like(x)
    dd = None
    if hist is not None:
        dd = torch.empty(batch, rank, dtype=torch.float64 if f64 else torch.float32, device=x.device)
    block_r = min(32, triton.next_power_of_2(rank))
    _decayed_scan_kernel[(batch, triton.cdiv(rank, block_r))](
        x, decay, x if h0 is None else h0, out, x if hist is None else hist, out if dd is None else dd, n, rank,
        HAS_H0=h0 is not None, REVERSE=hist is not None, F64=f64, BLOCK_T=block_t, BLOCK_R=block_r,
    )
    return out, dd


class _DecayedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, decay: Tensor, h0: Tensor | None, block_t: int) -> Tensor:
        h, _ = _launch(x, decay, h0, block_t)
        ctx.save_for_backward(h, decay, h0)
        ctx.block_t = block_t
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor | None, ...]:
        h, decay, h0 = ctx.saved_tensors
        mu, dd = _launch(grad_h.contiguous(), decay, h0, ctx.block_t, hist=h)
        grad_decay = dd.sum(0).to(decay.dtype) if ctx.needs_input_grad[1] else None
        grad_h0 = (decay * mu[:, 0]).to(h0.dtype) if h0 is not None and ctx.needs_input_grad[2] else None
        return mu if ctx.needs_input_grad[0] else None, grad_decay, grad_h0, None


def decayed_scan_triton(
    x: Tensor, decay: Tensor, initial_state: Tensor | None = None, block_t: int = BLOCK_T
) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`models.layers.ar_ssm.decayed_scan`, computed by the Triton kernel; differentiable
    in ``x``, ``decay`` and ``initial_state`` (first-order)."""
    if not HAS_TRITON:
        raise RuntimeError("decayed_scan_triton needs triton, which is not installed")
    if x.ndim != 3 or decay.shape != x.shape[-1:] or x.shape[1] == 0:
        raise ValueError(f"expected x (B, N>=1, R) and decay (R,), got {tuple(x.shape)} and {tuple(decay.shape)}")
    if initial_state is not None:
        initial_state = initial_state.contiguous()
    h = _DecayedScan.apply(x.contiguous(), decay.contiguous(), initial_state, block_t)
    return h, h[:, -1]
