"""Triton kernel of the Phase 2 boundary rule: the SNR decisions of a whole sequence in one launch.

The decisions of :class:`models.layers.fast_weights.MemoryBoundaryRule` (the multipliers of Gamma and eta set at
every boundary) depend on the memory, which depends on the earlier decisions, so the torch path walks the
chunks in Python with dozens of small operations per chunk. Once they are known, though, the memory is a plain
decayed linear attention with per-token gates ``log_decay * gamma_scale`` and keys ``k * eta * eta_scale``
(the decisions carry no gradient), which the chunked torch form or fla's ``chunk_simple_gla`` compute with a
length-independent number of launches. This kernel produces them: one program per (sequence, head) keeps S
(Dk x Dv) and the anchor in registers and walks the chunks; a chunk is one step of work, split only at its
events (a document reset or a boundary call): between events the memory advances by one decayed outer-product
sum (``tl.dot``), at a reset it is zeroed, at a call the rule decides from ||S - old||^2 / ||old||^2 with
old = anchor * exp(sum of log-decays since the last boundary).

Outputs per token: the multipliers in force (gamma_scale, eta_scale); per boundary call: the SNR (NaN where
undecided, i.e. no older memory) and ||S||; and the rule state after the last token. Compute is float32
(float64 for float64 inputs). Optional like every kernel here (``HAS_TRITON``); under ``TRITON_INTERPRET=1``
it runs on CPU tensors, which is how the tests compare it with the torch rule.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional
    triton = None

HAS_TRITON = triton is not None

if HAS_TRITON:

    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _head_program(H):
        """(program = sequence * H + head, the sequence, the head) of a program over (sequence, head) pairs."""
        pid = tl.program_id(0).to(tl.int64)
        return pid, pid // H, pid % H

    @triton.jit
    def _softplus(x):
        """torch's ``F.softplus`` (threshold 20) without overflow."""
        return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))

    @triton.jit
    def _layer_inputs(src_ptr, bias_ptr, row, h, t, tm, rk, rv, N, H, DK, DV, base_decay, dt: tl.constexpr):
        """The memory layer's prologue for tokens t of head h, from the projection (B, N, H (2 DK + DV + 1)) laid out
        [q | k | v | Gamma logits]: (raw q, raw k, ||k||, v, Gamma logits + bias, Gamma)."""
        width = H * (2 * DK + DV + 1)
        base = (row * N + t) * width
        mk = tm[:, None] & (rk < DK)[None, :]
        q = tl.load(src_ptr + base[:, None] + h * DK + rk[None, :], mask=mk, other=0.0).to(dt)
        k = tl.load(src_ptr + base[:, None] + (H + h) * DK + rk[None, :], mask=mk, other=0.0).to(dt)
        v = tl.load(src_ptr + base[:, None] + 2 * H * DK + h * DV + rv[None, :],
                    mask=tm[:, None] & (rv < DV)[None, :], other=0.0).to(dt)
        logit = tl.load(src_ptr + base + H * (2 * DK + DV) + h, mask=tm, other=0.0).to(dt) + tl.load(
            bias_ptr + h).to(dt)
        norm = tl.sqrt(tl.sum(k * k, 1))
        return q, k, norm, v, logit, _softplus(logit) + base_decay

    @triton.jit
    def _rule_kernel(
        src_ptr,  # RAW: the layer's projection (B, N, H (2 DK + DV + 1)); else k (BH, N, DK)
        v_ptr,  # (BH, N, DV) (not RAW)
        ld_ptr,  # (BH, N) log-decay (not RAW)
        eta_ptr,  # not RAW: (BH, N) per token; RAW: (H,) per head
        bias_ptr,  # RAW: (H,) bias of the Gamma logits
        rs_ptr,  # (B, N) int8 resets (read when HAS_RESET)
        pos_ptr,  # (B,) int64 document position entering (read when HAS_STATE)
        mem_ptr,  # (BH, DK, DV) memory entering (read when HAS_STATE)
        anchor_ptr,  # (BH, DK, DV) anchor entering (read when HAS_STATE)
        scal_ptr,  # (BH, 3) gamma_scale, eta_scale, anchor_log_decay entering (read when HAS_STATE)
        out_ptr,  # (BH, 2 DK DV + 3) out: memory, anchor, gamma_scale, eta_scale, anchor_log_decay leaving
        tok_ptr,  # (4, BH, N) out: gamma / eta multiplier per token, snr (decided calls), ||S|| (calls), else NaN
        end_ptr,  # (B,) int64 out: position leaving (written by head 0)
        calls_ptr,  # (B, N) bool out: boundary calls (written by head 0)
        qo_ptr, ko_ptr, vo_ptr, ldo_ptr,  # RAW out: q scale, k_hat eta eta_scale, v, log_decay gamma_scale
        gam_ptr,  # RAW out: Gamma (B, N, H)
        wr_ptr,  # RAW out: (BH,) max_t ||k_hat_t|| ||v_t|| (the largest write)
        N, H, DK, DV, period, thr, g_lo, g_hi, e_lo, e_hi, scale, base_decay, delta,
        RAW: tl.constexpr, HAS_RULE: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr,
        CHUNK: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, F64: tl.constexpr,
    ):
        dt = tl.float64 if F64 else tl.float32
        pid, row, h = _head_program(H)
        rk, rv = tl.arange(0, BK), tl.arange(0, BV)
        idx = tl.arange(0, CHUNK)
        mkv = (rk < DK)[:, None] & (rv < DV)[None, :]
        mo = rk[:, None] * DV + rv[None, :]
        moff = pid * DK * DV + mo
        if HAS_STATE:
            p = tl.load(pos_ptr + row).to(tl.int64)
        else:
            p = tl.full([], 0, tl.int64)
        if HAS_STATE and HAS_RULE:
            S = tl.load(mem_ptr + moff, mask=mkv, other=0.0).to(dt)
            A = tl.load(anchor_ptr + moff, mask=mkv, other=0.0).to(dt)
            gs = tl.load(scal_ptr + pid * 3).to(dt)
            es = tl.load(scal_ptr + pid * 3 + 1).to(dt)
            acc = tl.load(scal_ptr + pid * 3 + 2).to(dt)
        else:  # a fresh rule state (without a rule: what the torch path returns, unit scales and no anchor)
            S = tl.zeros([BK, BV], dtype=dt)
            A = tl.zeros([BK, BV], dtype=dt)
            gs = tl.full([], 1.0, dt)
            es = tl.full([], 1.0, dt)
            acc = tl.full([], 0.0, dt)
        wmax = tl.full([], 0.0, dt)
        nan = tl.full([CHUNK], float("nan"), dt)
        for c0 in range(0, N, CHUNK):
            t = c0 + idx
            tm = t < N
            if RAW:
                qc, kc, knorm, vc, logit, gam = _layer_inputs(src_ptr, bias_ptr, row, h, t, tm, rk, rv, N, H, DK, DV,
                                                              base_decay, dt)
                kc = kc / tl.maximum(knorm, 1e-12)[:, None]
                ld = tl.where(tm, -(gam * delta), 0.0)
                et = tl.zeros([CHUNK], dtype=dt) + tl.load(eta_ptr + h).to(dt)
            else:
                kc = tl.load(src_ptr + (pid * N + t)[:, None] * DK + rk[None, :],
                             mask=tm[:, None] & (rk < DK)[None, :], other=0.0).to(dt)
                vc = tl.load(v_ptr + (pid * N + t)[:, None] * DV + rv[None, :],
                             mask=tm[:, None] & (rv < DV)[None, :], other=0.0).to(dt)
                ld = tl.load(ld_ptr + pid * N + t, mask=tm, other=0.0).to(dt)
                et = tl.load(eta_ptr + pid * N + t, mask=tm, other=0.0).to(dt)
            # document positions and boundary calls (_positions, _boundary_calls), carried across chunks in p
            if HAS_RESET:
                rs = tl.load(rs_ptr + row * N + t, mask=tm, other=0) != 0
            else:
                rs = idx < 0
            last = tl.associative_scan(tl.where(rs, idx, -1), 0, _max_combine)
            pos = tl.where(last >= 0, idx - last, p + idx)
            call = (pos % period == 0) & ~rs & tm
            p = tl.sum(tl.where(idx == tl.minimum(N - c0, CHUNK) - 1, pos, 0), 0) + 1
            gsv = tl.zeros([CHUNK], dtype=dt) + 1.0
            esv = tl.zeros([CHUNK], dtype=dt) + 1.0
            snrv = nan
            normv = nan
            if HAS_RULE:
                ev = tl.where(rs, 2, tl.where(call, 1, 0))  # events: 2 reset, 1 call
                cur = c0 * 0  # first token of the current segment (chunk-local)
                search = c0 * 0  # events before this one are handled
                more = c0 < N
                while more:
                    e = tl.min(tl.where((ev != 0) & (idx >= search), idx, CHUNK), 0)  # next event (CHUNK: none)
                    seg = (idx >= cur) & (idx < e) & tm
                    lde = tl.where(seg, ld * gs, 0.0)
                    btot = tl.sum(lde, 0)
                    w = tl.where(seg, tl.exp(btot - tl.cumsum(lde, 0)) * et * es, 0.0)
                    S = tl.exp(btot) * S + tl.dot(tl.trans(kc * w[:, None]), vc, input_precision="ieee")
                    acc += btot
                    gsv = tl.where(seg, gs, gsv)
                    esv = tl.where(seg, es, esv)
                    kind = tl.sum(tl.where(idx == e, ev, 0), 0)  # 0 when e == CHUNK
                    is_reset = kind == 2
                    S = tl.where(is_reset, 0.0, S)
                    A = tl.where(is_reset, 0.0, A)
                    acc = tl.where(is_reset, 0.0, acc)
                    gs = tl.where(is_reset, 1.0, gs)
                    es = tl.where(is_reset, 1.0, es)
                    is_call = kind == 1
                    old = A * tl.exp(acc)
                    noise = tl.sum(tl.sum(old * old, 1), 0)
                    diff = S - old
                    signal = tl.sum(tl.sum(diff * diff, 1), 0)
                    live = noise > 0  # a decision needs older memory to compare with
                    snr = signal / tl.where(live, noise, 1.0)
                    up = tl.minimum(tl.maximum(thr / tl.where(snr > 0, snr, 1.0), g_lo), g_hi)
                    up = tl.where(snr > 0, up, g_hi)  # thr / 0 = inf, clamped
                    new_gs = tl.where(live & (snr < thr), up, 1.0)
                    new_es = tl.where(live & (snr > thr), tl.minimum(tl.maximum(snr / thr, e_lo), e_hi), 1.0)
                    gs = tl.where(is_call, new_gs, gs)
                    es = tl.where(is_call, new_es, es)
                    at = (idx == e) & is_call
                    snrv = tl.where(at, tl.where(live, snr, snrv), snrv)
                    normv = tl.where(at, tl.sqrt(tl.sum(tl.sum(S * S, 1), 0)), normv)
                    A = tl.where(is_call, S, A)
                    acc = tl.where(is_call, 0.0, acc)
                    cur = e
                    search = e + 1
                    more = e < CHUNK
            tok = pid * N + t
            tl.store(tok_ptr + tok, gsv, mask=tm)
            tl.store(tok_ptr + tl.num_programs(0) * N + tok, esv, mask=tm)
            tl.store(tok_ptr + 2 * tl.num_programs(0) * N + tok, snrv, mask=tm)
            tl.store(tok_ptr + 3 * tl.num_programs(0) * N + tok, normv, mask=tm)
            tl.store(calls_ptr + row * N + t, call, mask=tm & (h == 0))
            if RAW:  # the attention's inputs: q scaled, keys and gates carrying the decisions
                tl.store(qo_ptr + tok[:, None] * DK + rk[None, :], qc * scale, mask=tm[:, None] & (rk < DK)[None, :])
                tl.store(ko_ptr + tok[:, None] * DK + rk[None, :], kc * (et * esv)[:, None],
                         mask=tm[:, None] & (rk < DK)[None, :])
                tl.store(vo_ptr + tok[:, None] * DV + rv[None, :], vc, mask=tm[:, None] & (rv < DV)[None, :])
                tl.store(ldo_ptr + tok, ld * gsv, mask=tm)
                tl.store(gam_ptr + (row * N + t) * H + h, gam, mask=tm)
                write = tl.sqrt(tl.sum(kc * kc, 1)) * tl.sqrt(tl.sum(vc * vc, 1))
                wmax = tl.maximum(wmax, tl.max(tl.where(tm, write, 0.0), 0))
        tl.store(end_ptr + row, p, mask=h == 0)
        tl.store(out_ptr + pid * (2 * DK * DV + 3) + mo, S, mask=mkv)
        tl.store(out_ptr + pid * (2 * DK * DV + 3) + DK * DV + mo, A, mask=mkv)
        tl.store(out_ptr + pid * (2 * DK * DV + 3) + 2 * DK * DV, gs)
        tl.store(out_ptr + pid * (2 * DK * DV + 3) + 2 * DK * DV + 1, es)
        tl.store(out_ptr + pid * (2 * DK * DV + 3) + 2 * DK * DV + 2, acc)
        if RAW:
            tl.store(wr_ptr + pid, wmax)

    @triton.jit
    def _layer_inputs_backward_kernel(
        src_ptr, bias_ptr, eta_ptr,  # the projection, the Gamma bias (H,), eta (H,)
        tok_ptr,  # (4, BH, N): the multipliers per token (rows 0, 1)
        dq_ptr, dk_ptr, dv_ptr, dld_ptr,  # (BH, N, .) gradients of the attention's inputs
        dsrc_ptr,  # out: gradient of the projection
        N, H, DK, DV, scale, base_decay, delta,
        BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, F64: tl.constexpr,
    ):
        """The chain rule of the prologue for a tile of tokens: q scale, k / max(||k||, 1e-12) times eta and its
        multiplier, -(softplus(logit + bias) + base) delta times the Gamma multiplier."""
        dt = tl.float64 if F64 else tl.float32
        pid, row, h = _head_program(H)
        rk, rv = tl.arange(0, BK), tl.arange(0, BV)
        t = tl.program_id(1) * BT + tl.arange(0, BT)
        tm = t < N
        q, k, knorm, v, logit, gam = _layer_inputs(src_ptr, bias_ptr, row, h, t, tm, rk, rv, N, H, DK, DV,
                                                   base_decay, dt)
        tok = pid * N + t
        mk = tm[:, None] & (rk < DK)[None, :]
        mv = tm[:, None] & (rv < DV)[None, :]
        gsv = tl.load(tok_ptr + tok, mask=tm, other=1.0).to(dt)
        esv = tl.load(tok_ptr + tl.num_programs(0) * N + tok, mask=tm, other=1.0).to(dt)
        dq = tl.load(dq_ptr + tok[:, None] * DK + rk[None, :], mask=mk, other=0.0).to(dt) * scale
        dkh = tl.load(dk_ptr + tok[:, None] * DK + rk[None, :], mask=mk, other=0.0).to(dt) * (
            tl.load(eta_ptr + h).to(dt) * esv)[:, None]
        big = knorm > 1e-12
        safe = tl.where(big, knorm, 1.0)
        khat = k / safe[:, None]
        dk = tl.where(big[:, None], (dkh - khat * tl.sum(khat * dkh, 1)[:, None]) / safe[:, None], dkh * 1e12)
        dv = tl.load(dv_ptr + tok[:, None] * DV + rv[None, :], mask=mv, other=0.0).to(dt)
        slope = tl.where(logit > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-logit)))
        dlogit = tl.load(dld_ptr + tok, mask=tm, other=0.0).to(dt) * gsv * -delta * slope
        width = H * (2 * DK + DV + 1)
        base = (row * N + t) * width
        ty = dsrc_ptr.dtype.element_ty
        tl.store(dsrc_ptr + base[:, None] + h * DK + rk[None, :], dq.to(ty), mask=mk)
        tl.store(dsrc_ptr + base[:, None] + (H + h) * DK + rk[None, :], dk.to(ty), mask=mk)
        tl.store(dsrc_ptr + base[:, None] + 2 * H * DK + h * DV + rv[None, :], dv.to(ty), mask=mv)
        tl.store(dsrc_ptr + base + H * (2 * DK + DV) + h, dlogit.to(ty), mask=tm)


def _rule_buffers(batch: int, heads: int, n: int, dk: int, dv: int, dtype: torch.dtype, device: torch.device,
                  extra: tuple[int, ...] = ()) -> tuple[Tensor, ...]:
    """The rule kernel's outputs, carved from two allocations: (rule state leaving (BH, 2 DK DV + 3), per-token
    records (4, B, H, N), position leaving (B,) int64, calls (B, N) bool, then flat pieces of the ``extra`` sizes)."""
    bh = batch * heads
    sizes = (bh * (2 * dk * dv + 3), 4 * bh * n, *extra)
    out, tok, *rest = torch.empty(sum(sizes), dtype=dtype, device=device).split(sizes)
    ints = torch.empty(8 * batch + batch * n, dtype=torch.int8, device=device)
    return (out.view(bh, -1), tok.view(4, batch, heads, n), ints[: 8 * batch].view(torch.int64),
            ints[8 * batch :].view(torch.bool).view(batch, n), *rest)


def _rule_results(out: Tensor, tok: Tensor, end: Tensor, calls: Tensor, batch: int, heads: int, dk: int, dv: int
                  ) -> dict[str, Tensor]:
    mem = out[:, : dk * dv].view(batch, heads, dk, dv)
    anchor = out[:, dk * dv : 2 * dk * dv].view(batch, heads, dk, dv)
    scal = out[:, 2 * dk * dv :].view(batch, heads, 3)
    return {"gamma_scale_tokens": tok[0], "eta_scale_tokens": tok[1], "snr": tok[2], "norm": tok[3], "memory": mem,
            "anchor": anchor, "gamma_scale": scal[..., 0], "eta_scale": scal[..., 1],
            "anchor_log_decay": scal[..., 2], "position": end, "calls": calls}


def _rule_constants(snr_threshold: float | None, gamma_bounds: tuple[float, float],
                    eta_bounds: tuple[float, float]) -> tuple[float, ...]:
    return (1.0 if snr_threshold is None else float(snr_threshold), float(gamma_bounds[0]), float(gamma_bounds[1]),
            float(eta_bounds[0]), float(eta_bounds[1]))


def _state_args(state: tuple[Tensor, ...] | None, fallback: Tensor, dtype: torch.dtype) -> list[Tensor]:
    """(position, memory, anchor, [gamma_scale, eta_scale, anchor_log_decay]) for the kernel, detached."""
    if state is None:
        return [fallback] * 4
    position, memory, anchor, *scales = state
    return [position, memory.detach().to(dtype).contiguous(), anchor.detach().to(dtype).contiguous(),
            torch.stack(scales, -1).detach().to(dtype).contiguous()]


def _check_device(t: Tensor, backend: str) -> None:
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"backend {backend!r} runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1, "
                           "for tests); use backend 'torch' on the CPU")


def layer_inputs_triton(
    proj: Tensor, bias: Tensor, eta: Tensor, reset: Tensor | None, state: tuple[Tensor, ...] | None, *, heads: int,
    dk: int, dv: int, dtype: torch.dtype, scale: float, base_decay: float, delta: float, chunk_size: int,
    rule: tuple[float | None, tuple[float, float], tuple[float, float]] | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """The memory layer's projection ``proj`` (B, N, H (2 Dk + Dv + 1)) = [q | k | v | Gamma logits] -> the decayed
    attention's inputs q * scale, k_hat * eta * eta_scale, v (B, H, N, .) and log_decay * gamma_scale (B, H, N),
    with k_hat = k / max(||k||, 1e-12), log_decay = -(softplus(logits + bias) + base_decay) delta and the boundary
    rule (``rule`` = (snr_threshold, gamma_bounds, eta_bounds), every ``chunk_size`` document tokens; None: no rule)
    deciding the multipliers; one launch. Also returns Gamma (B, N, H), the largest write ||k_hat|| ||v|| (B, H)
    and the rule's results as :func:`rule_decisions_triton`. ``state``: as there, or None. Differentiable in
    ``proj`` and ``bias`` (the decisions carry no gradient, as in the torch path)."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton memory kernels need triton, which is not installed")
    meta = {"heads": heads, "dk": dk, "dv": dv, "dtype": dtype, "scale": float(scale),
            "base_decay": float(base_decay), "delta": float(delta), "chunk_size": chunk_size, "period": chunk_size,
            "has_rule": rule is not None, "rule": _rule_constants(*(rule or (None, (1.0, 1.0), (1.0, 1.0))))}
    rs = None if reset is None else reset.contiguous().view(torch.int8)
    q, k, v, ld, gamma, write, out, tok, end, calls = _LayerInputs.apply(proj.contiguous(), bias, eta, rs, state,
                                                                         meta)
    return q, k, v, ld, gamma, write, _rule_results(out, tok, end, calls, proj.shape[0], heads, dk, dv)


def _tile(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def rule_decisions_triton(
    k: Tensor, v: Tensor, log_decay: Tensor, eta: Tensor, reset: Tensor | None, state: tuple[Tensor, ...] | None, *,
    period: int, snr_threshold: float | None, gamma_bounds: tuple[float, float], eta_bounds: tuple[float, float],
    chunk_size: int,
) -> dict[str, Tensor]:
    """Run the boundary rule over a sequence (no gradient).

    k (B, H, N, Dk), v (B, H, N, Dv), log_decay and eta (B, H, N), reset (B, N) bool, all of one floating dtype
    (float32 or float64), and the rule state entering the sequence as (position (B,) int64, memory, anchor
    (B, H, Dk, Dv), gamma_scale, eta_scale, anchor_log_decay (B, H)) or None (a fresh one). The rule runs at
    every ``period``-th token of a document. Returns ``gamma_scale`` / ``eta_scale`` per token (B, H, N), ``snr``
    (B, H, N; NaN except at decided calls), ``norm`` (B, H, N; NaN except at calls), ``calls`` (B, N) and the final
    ``memory``, ``anchor``, ``gamma_scale``, ``eta_scale``, ``anchor_log_decay`` and ``position``.
    """
    if not HAS_TRITON:
        raise RuntimeError("the Triton boundary-rule kernel needs triton, which is not installed")
    batch, heads, n, dk = k.shape
    dv = v.shape[-1]
    out, tok, end, calls = _rule_buffers(batch, heads, n, dk, dv, k.dtype, k.device)
    k, v, log_decay, eta = (x.detach().to(k.dtype).contiguous() for x in (k, v, log_decay, eta))
    rs = k if reset is None else reset.contiguous().view(torch.int8)
    _rule_kernel[(batch * heads,)](
        k, v, log_decay, eta, k, rs, *_state_args(state, k, k.dtype), out, tok, end, calls, k, k, k, k, k, k,
        n, heads, dk, dv, period, *_rule_constants(snr_threshold, gamma_bounds, eta_bounds), 1.0, 0.0, 1.0,
        RAW=False, HAS_RULE=True, HAS_STATE=state is not None, HAS_RESET=reset is not None, CHUNK=_tile(chunk_size),
        BK=_tile(dk), BV=_tile(dv), F64=k.dtype == torch.float64,
    )
    return _rule_results(out, tok, end, calls, batch, heads, dk, dv)


class _LayerInputs(torch.autograd.Function):
    """The memory layer's projection -> the decayed attention's inputs (q, keys, values, gates) with the boundary
    rule's decisions folded in: one launch forward (the rule kernel in RAW mode), one backward."""

    @staticmethod
    def forward(ctx, proj: Tensor, bias: Tensor, eta: Tensor, reset: Tensor | None, state: tuple | None,
                meta: dict) -> tuple[Tensor, ...]:
        batch, n, _ = proj.shape
        heads, dk, dv, dtype = meta["heads"], meta["dk"], meta["dv"], meta["dtype"]
        bh = batch * heads
        sizes = (bh * n * dk, bh * n * dk, bh * n * dv, bh * n, batch * n * heads, bh)
        out, tok, end, calls, *inputs = _rule_buffers(batch, heads, n, dk, dv, dtype, proj.device, sizes)
        q, k, v, ld = (x.view(batch, heads, n, -1) for x in inputs[:4])
        gamma, write = inputs[4].view(batch, n, heads), inputs[5].view(batch, heads)
        rs = proj if reset is None else reset
        _rule_kernel[(bh,)](
            proj, proj, proj, eta, bias, rs, *_state_args(state, proj, dtype), out, tok, end, calls, q, k, v, ld,
            gamma, write, n, heads, dk, dv, meta["period"], *meta["rule"], meta["scale"], meta["base_decay"],
            meta["delta"], RAW=True, HAS_RULE=meta["has_rule"], HAS_STATE=state is not None,
            HAS_RESET=reset is not None, CHUNK=_tile(meta["chunk_size"]), BK=_tile(dk), BV=_tile(dv),
            F64=dtype == torch.float64,
        )
        ctx.save_for_backward(proj, bias, eta, tok)
        ctx.meta = meta
        ctx.set_materialize_grads(False)  # no zero gradients for the records
        for x in (gamma, write, out, tok, end, calls):
            ctx.mark_non_differentiable(x)
        return q, k, v, ld.view(batch, heads, n), gamma, write, out, tok, end, calls

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dq: Tensor, dk: Tensor, dv: Tensor, dld: Tensor, *_: None) -> tuple[Tensor | None, ...]:
        proj, bias, eta, tok = ctx.saved_tensors
        meta = ctx.meta
        batch, n, _ = proj.shape
        heads, dk_, dv_ = meta["heads"], meta["dk"], meta["dv"]
        shapes = ((batch, heads, n, dk_), (batch, heads, n, dk_), (batch, heads, n, dv_), (batch, heads, n))
        dq, dk, dv, dld = (tok.new_zeros(s) if g is None else g.contiguous() for g, s in zip((dq, dk, dv, dld), shapes))
        grad = torch.empty_like(proj)
        bt = min(64, _tile(n))
        _layer_inputs_backward_kernel[(batch * heads, triton.cdiv(n, bt))](
            proj, bias, eta, tok, dq, dk, dv, dld, grad, n, heads, dk_, dv_, meta["scale"], meta["base_decay"],
            meta["delta"], BT=bt, BK=_tile(dk_), BV=_tile(dv_), F64=meta["dtype"] == torch.float64,
        )
        grad_bias = grad[..., heads * (2 * dk_ + dv_):].sum((0, 1)).to(bias.dtype) if ctx.needs_input_grad[1] else None
        return grad, grad_bias, None, None, None, None


if HAS_TRITON:

    @triton.jit
    def _attn_chunk(q_ptr, k_ptr, v_ptr, ld_ptr, rs_ptr, pid, row, c, N, DK, DV,
                    HAS_RESET: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    dt: tl.constexpr):
        """What the forward and the backward kernel both need of chunk c: its tokens t and their mask, q, k, v, the
        cumulative log-decay b, the masked decays exp(b_i - b_j) (causal, same segment), the weights of the entry
        memory (exp(b_i), first segment) and of the exit memory (exp(b_last - b_i), last segment), and the entry
        memory's factor in the exit memory (0 when a reset cuts the chunk)."""
        rk, rv, idx = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BT)
        mk, mv = rk < DK, rv < DV
        t = c * BT + idx
        tm = t < N
        q = tl.load(q_ptr + (pid * N + t)[:, None] * DK + rk[None, :], mask=tm[:, None] & mk[None, :],
                    other=0.0).to(dt)
        k = tl.load(k_ptr + (pid * N + t)[:, None] * DK + rk[None, :], mask=tm[:, None] & mk[None, :],
                    other=0.0).to(dt)
        v = tl.load(v_ptr + (pid * N + t)[:, None] * DV + rv[None, :], mask=tm[:, None] & mv[None, :],
                    other=0.0).to(dt)
        b = tl.cumsum(tl.load(ld_ptr + pid * N + t, mask=tm, other=0.0).to(dt), 0)
        b_last = tl.sum(tl.where(idx == BT - 1, b, 0.0), 0)
        causal = idx[:, None] >= idx[None, :]
        if HAS_RESET:
            seg = tl.cumsum(tl.load(rs_ptr + row * N + t, mask=tm, other=0), 0)
            seg_last = tl.max(seg, 0)
            keep = causal & (seg[:, None] == seg[None, :])
            first = seg == 0
            last = seg == seg_last
            carry = tl.where(seg_last == 0, tl.exp(b_last), 0.0)
        else:
            keep = causal
            first = idx >= 0
            last = idx >= 0
            carry = tl.exp(b_last)
        decay = tl.where(keep, tl.exp(tl.minimum(b[:, None] - b[None, :], 0.0)), 0.0)
        w_entry = tl.where(first, tl.exp(b), 0.0)
        w_last = tl.where(last, tl.exp(tl.minimum(b_last - b, 0.0)), 0.0)
        return t, tm, q, k, v, decay, w_entry, w_last, carry

    @triton.jit
    def _attn_forward_kernel(
        q_ptr, k_ptr, v_ptr,  # (BH, N, DK), (BH, N, DK), (BH, N, DV)
        ld_ptr,  # (BH, N)
        rs_ptr,  # (B, N) int8 resets (read when HAS_RESET)
        m0_ptr,  # (BH, DK, DV) entry memory (read when HAS_M0, else zeros)
        o_ptr,  # (B, H, N, DV) out, element (b, h, t) at b s_ob + h s_oh + t s_ot
        ent_ptr,  # (BH, NC, DK, DV) out: memory entering each chunk (for the backward)
        mf_ptr,  # (BH, DK, DV) out: final memory
        N, H, DK, DV, NC, s_ob, s_oh, s_ot,
        HAS_RESET: tl.constexpr, HAS_M0: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        F64: tl.constexpr, PRECISION: tl.constexpr,
    ):
        dt = tl.float64 if F64 else tl.float32
        pid, row, _ = _head_program(H)
        rk, rv = tl.arange(0, BK), tl.arange(0, BV)
        mk, mv = rk < DK, rv < DV
        moff = rk[:, None] * DV + rv[None, :]
        if HAS_M0:
            S = tl.load(m0_ptr + pid * DK * DV + moff, mask=mk[:, None] & mv[None, :], other=0.0).to(dt)
        else:
            S = tl.zeros([BK, BV], dtype=dt)
        for c in range(0, NC):
            t, tm, q, k, v, decay, w_entry, w_last, carry = _attn_chunk(q_ptr, k_ptr, v_ptr, ld_ptr, rs_ptr, pid, row,
                                                                        c, N, DK, DV, HAS_RESET, BT, BK, BV, dt)
            tl.store(ent_ptr + (pid * NC + c) * DK * DV + moff, S, mask=mk[:, None] & mv[None, :])
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * decay
            o = tl.dot(scores, v, input_precision=PRECISION)
            o += tl.dot(q * w_entry[:, None], S, input_precision=PRECISION)
            tl.store(o_ptr + row * s_ob + (pid % H) * s_oh + t[:, None] * s_ot + rv[None, :],
                     o.to(o_ptr.dtype.element_ty), mask=tm[:, None] & mv[None, :])
            S = carry * S + tl.dot(tl.trans(k * w_last[:, None]), v, input_precision=PRECISION)
        tl.store(mf_ptr + pid * DK * DV + moff, S, mask=mk[:, None] & mv[None, :])

    @triton.jit
    def _attn_backward_kernel(
        q_ptr, k_ptr, v_ptr, ld_ptr, rs_ptr,
        ent_ptr,  # (BH, NC, DK, DV) memory entering each chunk
        do_ptr,  # (B, H, N, DV) dL/do, strides as o's
        dmf_ptr,  # (BH, DK, DV) dL/d final memory (read when HAS_DMF, else zeros)
        dq_ptr, dk_ptr, dv_ptr, dld_ptr,  # out, like q, k, v, ld
        dm0_ptr,  # (BH, DK, DV) out: dL/d entry memory
        N, H, DK, DV, NC, s_ob, s_oh, s_ot,
        HAS_RESET: tl.constexpr, HAS_DMF: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
        F64: tl.constexpr, PRECISION: tl.constexpr,
    ):
        dt = tl.float64 if F64 else tl.float32
        pid, row, _ = _head_program(H)
        rk, rv, idx = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BT)
        mk, mv = rk < DK, rv < DV
        mkv = mk[:, None] & mv[None, :]
        moff = rk[:, None] * DV + rv[None, :]
        if HAS_DMF:  # dL/d memory leaving the chunk
            dS = tl.load(dmf_ptr + pid * DK * DV + moff, mask=mkv, other=0.0).to(dt)
        else:
            dS = tl.zeros([BK, BV], dtype=dt)
        for i in range(0, NC):
            c = NC - 1 - i
            t, tm, q, k, v, decay, w_entry, w_last, carry = _attn_chunk(q_ptr, k_ptr, v_ptr, ld_ptr, rs_ptr, pid, row,
                                                                        c, N, DK, DV, HAS_RESET, BT, BK, BV, dt)
            do = tl.load(do_ptr + row * s_ob + (pid % H) * s_oh + t[:, None] * s_ot + rv[None, :],
                         mask=tm[:, None] & mv[None, :], other=0.0).to(dt)
            S = tl.load(ent_ptr + (pid * NC + c) * DK * DV + moff, mask=mkv, other=0.0).to(dt)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * decay  # (i, j)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION) * decay  # dL/d scores (i, j)
            dq = tl.dot(dp, k, input_precision=PRECISION) + w_entry[:, None] * tl.dot(do, tl.trans(S),
                                                                                    input_precision=PRECISION)
            dk = tl.dot(tl.trans(dp), q, input_precision=PRECISION) + w_last[:, None] * tl.dot(
                v, tl.trans(dS), input_precision=PRECISION)
            dv = tl.dot(tl.trans(scores), do, input_precision=PRECISION) + w_last[:, None] * tl.dot(
                k, dS, input_precision=PRECISION)
            s_out = carry * S + tl.dot(tl.trans(k * w_last[:, None]), v, input_precision=PRECISION)
            # gradient of the cumulative log-decay b_i, then of ld_t = b_t - b_{t-1}: a reverse cumsum
            db = tl.sum(q * dq, 1) - tl.sum(k * dk, 1)
            db += tl.where(idx == BT - 1, tl.sum(tl.sum(dS * s_out, 1), 0), 0.0)
            dld = tl.cumsum(db, 0, reverse=True)
            offk = (pid * N + t)[:, None] * DK + rk[None, :]
            offv = (pid * N + t)[:, None] * DV + rv[None, :]
            tl.store(dq_ptr + offk, dq.to(dq_ptr.dtype.element_ty), mask=tm[:, None] & mk[None, :])
            tl.store(dk_ptr + offk, dk.to(dk_ptr.dtype.element_ty), mask=tm[:, None] & mk[None, :])
            tl.store(dv_ptr + offv, dv.to(dv_ptr.dtype.element_ty), mask=tm[:, None] & mv[None, :])
            tl.store(dld_ptr + pid * N + t, dld.to(dld_ptr.dtype.element_ty), mask=tm)
            dS = carry * dS + tl.dot(tl.trans(q * w_entry[:, None]), do, input_precision=PRECISION)
        tl.store(dm0_ptr + pid * DK * DV + moff, dS, mask=mkv)


def _attn_meta(q: Tensor, v: Tensor, chunk_size: int) -> dict:
    n, dk, dv = q.shape[2], q.shape[3], v.shape[3]
    bt = max(16, min(64, triton.next_power_of_2(chunk_size)))
    f64 = q.dtype == torch.float64
    precision = "ieee" if f64 or not (q.is_cuda and torch.backends.cuda.matmul.allow_tf32) else "tf32"
    return {"BT": bt, "BK": _tile(dk), "BV": _tile(dv), "F64": f64, "PRECISION": precision, "NC": triton.cdiv(n, bt)}


class _DecayedAttention(torch.autograd.Function):
    """(q, k, v (B, H, N, .), log_decay (B, H, N), entry memory or None, resets (B, N) int8 or None) -> (o, final
    memory); o is (B, H, N, Dv), or (B, N, H Dv) with ``heads_last`` (the layout the output projection reads)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, memory: Tensor | None, reset: Tensor | None,
                chunk_size: int, heads_last: bool) -> tuple[Tensor, Tensor]:
        batch, heads, n, dk = q.shape
        dv = v.shape[-1]
        meta = _attn_meta(q, v, chunk_size)
        nc = meta.pop("NC")
        sizes = (batch * heads * n * dv, batch * heads * nc * dk * dv, batch * heads * dk * dv)
        o, entries, final = torch.empty(sum(sizes), dtype=q.dtype, device=q.device).split(sizes)
        o = o.view(batch, n, heads * dv) if heads_last else o.view(batch, heads, n, dv)
        strides = (n * heads * dv, dv, heads * dv) if heads_last else (heads * n * dv, n * dv, dv)
        rs = q if reset is None else reset
        _attn_forward_kernel[(batch * heads,)](q, k, v, log_decay, rs, q if memory is None else memory, o, entries,
                                               final, n, heads, dk, dv, nc, *strides, HAS_RESET=reset is not None,
                                               HAS_M0=memory is not None, **meta)
        ctx.save_for_backward(q, k, v, log_decay, rs, entries)
        ctx.has_reset, ctx.chunk_size, ctx.strides = reset is not None, chunk_size, strides
        ctx.set_materialize_grads(False)  # the final memory often reaches no loss: no zeros for it
        return o, final.view(batch, heads, dk, dv)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_o: Tensor | None, grad_final: Tensor | None) -> tuple[Tensor | None, ...]:
        q, k, v, log_decay, rs, entries = ctx.saved_tensors
        batch, heads, n, dk = q.shape
        dv = v.shape[-1]
        meta = _attn_meta(q, v, ctx.chunk_size)
        nc = meta.pop("NC")
        grad_o = torch.zeros_like(v) if grad_o is None else grad_o.contiguous()
        strides = (heads * n * dv, n * dv, dv) if grad_o.shape == v.shape else ctx.strides
        sizes = (q.numel(), k.numel(), v.numel(), log_decay.numel(), batch * heads * dk * dv)
        dq, dk_, dv_, dld, dm0 = (x.view(shape) for x, shape in zip(
            torch.empty(sum(sizes), dtype=q.dtype, device=q.device).split(sizes),
            (q.shape, k.shape, v.shape, log_decay.shape, (batch, heads, dk, dv))))
        _attn_backward_kernel[(batch * heads,)](q, k, v, log_decay, rs, entries, grad_o,
                                                q if grad_final is None else grad_final.contiguous(), dq, dk_, dv_,
                                                dld, dm0, n, heads, dk, dv, nc, *strides, HAS_RESET=ctx.has_reset,
                                                HAS_DMF=grad_final is not None, **meta)
        return dq, dk_, dv_, dld, dm0 if ctx.needs_input_grad[4] else None, None, None, None


def decayed_attention_triton(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, memory: Tensor | None,
                             reset: Tensor | None, chunk_size: int = 64, heads_last: bool = False
                             ) -> tuple[Tensor, Tensor]:
    """o (B, H, N, Dv) and the final memory of S_t = exp(log_decay_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, S zeroed
    before every reset token (B, N); one forward launch and one backward launch (chunks of up to 64 tokens,
    masked decayed attention inside, the memory carried in registers; the backward walks the chunks in reverse
    with dL/dS, and the log-decay gradient is the reverse cumulative sum of q.dq - k.dk). Differentiable in q, k,
    v, log_decay and memory (None: zeros); all of one float32 / float64 dtype. ``heads_last``: o as (B, N, H Dv)."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton decayed attention needs triton, which is not installed")
    q, k, v, log_decay = (x.contiguous() for x in (q, k, v, log_decay))
    memory = None if memory is None else memory.to(q.dtype).contiguous()
    reset = None if reset is None else reset.contiguous().view(torch.int8)
    return _DecayedAttention.apply(q, k, v, log_decay, memory, reset, chunk_size, heads_last)
