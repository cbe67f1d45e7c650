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
    def _decay(decay_ptr, offs_r, mask_r, FROM_LOGIT: tl.constexpr, dt: tl.constexpr):
        """(lambda, d lambda / d its parameter): the decay itself, or exp(-(softplus(theta) + 1e-4)) from the
        layer's logit theta (d lambda / d theta = -lambda sigmoid(theta))."""
        p = tl.load(decay_ptr + offs_r, mask=mask_r, other=0.0).to(dt)
        if FROM_LOGIT:
            sp = tl.where(p > 20.0, p, tl.maximum(p, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(p))))
            lam = tl.exp(-(sp + 1e-4))
            slope = -lam * tl.where(p > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-p)))
        else:
            lam = p
            slope = tl.zeros_like(p) + 1.0
        return tl.where(mask_r, lam, 1.0), slope

    @triton.jit
    def _decayed_scan_kernel(
        x_ptr,  # (B, N, R): inputs (forward) or dL/dh (reverse); LAYER: dL/dy (reverse)
        decay_ptr,  # (R,): the decay, or with FROM_LOGIT the layer's decay logit
        h0_ptr,  # (B, R) initial state (read when HAS_H0)
        out_ptr,  # (B, N, R): h (forward) or mu = dL/dx (reverse); LAYER reverse: dL/d gate logits
        hist_ptr,  # (B, N, R): forward h (reverse only; LAYER: written forward)
        dd_ptr,  # (B, R): per-row dL/d decay (or d logit) (reverse only); LAYER forward: max gate per row
        uv_ptr,  # LAYER: [U xc | V xc] (B, N, 2R), token stride UV_T
        gl_ptr,  # LAYER: gate logits (B, N, R)
        gs_ptr,  # LAYER: gate multiplier (R,) (read when HAS_SCALE)
        g_ptr,  # LAYER: dL/dg from outside (reverse, when HAS_GRAD_G); forward: the gates (B, N, R) out
        y_ptr,  # LAYER forward: u h (B, N, R) out; reverse: dL/d[U xc | V xc] (B, N, 2R) out
        dh0_ptr,  # reverse: dL/dh0 = lambda mu_0 (B, R) out (written when HAS_H0)
        gh_ptr,  # LAYER reverse: dL/dh from outside (B, N, R) (read when HAS_GRAD_H)
        N,
        R,
        UV_T,
        HAS_H0: tl.constexpr,
        REVERSE: tl.constexpr,
        LAYER: tl.constexpr,
        FROM_LOGIT: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_GRAD_G: tl.constexpr,
        HAS_GRAD_H: tl.constexpr,
        F64: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_R: tl.constexpr,
    ):
        """The scan h_t = lambda h_{t-1} + x_t (forward) or its reverse mu_t = dL/dh_t + lambda mu_{t+1}. LAYER: the
        AR-SSM around it, g = sigmoid(logits) (times the gate multiplier), x = (V xc) g, y = (U xc) g h, and in
        reverse the gradients of [U xc | V xc], of the logits and of the decay logit."""
        dt = tl.float64 if F64 else tl.float32
        pid_b = tl.program_id(0).to(tl.int64)
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        lam, dlam = _decay(decay_ptr, offs_r, mask_r, FROM_LOGIT, dt)
        if HAS_H0:
            h0 = tl.load(h0_ptr + pid_b * R + offs_r, mask=mask_r, other=0.0).to(dt)
        else:
            h0 = tl.zeros([BLOCK_R], dtype=dt)
        if HAS_SCALE:
            gscale = tl.load(gs_ptr + offs_r, mask=mask_r, other=0.0).to(dt)
        else:
            gscale = tl.zeros([BLOCK_R], dtype=dt) + 1.0
        if REVERSE:
            carry = tl.zeros([BLOCK_R], dtype=dt)  # mu_N = 0
        else:
            carry = h0
        dd = tl.zeros([BLOCK_R], dtype=dt)  # reverse: dL/dlambda; LAYER forward: the largest gate
        mu0 = tl.zeros([BLOCK_R], dtype=dt)  # reverse: mu_0
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
            if LAYER:
                offs_uv = (pid_b * N + t[:, None].to(tl.int64)) * UV_T + offs_r[None, :]
                u = tl.load(uv_ptr + offs_uv, mask=m, other=0.0).to(dt)
                v = tl.load(uv_ptr + offs_uv + R, mask=m, other=0.0).to(dt)
                sig = 1.0 / (1.0 + tl.exp(-tl.load(gl_ptr + offs, mask=m, other=0.0).to(dt)))
                g = sig * gscale[None, :]
                if REVERSE:
                    dy = tl.load(x_ptr + offs, mask=m, other=0.0).to(dt)
                    h = tl.load(hist_ptr + offs, mask=m, other=0.0).to(dt)
                    b = dy * u * g  # dL/dh_t = dL/dy_t u_t g_t (+ what reaches h directly: the carried state)
                    if HAS_GRAD_H:
                        b += tl.load(gh_ptr + offs, mask=m, other=0.0).to(dt)
                else:
                    b = v * g
            else:
                b = tl.load(x_ptr + offs, mask=m, other=0.0).to(dt)
            a = tl.broadcast_to(lam[None, :], (BLOCK_T, BLOCK_R))
            a_cum, s_local = tl.associative_scan((a, b), axis=0, combine_fn=_combine)
            s = s_local + a_cum * carry[None, :]
            carry = tl.sum(tl.where(rows[:, None] == BLOCK_T - 1, s, 0.0), axis=0)
            if LAYER:
                if REVERSE:  # s = mu = dL/dx; x = v g, y = u g h
                    dg = dy * u * h + s * v
                    if HAS_GRAD_G:
                        dg += tl.load(g_ptr + offs, mask=m, other=0.0).to(dt)
                    tl.store(out_ptr + offs, (dg * gscale[None, :] * sig * (1.0 - sig)).to(out_ptr.dtype.element_ty),
                             mask=m)
                    offs_d = (pid_b * N + t[:, None].to(tl.int64)) * 2 * R + offs_r[None, :]
                    tl.store(y_ptr + offs_d, (dy * g * h).to(y_ptr.dtype.element_ty), mask=m)
                    tl.store(y_ptr + offs_d + R, (s * g).to(y_ptr.dtype.element_ty), mask=m)
                else:
                    tl.store(hist_ptr + offs, s.to(hist_ptr.dtype.element_ty), mask=m)
                    tl.store(g_ptr + offs, g.to(g_ptr.dtype.element_ty), mask=m)
                    tl.store(y_ptr + offs, (u * g * s).to(y_ptr.dtype.element_ty), mask=m)
                    dd = tl.maximum(dd, tl.max(tl.where(m, g, 0.0), axis=0))
            else:
                tl.store(out_ptr + offs, s.to(out_ptr.dtype.element_ty), mask=m)
            if REVERSE:
                prev = tl.load(hist_ptr + offs - R, mask=m & (t[:, None] > 0), other=0.0).to(dt)
                prev = tl.where(t[:, None] == 0, h0[None, :], prev)
                dd += tl.sum(tl.where(m, s * prev, 0.0), axis=0)
                mu0 += tl.sum(tl.where(m & (t[:, None] == 0), s, 0.0), axis=0)
        if REVERSE:
            tl.store(dd_ptr + pid_b * R + offs_r, dd * dlam, mask=mask_r)
            if HAS_H0:
                tl.store(dh0_ptr + pid_b * R + offs_r, lam * mu0, mask=mask_r)
        elif LAYER:
            tl.store(dd_ptr + pid_b * R + offs_r, dd, mask=mask_r)

    @triton.jit
    def _gate_stats_kernel(gmax_ptr, run_ptr, seen_ptr, B, R, momentum, BLOCK_R: tl.constexpr):
        """``gate_running_max`` of the first R ranks: the batch maximum of each rank's gate (the rows of gmax)
        copied on a rank's first update, else lerped in with ``momentum``; ``gate_updates`` counts."""
        offs = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = offs < R
        bm = tl.load(gmax_ptr + offs, mask=mask, other=0.0)
        for i in range(1, B):
            bm = tl.maximum(bm, tl.load(gmax_ptr + i * R + offs, mask=mask, other=0.0))
        bm = bm.to(run_ptr.dtype.element_ty)
        old = tl.load(run_ptr + offs, mask=mask, other=0.0)
        seen = tl.load(seen_ptr + offs, mask=mask, other=0)
        tl.store(run_ptr + offs, tl.where(seen > 0, old + momentum * (bm - old), bm), mask=mask)
        tl.store(seen_ptr + offs, seen + 1, mask=mask)


def _launch(
    x: Tensor, decay: Tensor, h0: Tensor | None, block_t: int, hist: Tensor | None = None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Forward scan (``hist`` None) or reverse scan with the decay and h0 gradients (``hist`` = forward h)."""
    batch, n, rank = x.shape
    f64 = x.dtype == torch.float64
    out = torch.empty_like(x)
    dd = dh0 = None
    if hist is not None:
        dd = torch.empty(batch, rank, dtype=torch.float64 if f64 else torch.float32, device=x.device)
        dh0 = None if h0 is None else torch.empty_like(h0)
    block_r = min(32, triton.next_power_of_2(rank))
    _decayed_scan_kernel[(batch, triton.cdiv(rank, block_r))](
        x, decay, x if h0 is None else h0, out, x if hist is None else hist, out if dd is None else dd, x, x, x, x, x,
        x if dh0 is None else dh0, x, n, rank, 0, HAS_H0=h0 is not None, REVERSE=hist is not None, LAYER=False,
        FROM_LOGIT=False, HAS_SCALE=False, HAS_GRAD_G=False, HAS_GRAD_H=False, F64=f64, BLOCK_T=block_t,
        BLOCK_R=block_r,
    )
    return out, dd, dh0


class _DecayedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, decay: Tensor, h0: Tensor | None, block_t: int) -> Tensor:
        h, _, _ = _launch(x, decay, h0, block_t)
        ctx.save_for_backward(h, decay, h0)
        ctx.block_t = block_t
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_h: Tensor) -> tuple[Tensor | None, ...]:
        h, decay, h0 = ctx.saved_tensors
        mu, dd, dh0 = _launch(grad_h.contiguous(), decay, h0, ctx.block_t, hist=h)
        grad_decay = dd.sum(0).to(decay.dtype) if ctx.needs_input_grad[1] else None
        grad_h0 = dh0 if h0 is not None and ctx.needs_input_grad[2] else None
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


class _ARSSMCore(torch.autograd.Function):
    """AR-SSM between its projections: ([U xc | V xc] (B, N, 2R) with any token stride, gate logits (B, N, R),
    decay parameter (R,), gate multiplier (R,) or None, h0 (B, R) or None) -> (y = (U xc) g h, g, h, per-row
    largest gate (B, R)). One launch forward, one backward; y, g and h are differentiable."""

    @staticmethod
    def forward(ctx, uv: Tensor, logits: Tensor, decay: Tensor, scale: Tensor | None, h0: Tensor | None,
                from_logit: bool, block_t: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        batch, n, rank = logits.shape
        real = torch.float64 if logits.dtype == torch.float64 else torch.float32
        sizes = (batch * n * rank, batch * rank)
        h, gmax = torch.empty(sum(sizes), dtype=real, device=uv.device).split(sizes)
        h, gmax = h.view(batch, n, rank), gmax.view(batch, rank)
        y, g = torch.empty(2, batch, n, rank, dtype=logits.dtype, device=uv.device).unbind(0)
        block_r = min(32, triton.next_power_of_2(rank))
        _decayed_scan_kernel[(batch, triton.cdiv(rank, block_r))](
            y, decay, y if h0 is None else h0, y, h, gmax, uv, logits, y if scale is None else scale, g, y, y, y,
            n, rank, uv.stride(1), HAS_H0=h0 is not None, REVERSE=False, LAYER=True, FROM_LOGIT=from_logit,
            HAS_SCALE=scale is not None, HAS_GRAD_G=False, HAS_GRAD_H=False, F64=real == torch.float64, BLOCK_T=block_t,
            BLOCK_R=block_r,
        )
        ctx.save_for_backward(uv, logits, decay, scale, h0, h)
        ctx.from_logit, ctx.block_t = from_logit, block_t
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(gmax)
        return y, g, h, gmax

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor | None, grad_g: Tensor | None, grad_h: Tensor | None, _: None
                 ) -> tuple[Tensor | None, ...]:
        uv, logits, decay, scale, h0, h = ctx.saved_tensors
        batch, n, rank = logits.shape
        grad_y = torch.zeros_like(logits) if grad_y is None else grad_y.contiguous()
        sizes = (batch * n * 2 * rank, batch * n * rank)
        grad_uv, grad_logits = torch.empty(sum(sizes), dtype=uv.dtype, device=uv.device).split(sizes)
        grad_uv, grad_logits = grad_uv.view(batch, n, 2 * rank), grad_logits.view(batch, n, rank)
        dd = torch.empty(batch, rank, dtype=h.dtype, device=h.device)
        dh0 = None if h0 is None else torch.empty_like(h0)
        block_r = min(32, triton.next_power_of_2(rank))
        _decayed_scan_kernel[(batch, triton.cdiv(rank, block_r))](
            grad_y, decay, grad_y if h0 is None else h0, grad_logits, h, dd, uv, logits,
            grad_y if scale is None else scale, grad_y if grad_g is None else grad_g.contiguous(), grad_uv,
            grad_y if dh0 is None else dh0, grad_y if grad_h is None else grad_h.contiguous(), n, rank, uv.stride(1),
            HAS_H0=h0 is not None, REVERSE=True, LAYER=True, FROM_LOGIT=ctx.from_logit, HAS_SCALE=scale is not None,
            HAS_GRAD_G=grad_g is not None, HAS_GRAD_H=grad_h is not None,
            F64=h.dtype == torch.float64, BLOCK_T=ctx.block_t, BLOCK_R=block_r,
        )
        grad_decay = dd.sum(0).to(decay.dtype) if ctx.needs_input_grad[2] else None
        return grad_uv, grad_logits, grad_decay, None, dh0 if ctx.needs_input_grad[4] else None, None, None


def ar_ssm_triton(
    uv: Tensor, logits: Tensor, decay: Tensor, *, from_logit: bool, scale: Tensor | None = None,
    h0: Tensor | None = None, block_t: int = BLOCK_T,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The AR-SSM between its projections in one launch forward and one backward: ``uv`` = [U xc | V xc]
    (B, N, 2R; a column slice of a wider projection is read in place), gate ``logits`` (B, N, R), ``decay`` the
    decays (R,) or, with ``from_logit``, the logits theta of exp(-(softplus(theta) + 1e-4)), ``scale`` (R,) a gate
    multiplier, ``h0`` (B, R) the carried state. Returns y = (U xc) g h (B, N, R), the gates g = sigmoid(logits)
    scale, the state h (B, N, R; float32 at least; its last token is the carried state) and the largest gate of
    each row (B, R). Differentiable in ``uv``, ``logits``, ``decay`` and ``h0`` (through y, g and h)."""
    if not HAS_TRITON:
        raise RuntimeError("ar_ssm_triton needs triton, which is not installed")
    batch, n, _ = logits.shape
    if uv.stride(-1) != 1 or uv.stride(0) != n * uv.stride(1):
        uv = uv.contiguous()
    return _ARSSMCore.apply(uv, logits.contiguous(), decay.contiguous(), scale, h0, from_logit, block_t)


def update_gate_stats_triton(gmax: Tensor, running_max: Tensor, updates: Tensor, momentum: float) -> None:
    """In place, one launch: the first ``gmax.shape[1]`` entries of ``running_max`` / ``updates`` (ARSSM's
    ``gate_running_max`` / ``gate_updates``) take the batch maximum of ``gmax`` (B, R) as
    ``ARSSM._update_gate_stats`` does."""
    batch, rank = gmax.shape
    block = min(128, triton.next_power_of_2(rank))
    _gate_stats_kernel[(triton.cdiv(rank, block),)](gmax, running_max, updates, batch, rank, momentum, BLOCK_R=block)
