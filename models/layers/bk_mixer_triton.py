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
    def _softplus(x):
        """torch's ``F.softplus`` (threshold 20) without overflow: max(x, 0) + log(1 + exp(-|x|))."""
        return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))

    @triton.jit
    def _tile(g0_ptr, C, HAS_G0: tl.constexpr, F64: tl.constexpr, BLOCK_C: tl.constexpr):
        """The prologue of both kernels: this program's row, channels, mask and the carried g (zeros without)."""
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
        return pid_b, offs_c, mask, g0r, g0i

    @triton.jit
    def _coupling(src_ptr, k_ptr, rs_ptr, pid_b, t, off, offs_c, mask, N, C,
                  MIXER: tl.constexpr, HAS_RESET: tl.constexpr, dt: tl.constexpr):
        """(k_t, its pre-activation) of token t: read (scan) or softplus of the projection, 0 at a reset (mixer)."""
        if MIXER:
            kp = tl.load(src_ptr + (pid_b * N + t) * 3 * C + C + offs_c, mask=mask, other=0.0).to(dt)
            kk = _softplus(kp)
            if HAS_RESET:
                kk = tl.where(tl.load(rs_ptr + pid_b * N + t) != 0, 0.0, kk)
        else:
            kk = tl.load(k_ptr + off, mask=mask, other=0.0).to(dt)
            kp = kk
        return kk, kp

    @triton.jit
    def _bk_forward_kernel(
        src_ptr,  # scan: d (B, N, C, 2) real pairs; mixer: the projection [a, k_pre, v] (B, N, 3C)
        k_ptr,  # scan: couplings (B, N, C)
        dec_ptr,  # mixer: decay Gamma (B, N, C) (read when HAS_DECAY)
        rs_ptr,  # mixer: resets (B, N) int8 (read when HAS_RESET)
        g0_ptr,  # (B, C, 2) carried g (read when HAS_G0)
        g_ptr,  # (B, N, C, 2) output
        f_ptr,  # mixer: (B, N, C, 2) feature eta [Re g v, Im g v] out
        st_ptr,  # (B, cdiv(C, BLOCK_C), 4) out when STATS: max |g|, max log10 cond, max 1/damping, any unstable
        N,
        C,
        eta,
        MIXER: tl.constexpr,
        HAS_DECAY: tl.constexpr,
        HAS_RESET: tl.constexpr,
        HAS_G0: tl.constexpr,
        STATS: tl.constexpr,
        F64: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        dt = tl.float64 if F64 else tl.float32
        pid_b, offs_c, mask, gr, gi = _tile(g0_ptr, C, HAS_G0, F64, BLOCK_C)
        m_g = tl.zeros([BLOCK_C], dtype=dt)
        m_c = tl.zeros([BLOCK_C], dtype=dt)
        m_d = tl.zeros([BLOCK_C], dtype=dt)
        m_u = tl.zeros([BLOCK_C], dtype=dt)
        for t in range(N):
            off = (pid_b * N + t) * C + offs_c
            kk, kp = _coupling(src_ptr, k_ptr, rs_ptr, pid_b, t, off, offs_c, mask, N, C, MIXER, HAS_RESET, dt)
            if MIXER:
                dr = tl.load(src_ptr + (pid_b * N + t) * 3 * C + offs_c, mask=mask, other=1.0).to(dt)
                di = tl.zeros([BLOCK_C], dtype=dt) - eta
                if HAS_DECAY:
                    di -= tl.load(dec_ptr + off, mask=mask, other=0.0).to(dt)
            else:
                dr = tl.load(src_ptr + off * 2, mask=mask, other=1.0).to(dt)
                di = tl.load(src_ptr + off * 2 + 1, mask=mask, other=0.0).to(dt)
            xr = dr - kk * gr
            xi = di - kk * gi
            inv = 1.0 / (xr * xr + xi * xi)
            gr = xr * inv
            gi = -xi * inv
            tl.store(g_ptr + off * 2, gr.to(g_ptr.dtype.element_ty), mask=mask)
            tl.store(g_ptr + off * 2 + 1, gi.to(g_ptr.dtype.element_ty), mask=mask)
            if MIXER:
                ev = eta * tl.load(src_ptr + (pid_b * N + t) * 3 * C + 2 * C + offs_c, mask=mask, other=0.0).to(dt)
                tl.store(f_ptr + off * 2, (gr * ev).to(f_ptr.dtype.element_ty), mask=mask)
                tl.store(f_ptr + off * 2 + 1, (gi * ev).to(f_ptr.dtype.element_ty), mask=mask)
            if STATS:  # BKMixer.stats(), as _record_stats computes them
                abs_g = tl.sqrt(gr * gr + gi * gi)
                m = dr * dr + di * di
                f = m + kk * kk + 1.0
                root = tl.sqrt(m + (kk - 1.0) * (kk - 1.0)) * tl.sqrt(f + 2.0 * kk)
                cond = (tl.log(f + root) - tl.log(2.0 * kk)) * 0.4342944819032518  # log10 of sigma_max / sigma_min
                m_g = tl.maximum(m_g, tl.where(mask, abs_g, 0.0))
                m_c = tl.maximum(m_c, tl.where(mask, cond, 0.0))
                m_d = tl.maximum(m_d, tl.where(mask, -1.0 / di, 0.0))
                m_u = tl.maximum(m_u, tl.where(mask & ~(abs_g * -di <= 1.0 + 1e-3), 1.0, 0.0))  # NaN: unstable
        if STATS:
            st = st_ptr + (pid_b * tl.num_programs(1) + tl.program_id(1)) * 4
            tl.store(st, tl.max(m_g, 0))
            tl.store(st + 1, tl.max(m_c, 0))
            tl.store(st + 2, tl.max(m_d, 0))
            tl.store(st + 3, tl.max(m_u, 0))

    @triton.jit
    def _bk_backward_kernel(
        src_ptr,  # scan: unused; mixer: the projection (B, N, 3C)
        k_ptr,  # scan: couplings (B, N, C)
        rs_ptr,  # mixer: resets (read when HAS_RESET)
        g0_ptr,  # (B, C, 2) (read when HAS_G0)
        g_ptr,  # (B, N, C, 2) forward output
        grad_ptr,  # (B, N, C, 2) dL/dg (read when HAS_GRAD_G)
        gf_ptr,  # mixer: (B, N, C, 2) dL/dfeature
        grad_d_ptr,  # scan: (B, N, C, 2) out; mixer: dL/dprojection (B, N, 3C) out
        grad_k_ptr,  # scan: (B, N, C) out; mixer: dL/ddecay (B, N, C) out (written when HAS_DECAY)
        grad_g0_ptr,  # (B, C, 2) out (written when HAS_G0)
        N,
        C,
        eta,
        MIXER: tl.constexpr,
        HAS_DECAY: tl.constexpr,
        HAS_RESET: tl.constexpr,
        HAS_G0: tl.constexpr,
        HAS_GRAD_G: tl.constexpr,
        F64: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        dt = tl.float64 if F64 else tl.float32
        pid_b, offs_c, mask, g0r, g0i = _tile(g0_ptr, C, HAS_G0, F64, BLOCK_C)
        sr = tl.zeros([BLOCK_C], dtype=dt)  # s = k_{t+1} w_{t+1}
        si = tl.zeros([BLOCK_C], dtype=dt)
        for i in range(N):
            t = N - 1 - i
            off = (pid_b * N + t) * C + offs_c
            gr = tl.load(g_ptr + off * 2, mask=mask, other=0.0).to(dt)
            gi = tl.load(g_ptr + off * 2 + 1, mask=mask, other=0.0).to(dt)
            ar = sr
            ai = si
            if HAS_GRAD_G:
                ar += tl.load(grad_ptr + off * 2, mask=mask, other=0.0).to(dt)
                ai += tl.load(grad_ptr + off * 2 + 1, mask=mask, other=0.0).to(dt)
            if MIXER:  # the feature eta v g: dL/dg += eta v dL/dfeature, dL/dv = eta Re(conj(g) dL/dfeature)
                row = (pid_b * N + t) * 3 * C + offs_c
                ev = eta * tl.load(src_ptr + row + 2 * C, mask=mask, other=0.0).to(dt)
                fr = tl.load(gf_ptr + off * 2, mask=mask, other=0.0).to(dt)
                fi = tl.load(gf_ptr + off * 2 + 1, mask=mask, other=0.0).to(dt)
                ar += ev * fr
                ai += ev * fi
                tl.store(grad_d_ptr + row + 2 * C, (eta * (gr * fr + gi * fi)).to(grad_d_ptr.dtype.element_ty),
                         mask=mask)
            cr = gr * gr - gi * gi  # conj(g)^2
            ci = -2.0 * gr * gi
            wr = cr * ar - ci * ai
            wi = cr * ai + ci * ar
            prev = mask & (t > 0)
            pr = tl.load(g_ptr + (off - C) * 2, mask=prev, other=0.0).to(dt)
            pi = tl.load(g_ptr + (off - C) * 2 + 1, mask=prev, other=0.0).to(dt)
            pr = tl.where(t > 0, pr, g0r)
            pi = tl.where(t > 0, pi, g0i)
            kk, kp = _coupling(src_ptr, k_ptr, rs_ptr, pid_b, t, off, offs_c, mask, N, C, MIXER, HAS_RESET, dt)
            grad_k = pr * wr + pi * wi
            if MIXER:  # d = a - i (eta + Gamma), k = softplus(k_pre) (0 at a reset)
                slope = tl.where(kp > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-kp)))
                if HAS_RESET:
                    slope = tl.where(tl.load(rs_ptr + pid_b * N + t) != 0, 0.0, slope)
                tl.store(grad_d_ptr + row, (-wr).to(grad_d_ptr.dtype.element_ty), mask=mask)
                tl.store(grad_d_ptr + row + C, (grad_k * slope).to(grad_d_ptr.dtype.element_ty), mask=mask)
                if HAS_DECAY:
                    tl.store(grad_k_ptr + off, wi.to(grad_k_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(grad_d_ptr + off * 2, (-wr).to(grad_d_ptr.dtype.element_ty), mask=mask)
                tl.store(grad_d_ptr + off * 2 + 1, (-wi).to(grad_d_ptr.dtype.element_ty), mask=mask)
                tl.store(grad_k_ptr + off, grad_k.to(grad_k_ptr.dtype.element_ty), mask=mask)
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
        _bk_forward_kernel[grid](d, k, d, d, d if g0 is None else g0, g, g, g, n, channels, 1.0, MIXER=False,
                                 HAS_DECAY=False, HAS_RESET=False, HAS_G0=g0 is not None, STATS=False,
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
        _bk_backward_kernel[grid](g, k, g, g if g0 is None else g0, g, grad.contiguous(), g, grad_d, grad_k,
                                  grad_d if grad_g0 is None else grad_g0, n, channels, 1.0, MIXER=False,
                                  HAS_DECAY=False, HAS_RESET=False, HAS_G0=g0 is not None, HAS_GRAD_G=True,
                                  F64=g.dtype == torch.float64, BLOCK_C=block)
        return grad_d, grad_k, grad_g0 if g0 is not None and ctx.needs_input_grad[2] else None


class _BKMixerTriton(torch.autograd.Function):
    """The mixer between its two projections: projection [a, k_pre, v] (B, N, 3C), decay (B, N, C) or None, g0
    pairs (B, C, 2) or None, resets (B, N) int8 or None -> (feature (B, N, C, 2) in the projection's dtype, g pairs
    (B, N, C, 2), stats partials (B, tiles, 4) or None). Saves the projection, decay, resets, g0 and g."""

    @staticmethod
    def forward(ctx, proj: Tensor, decay: Tensor | None, g0: Tensor | None, reset: Tensor | None, eta: float,
                stats: bool, real: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
        batch, n, channels3 = proj.shape
        channels = channels3 // 3
        grid, block = _grid(batch, channels)
        g = proj.new_empty(batch, n, channels, 2, dtype=real)
        feature = proj.new_empty(batch, n, channels, 2)
        st = proj.new_empty(*grid, 4, dtype=real) if stats else None
        _bk_forward_kernel[grid](proj, proj, proj if decay is None else decay, proj if reset is None else reset,
                                 g if g0 is None else g0, g, feature, g if st is None else st, n, channels, eta,
                                 MIXER=True, HAS_DECAY=decay is not None, HAS_RESET=reset is not None,
                                 HAS_G0=g0 is not None, STATS=stats, F64=real == torch.float64, BLOCK_C=block)
        ctx.save_for_backward(proj, decay, g0, reset, g)
        ctx.eta = eta
        ctx.set_materialize_grads(False)  # g or the feature may not reach the loss: no zero tensors for them
        if st is not None:
            ctx.mark_non_differentiable(st)
        return feature, g, st

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_feature: Tensor | None, grad_g: Tensor | None, _: None) -> tuple[Tensor | None, ...]:
        proj, decay, g0, reset, g = ctx.saved_tensors
        batch, n, channels, _ = g.shape
        if grad_feature is None:
            grad_feature = torch.zeros_like(g)
        grad_proj = torch.empty_like(proj)
        grad_decay = None if decay is None else torch.empty_like(decay)
        grad_g0 = None if g0 is None else torch.empty_like(g0)
        grid, block = _grid(batch, channels)
        _bk_backward_kernel[grid](proj, proj, proj if reset is None else reset, g if g0 is None else g0, g,
                                  g if grad_g is None else grad_g.contiguous(), grad_feature.contiguous(), grad_proj,
                                  grad_proj if grad_decay is None else grad_decay,
                                  grad_proj if grad_g0 is None else grad_g0, n, channels, ctx.eta, MIXER=True,
                                  HAS_DECAY=decay is not None, HAS_RESET=reset is not None, HAS_G0=g0 is not None,
                                  HAS_GRAD_G=grad_g is not None, F64=g.dtype == torch.float64, BLOCK_C=block)
        return grad_proj, grad_decay, grad_g0, None, None, None, None


def _check_device(t: Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("the Triton BK scan needs triton, which is not installed")
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("the Triton BK scan runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1, for "
                           "tests); use backend 'torch' on the CPU")


def bk_mixer_triton(
    proj: Tensor, eta: float, decay: Tensor | None = None, g0: Tensor | None = None, reset: Tensor | None = None,
    stats: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """BKMixer between ``in_proj`` and ``out_proj`` in one launch forward and one backward: ``proj`` (B, N, 3C) is
    ``[a, k_pre, v]``, ``decay`` Gamma (B, N, C), ``g0`` complex (B, C), ``reset`` (B, N) bool zeroes k there.
    Returns the feature (B, N, 2C) in ``proj``'s dtype ([eta Re(g) v, eta Im(g) v] per channel), g complex
    (B, N, C) and, with ``stats``, (max |g|, max log10 transfer condition, 1 / min damping, any unstable) as a (4,)
    tensor (one reduction of the per-program maxima). Differentiable in ``proj``, ``decay``, ``g0`` and g."""
    _check_device(proj)
    batch, n, channels3 = proj.shape
    real = torch.float64 if proj.dtype == torch.float64 else torch.float32
    cplx = torch.complex128 if real == torch.float64 else torch.complex64
    if g0 is not None and (g0.dtype != cplx or g0.shape != (batch, channels3 // 3)):
        raise ValueError(f"g0 must be {cplx} of shape {(batch, channels3 // 3)}, got {g0.dtype} {tuple(g0.shape)}")
    if reset is not None and reset.shape != (batch, n):
        raise ValueError(f"reset must be (B, N) = {(batch, n)}, got {tuple(reset.shape)}")
    decay = None if decay is None else decay.to(real).contiguous()
    g0 = None if g0 is None else torch.view_as_real(g0).contiguous()
    reset = None if reset is None else reset.contiguous().view(torch.int8)
    feature, g, st = _BKMixerTriton.apply(proj.contiguous(), decay, g0, reset, float(eta), stats, real)
    return feature.view(batch, n, channels3 // 3 * 2), torch.view_as_complex(g), None if st is None else st.view(
        -1, 4).amax(0)


def resolvent_scan_pairs(d: Tensor, k: Tensor, g0: Tensor | None = None) -> Tensor:
    """The resolvent scan on real pairs: ``d`` (..., N, C, 2), ``k`` (..., N, C), ``g0`` (..., C, 2) or None, all of
    one floating dtype; returns g (..., N, C, 2) in that dtype. Differentiable in all three (first order)."""
    _check_device(d)
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
