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

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional
    triton = None

HAS_TRITON = triton is not None
EVENT_CALL, EVENT_RESET = 1, 2

if HAS_TRITON:

    @triton.jit
    def _rule_kernel(
        k_ptr,  # (BH, N, DK)
        v_ptr,  # (BH, N, DV)
        ld_ptr,  # (BH, N) log-decay
        eta_ptr,  # (BH, N)
        ev_ptr,  # (B, N) int32 events: 1 = boundary call, 2 = reset
        mem_ptr,  # (BH, DK, DV) in: initial memory; out: final memory
        anchor_ptr,  # (BH, DK, DV) in/out
        scal_ptr,  # (BH, 3) in/out: gamma_scale, eta_scale, anchor_log_decay
        gs_ptr,  # (BH, N) out: gamma multiplier per token
        es_ptr,  # (BH, N) out: eta multiplier per token
        snr_ptr,  # (BH, N) out at decided calls (else left as is)
        norm_ptr,  # (BH, N) out at calls: ||S|| before the rule
        N,
        H,
        DK,
        DV,
        thr,
        g_lo,
        g_hi,
        e_lo,
        e_hi,
        HAS_THR: tl.constexpr,
        CHUNK: tl.constexpr,
        BK: tl.constexpr,
        BV: tl.constexpr,
        F64: tl.constexpr,
    ):
        dt = tl.float64 if F64 else tl.float32
        pid = tl.program_id(0).to(tl.int64)
        row = pid // H
        rk = tl.arange(0, BK)
        rv = tl.arange(0, BV)
        idx = tl.arange(0, CHUNK)
        mkv = (rk < DK)[:, None] & (rv < DV)[None, :]
        moff = pid * DK * DV + rk[:, None] * DV + rv[None, :]
        S = tl.load(mem_ptr + moff, mask=mkv, other=0.0).to(dt)
        A = tl.load(anchor_ptr + moff, mask=mkv, other=0.0).to(dt)
        gs = tl.load(scal_ptr + pid * 3).to(dt)
        es = tl.load(scal_ptr + pid * 3 + 1).to(dt)
        acc = tl.load(scal_ptr + pid * 3 + 2).to(dt)
        for c0 in range(0, N, CHUNK):
            t = c0 + idx
            tm = t < N
            kc = tl.load(k_ptr + (pid * N + t)[:, None] * DK + rk[None, :], mask=tm[:, None] & (rk < DK)[None, :],
                         other=0.0).to(dt)
            vc = tl.load(v_ptr + (pid * N + t)[:, None] * DV + rv[None, :], mask=tm[:, None] & (rv < DV)[None, :],
                         other=0.0).to(dt)
            ld = tl.load(ld_ptr + pid * N + t, mask=tm, other=0.0).to(dt)
            et = tl.load(eta_ptr + pid * N + t, mask=tm, other=0.0).to(dt)
            ev = tl.load(ev_ptr + row * N + t, mask=tm, other=0)
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
                tl.store(gs_ptr + pid * N + t, tl.zeros([CHUNK], dtype=dt) + gs, mask=seg)
                tl.store(es_ptr + pid * N + t, tl.zeros([CHUNK], dtype=dt) + es, mask=seg)
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
                if HAS_THR:
                    up = tl.minimum(tl.maximum(thr / tl.where(snr > 0, snr, 1.0), g_lo), g_hi)
                    up = tl.where(snr > 0, up, g_hi)  # thr / 0 = inf, clamped
                    new_gs = tl.where(live & (snr < thr), up, 1.0)
                    new_es = tl.where(live & (snr > thr), tl.minimum(tl.maximum(snr / thr, e_lo), e_hi), 1.0)
                    gs = tl.where(is_call, new_gs, gs)
                    es = tl.where(is_call, new_es, es)
                tpos = pid * N + c0 + e
                tl.store(snr_ptr + tpos, snr, mask=is_call & live)
                tl.store(norm_ptr + tpos, tl.sqrt(tl.sum(tl.sum(S * S, 1), 0)), mask=is_call)
                A = tl.where(is_call, S, A)
                acc = tl.where(is_call, 0.0, acc)
                cur = e
                search = e + 1
                more = e < CHUNK
        tl.store(mem_ptr + moff, S, mask=mkv)
        tl.store(anchor_ptr + moff, A, mask=mkv)
        tl.store(scal_ptr + pid * 3, gs)
        tl.store(scal_ptr + pid * 3 + 1, es)
        tl.store(scal_ptr + pid * 3 + 2, acc)


def rule_decisions_triton(
    k: Tensor, v: Tensor, log_decay: Tensor, eta: Tensor, calls: Tensor, reset: Tensor | None, memory: Tensor,
    anchor: Tensor, gamma_scale: Tensor, eta_scale: Tensor, anchor_log_decay: Tensor, *,
    snr_threshold: float | None, gamma_bounds: tuple[float, float], eta_bounds: tuple[float, float], chunk_size: int,
) -> dict[str, Tensor]:
    """Run the boundary rule over a sequence (no gradient).

    k (B, H, N, Dk), v (B, H, N, Dv), log_decay and eta (B, H, N), calls / reset (B, N) bool, and the rule state
    entering the sequence (memory and anchor (B, H, Dk, Dv); gamma_scale, eta_scale, anchor_log_decay (B, H)),
    all of one floating dtype (float32 or float64). Returns ``gamma_scale`` / ``eta_scale`` per token (B, H, N),
    ``snr`` (B, H, N; NaN except at decided calls), ``norm`` (B, H, N; NaN except at calls) and the final
    ``memory``, ``anchor``, ``gamma_scale``, ``eta_scale``, ``anchor_log_decay``.
    """
    if not HAS_TRITON:
        raise RuntimeError("the Triton boundary-rule kernel needs triton, which is not installed")
    batch, heads, n, dk = k.shape
    dv = v.shape[-1]
    dtype = k.dtype
    events = calls.to(torch.int32)
    if reset is not None:
        events = torch.where(reset, EVENT_RESET, events)
    mem = memory.detach().to(dtype).contiguous().clone()
    anc = anchor.detach().to(dtype).contiguous().clone()
    scal = torch.stack([gamma_scale, eta_scale, anchor_log_decay], -1).detach().to(dtype).contiguous()
    gs = torch.empty(batch, heads, n, dtype=dtype, device=k.device)
    es = torch.empty_like(gs)
    snr, norm = torch.full_like(gs, float("nan")), torch.full_like(gs, float("nan"))
    thr = 1.0 if snr_threshold is None else float(snr_threshold)
    _rule_kernel[(batch * heads,)](
        k.detach().contiguous(), v.detach().contiguous(), log_decay.detach().contiguous(),
        eta.detach().to(dtype).contiguous(), events.contiguous(), mem, anc, scal, gs, es, snr, norm,
        n, heads, dk, dv, thr, float(gamma_bounds[0]), float(gamma_bounds[1]), float(eta_bounds[0]),
        float(eta_bounds[1]), HAS_THR=snr_threshold is not None, CHUNK=max(16, triton.next_power_of_2(chunk_size)),
        BK=max(16, triton.next_power_of_2(dk)), BV=max(16, triton.next_power_of_2(dv)), F64=dtype == torch.float64,
    )
    return {"gamma_scale_tokens": gs, "eta_scale_tokens": es, "snr": snr, "norm": norm, "memory": mem,
            "anchor": anc, "gamma_scale": scal[..., 0], "eta_scale": scal[..., 1], "anchor_log_decay": scal[..., 2]}


if HAS_TRITON:

    @triton.jit
    def _attn_forward_kernel(
        q_ptr, k_ptr, v_ptr,  # (BH, N, DK), (BH, N, DK), (BH, N, DV)
        ld_ptr,  # (BH, N)
        rs_ptr,  # (B, N) int32 resets (read when HAS_RESET)
        m0_ptr,  # (BH, DK, DV) entry memory
        o_ptr,  # (BH, N, DV) out
        ent_ptr,  # (BH, NC, DK, DV) out: memory entering each chunk (for the backward)
        mf_ptr,  # (BH, DK, DV) out: final memory
        N, H, DK, DV, NC,
        HAS_RESET: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, F64: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        dt = tl.float64 if F64 else tl.float32
        pid = tl.program_id(0).to(tl.int64)
        row = pid // H
        rk, rv, idx = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BT)
        mk, mv = rk < DK, rv < DV
        moff = rk[:, None] * DV + rv[None, :]
        S = tl.load(m0_ptr + pid * DK * DV + moff, mask=mk[:, None] & mv[None, :], other=0.0).to(dt)
        causal = idx[:, None] >= idx[None, :]
        for c in range(0, NC):
            t = c * BT + idx
            tm = t < N
            q = tl.load(q_ptr + (pid * N + t)[:, None] * DK + rk[None, :], mask=tm[:, None] & mk[None, :], other=0.0)
            k = tl.load(k_ptr + (pid * N + t)[:, None] * DK + rk[None, :], mask=tm[:, None] & mk[None, :], other=0.0)
            v = tl.load(v_ptr + (pid * N + t)[:, None] * DV + rv[None, :], mask=tm[:, None] & mv[None, :], other=0.0)
            b = tl.cumsum(tl.load(ld_ptr + pid * N + t, mask=tm, other=0.0).to(dt), 0)
            b_last = tl.sum(tl.where(idx == BT - 1, b, 0.0), 0)
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
            tl.store(ent_ptr + (pid * NC + c) * DK * DV + moff, S, mask=mk[:, None] & mv[None, :])
            decay = tl.where(keep, tl.exp(tl.minimum(b[:, None] - b[None, :], 0.0)), 0.0)
            scores = tl.dot(q.to(dt), tl.trans(k.to(dt)), input_precision=PRECISION) * decay
            o = tl.dot(scores, v.to(dt), input_precision=PRECISION)
            w_entry = tl.where(first, tl.exp(b), 0.0)
            o += tl.dot(q.to(dt) * w_entry[:, None], S, input_precision=PRECISION)
            tl.store(o_ptr + (pid * N + t)[:, None] * DV + rv[None, :], o.to(o_ptr.dtype.element_ty),
                     mask=tm[:, None] & mv[None, :])
            w_last = tl.where(last, tl.exp(tl.minimum(b_last - b, 0.0)), 0.0)
            S = carry * S + tl.dot(tl.trans(k.to(dt) * w_last[:, None]), v.to(dt), input_precision=PRECISION)
        tl.store(mf_ptr + pid * DK * DV + moff, S, mask=mk[:, None] & mv[None, :])

    @triton.jit
    def _attn_backward_kernel(
        q_ptr, k_ptr, v_ptr, ld_ptr, rs_ptr,
        ent_ptr,  # (BH, NC, DK, DV) memory entering each chunk
        do_ptr,  # (BH, N, DV) dL/do
        dmf_ptr,  # (BH, DK, DV) dL/d final memory
        dq_ptr, dk_ptr, dv_ptr, dld_ptr,  # out, like q, k, v, ld
        dm0_ptr,  # (BH, DK, DV) out: dL/d entry memory
        N, H, DK, DV, NC,
        HAS_RESET: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, F64: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        dt = tl.float64 if F64 else tl.float32
        pid = tl.program_id(0).to(tl.int64)
        row = pid // H
        rk, rv, idx = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BT)
        mk, mv = rk < DK, rv < DV
        mkv = mk[:, None] & mv[None, :]
        moff = rk[:, None] * DV + rv[None, :]
        dS = tl.load(dmf_ptr + pid * DK * DV + moff, mask=mkv, other=0.0).to(dt)  # dL/d memory leaving the chunk
        causal = idx[:, None] >= idx[None, :]
        for i in range(0, NC):
            c = NC - 1 - i
            t = c * BT + idx
            tm = t < N
            q = tl.load(q_ptr + (pid * N + t)[:, None] * DK + rk[None, :], mask=tm[:, None] & mk[None, :],
                        other=0.0).to(dt)
            k = tl.load(k_ptr + (pid * N + t)[:, None] * DK + rk[None, :], mask=tm[:, None] & mk[None, :],
                        other=0.0).to(dt)
            v = tl.load(v_ptr + (pid * N + t)[:, None] * DV + rv[None, :], mask=tm[:, None] & mv[None, :],
                        other=0.0).to(dt)
            do = tl.load(do_ptr + (pid * N + t)[:, None] * DV + rv[None, :], mask=tm[:, None] & mv[None, :],
                         other=0.0).to(dt)
            b = tl.cumsum(tl.load(ld_ptr + pid * N + t, mask=tm, other=0.0).to(dt), 0)
            b_last = tl.sum(tl.where(idx == BT - 1, b, 0.0), 0)
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
            S = tl.load(ent_ptr + (pid * NC + c) * DK * DV + moff, mask=mkv, other=0.0).to(dt)
            decay = tl.where(keep, tl.exp(tl.minimum(b[:, None] - b[None, :], 0.0)), 0.0)
            w_entry = tl.where(first, tl.exp(b), 0.0)
            w_last = tl.where(last, tl.exp(tl.minimum(b_last - b, 0.0)), 0.0)
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
    return {"BT": bt, "BK": max(16, triton.next_power_of_2(dk)), "BV": max(16, triton.next_power_of_2(dv)),
            "F64": f64, "PRECISION": precision, "NC": triton.cdiv(n, bt)}


class _DecayedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, memory: Tensor, reset: Tensor | None,
                chunk_size: int) -> tuple[Tensor, Tensor]:
        batch, heads, n, dk = q.shape
        dv = v.shape[-1]
        meta = _attn_meta(q, v, chunk_size)
        nc = meta.pop("NC")
        o = torch.empty_like(v)
        entries = q.new_empty(batch, heads, nc, dk, dv)
        final = torch.empty_like(memory)
        rs = q if reset is None else reset.to(torch.int32)
        _attn_forward_kernel[(batch * heads,)](q, k, v, log_decay, rs, memory, o, entries, final, n, heads, dk, dv,
                                               nc, HAS_RESET=reset is not None, **meta)
        ctx.save_for_backward(q, k, v, log_decay, rs, entries)
        ctx.has_reset, ctx.chunk_size = reset is not None, chunk_size
        return o, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_o: Tensor, grad_final: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, log_decay, rs, entries = ctx.saved_tensors
        batch, heads, n, dk = q.shape
        dv = v.shape[-1]
        meta = _attn_meta(q, v, ctx.chunk_size)
        nc = meta.pop("NC")
        grad_o = torch.zeros_like(v) if grad_o is None else grad_o.contiguous()
        grad_final = q.new_zeros(batch, heads, dk, dv) if grad_final is None else grad_final.contiguous()
        dq, dk_, dv_, dld = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(log_decay)
        dm0 = torch.empty_like(grad_final)
        _attn_backward_kernel[(batch * heads,)](q, k, v, log_decay, rs, entries, grad_o, grad_final, dq, dk_, dv_,
                                                dld, dm0, n, heads, dk, dv, nc, HAS_RESET=ctx.has_reset, **meta)
        return dq, dk_, dv_, dld, dm0, None, None


def decayed_attention_triton(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, memory: Tensor,
                             reset: Tensor | None, chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """o (B, H, N, Dv) and the final memory of S_t = exp(log_decay_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t, S zeroed
    before every reset token (B, N); one forward launch and one backward launch (chunks of up to 64 tokens,
    masked decayed attention inside, the memory carried in registers; the backward walks the chunks in reverse
    with dL/dS, and the log-decay gradient is the reverse cumulative sum of q.dq - k.dk). Differentiable in q, k,
    v, log_decay and memory; all of one float32 / float64 dtype."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton decayed attention needs triton, which is not installed")
    q, k, v, log_decay, memory = (x.contiguous() for x in (q, k, v, log_decay, memory))
    return _DecayedAttention.apply(q, k, v, log_decay, memory.to(q.dtype), reset, chunk_size)
