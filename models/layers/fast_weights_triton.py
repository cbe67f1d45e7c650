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
