"""Dissipative Hebbian fast weights: the decayed fast-weight memory of the Phase 2 language model.

Per sequence b and head h the memory is a matrix S (Dk x Dv) updated token by token

    S_t = exp(-Gamma_t * delta) S_{t-1} + eta_t k_t v_t^T,        o_t = S_t^T q_t,

with a positive, input-dependent forgetting rate Gamma_t (the non-Hermitian decay that the LM also feeds to
the BK mixer). Two implementations share one semantics: :func:`hebbian_scan_sequential` (the reference loop)
and :func:`hebbian_scan_chunked` (gated-linear-attention style: masked decayed attention inside a chunk,
the state between chunks). Both back-propagate through time (nothing is detached except the statistics
that steer the filter), zero the state before every token marked in ``reset`` (a document start), and
take / return the carried state explicitly (:class:`FastWeightState`); nothing persists between calls.

Optionally a *boundary rule* runs every ``period`` tokens of a document (positions 0, period, 2 period, ...
counted from the document start, so packing documents into one row does not change their outputs). It
sees the memory at that point and returns a (possibly damped) memory and the multipliers of Gamma and eta
in force until the next boundary. :class:`MemoryBoundaryRule` is the rule of the Phase 2 layer:

* SNR filter. signal = energy of what was written since the previous boundary, noise = energy of the older
  memory that survived it (both exact: the memory right after the previous boundary is kept as ``anchor``
  and decays by a scalar), ``snr = signal / noise`` in [0, inf]. Heads below ``snr_threshold`` (stale
  memory) get Gamma multiplied by clamp(threshold / snr, gamma_bounds), heads above it (a memory holding
  mostly fresh content) get eta multiplied by clamp(snr / threshold, eta_bounds). At a document's first
  boundary the memory is empty (no decision); at its second there is no older memory yet (snr = inf).
  The decision is a control signal: it is computed without gradient.
* Memory resonance. Energy of S along the columns of a fixed orthonormal key basis
  (:func:`fixed_orthonormal_basis`); a mode is resonant when its energy exceeds ``resonance_threshold``
  times the mean mode energy. With ``resonance_damping = d`` every resonant mode loses the fraction d of its
  energy at the boundary (amplitude times sqrt(1 - d)), the other modes are untouched.

Stability: with eta_t <= eta_max, ||k_t|| ||v_t|| <= m and Gamma_t >= Gamma_min, a memory that starts below
it stays below ||S|| <= eta_max m / (1 - exp(-Gamma_min delta)) (:func:`lyapunov_bound`), and with no
writes ||S||^2 never grows (decay factors <= 1, damping only removes energy).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FastWeightState(NamedTuple):
    """What the memory carries from one call to the next.

    memory: S, (B, H, Dk, Dv). position: tokens of the current document already consumed, (B,) int64.
    gamma_scale / eta_scale: the multipliers of Gamma and eta set at the last boundary, (B, H).
    anchor: the memory right after the last boundary, detached, (B, H, Dk, Dv); anchor_log_decay: the sum of
    the effective log-decays since then, (B, H). Without a boundary rule scales are 1 and anchor terms 0.
    """

    memory: Tensor
    position: Tensor
    gamma_scale: Tensor
    eta_scale: Tensor
    anchor: Tensor
    anchor_log_decay: Tensor


# boundary(state at the boundary, active rows (B,) bool) -> (memory, gamma_scale, eta_scale) for every row;
# the scans keep the old values of inactive rows. It must map an all-zero memory to itself with unit scales
# (the chunked scan skips the call at document starts, where the memory has just been zeroed).
Boundary = Callable[[FastWeightState, Tensor], tuple[Tensor, Tensor, Tensor]]


def _compute_dtype(dtype: torch.dtype, state_dtype: torch.dtype | None) -> torch.dtype:
    """16-bit inputs get a float32 state unless told otherwise; the scan computes in the wider type."""
    if state_dtype is None:
        state_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return torch.promote_types(dtype, state_dtype)


def _initial_state(
    initial: FastWeightState | Tensor | None, shape: tuple[int, int, int, int], dtype: torch.dtype,
    device: torch.device, with_boundary: bool,
) -> FastWeightState:
    batch, heads = shape[:2]
    if initial is None:
        memory, position = torch.zeros(shape, dtype=dtype, device=device), None
    elif isinstance(initial, Tensor):
        memory, position = initial.to(dtype), None
    else:
        memory, position = initial.memory.to(dtype), initial.position
    if position is None:
        position = torch.zeros(batch, dtype=torch.long, device=device)
    if with_boundary and isinstance(initial, FastWeightState):
        return FastWeightState(memory, position, initial.gamma_scale.to(dtype), initial.eta_scale.to(dtype),
                               initial.anchor.to(dtype), initial.anchor_log_decay.to(dtype))
    ones = torch.ones(batch, heads, dtype=dtype, device=device)
    return FastWeightState(memory, position, ones, ones, torch.zeros_like(memory), torch.zeros_like(ones))


def _positions(position: Tensor, reset: Tensor | None, n: int) -> Tensor:
    """Position of every token in its document before its update, (B, N)."""
    idx = torch.arange(n, device=position.device)
    pos = position[:, None] + idx
    if reset is None:
        return pos
    last = torch.where(reset, idx, -1).cummax(dim=1).values
    return torch.where(last >= 0, idx - last, pos)


def _boundary_calls(pos: Tensor, reset: Tensor | None, period: int) -> Tensor:
    """Tokens at which the boundary rule runs: every ``period`` tokens of a document, not at its (empty) start."""
    calls = pos % period == 0
    return calls if reset is None else calls & ~reset


def _apply_boundary(boundary: Boundary, state: FastWeightState, active: Tensor,
                    all_active: bool = False) -> FastWeightState:
    """Run the rule; rows not in ``active`` keep their state. ``all_active`` (known on the host) skips the masking."""
    memory, gamma_scale, eta_scale = boundary(state, active)
    if all_active:
        return FastWeightState(memory, state.position, gamma_scale, eta_scale, memory.detach(),
                               torch.zeros_like(state.anchor_log_decay))
    a2, a4 = active[:, None], active[:, None, None, None]
    return FastWeightState(
        torch.where(a4, memory, state.memory), state.position, torch.where(a2, gamma_scale, state.gamma_scale),
        torch.where(a2, eta_scale, state.eta_scale), torch.where(a4, memory.detach(), state.anchor),
        state.anchor_log_decay.masked_fill(a2, 0.0),
    )


def _prepare(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, eta: float | Tensor, reset: Tensor | None,
             state_dtype: torch.dtype | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, torch.dtype]:
    batch, heads, n, _ = q.shape
    if k.shape[:3] != (batch, heads, n) or v.shape[:3] != (batch, heads, n) or log_decay.shape != (batch, heads, n):
        raise ValueError(f"shape mismatch: q {q.shape}, k {k.shape}, v {v.shape}, log_decay {log_decay.shape}")
    if reset is not None and reset.shape != (batch, n):
        raise ValueError(f"reset must be (B, N) = {(batch, n)}, got {tuple(reset.shape)}")
    dtype = _compute_dtype(q.dtype, state_dtype)
    eta = torch.as_tensor(eta, dtype=dtype, device=q.device).broadcast_to(batch, heads, n)
    return q.to(dtype), k.to(dtype), v.to(dtype), log_decay.to(dtype), eta, dtype


def hebbian_scan_sequential(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, eta: float | Tensor,
    initial_state: FastWeightState | Tensor | None = None, reset: Tensor | None = None, *,
    boundary: Boundary | None = None, period: int = 64, state_dtype: torch.dtype | None = None,
) -> tuple[Tensor, FastWeightState]:
    """Reference loop, one token at a time.

    q, k: (B, H, N, Dk); v: (B, H, N, Dv); log_decay = -Gamma_t delta <= 0, (B, H, N); eta: a number or a tensor
    broadcastable to (B, H, N); reset: (B, N) bool, True at the first token of a document (the state is zeroed
    before that token's update); boundary / period: the rule run every ``period`` document tokens.
    Returns o (B, H, N, Dv) in q's dtype and the final state.
    """
    out_dtype = q.dtype
    q, k, v, log_decay, eta, dtype = _prepare(q, k, v, log_decay, eta, reset, state_dtype)
    batch, heads, n, dk = q.shape
    state = _initial_state(initial_state, (batch, heads, dk, v.shape[-1]), dtype, q.device, boundary is not None)
    pos = _positions(state.position, reset, n)
    calls, steps = None, set()
    if boundary is not None:
        calls = _boundary_calls(pos, reset, period)
        steps = set(calls.any(0).nonzero()[:, 0].tolist())
    outs = []
    tokens = zip(*(x.unbind(2) for x in (q, k, v, log_decay, eta)))  # unbind: linear-time backward
    for t, (q_t, k_t, v_t, ld_t, eta_t) in enumerate(tokens):
        if reset is not None:
            r2, r4 = reset[:, t, None], reset[:, t, None, None, None]
            state = FastWeightState(state.memory.masked_fill(r4, 0.0), state.position,
                                    state.gamma_scale.masked_fill(r2, 1.0), state.eta_scale.masked_fill(r2, 1.0),
                                    state.anchor.masked_fill(r4, 0.0), state.anchor_log_decay.masked_fill(r2, 0.0))
        if t in steps:
            state = _apply_boundary(boundary, state._replace(position=pos[:, t]), calls[:, t])
        decay = ld_t * state.gamma_scale
        write = (eta_t * state.eta_scale)[..., None, None] * k_t[..., :, None] * v_t[..., None, :]
        memory = decay.exp()[..., None, None] * state.memory + write
        acc = state.anchor_log_decay + decay if boundary is not None else state.anchor_log_decay
        state = state._replace(memory=memory, anchor_log_decay=acc)
        outs.append((q_t[..., :, None] * memory).sum(-2))
    return torch.stack(outs, 2).to(out_dtype), state._replace(position=pos[:, -1] + 1)


def _masked_exp(keep: Tensor, x: Tensor) -> Tensor:
    """exp(x) where keep, else 0. Kept entries are non-positive (differences of a non-increasing cumsum, j <= i);
    the clamp makes the others exp(<= 0) too, so nothing overflows and no inf * 0 reaches the gradient."""
    return x.clamp(max=0.0).exp() * keep


def _intra(q: Tensor, k: Tensor, v: Tensor, b: Tensor, seg: Tensor | None) -> Tensor:
    """Masked decayed attention inside a chunk: sum_{j <= i, same segment} exp(b_i - b_j) (q_i . k_j) v_j."""
    n = b.shape[-1]
    keep = torch.ones(n, n, dtype=torch.bool, device=b.device).tril()
    if seg is not None:
        keep = keep & (seg[..., :, None] == seg[..., None, :])
    return ((q @ k.mT) * _masked_exp(keep, b[..., :, None] - b[..., None, :])) @ v


def hebbian_scan_chunked(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, eta: float | Tensor,
    initial_state: FastWeightState | Tensor | None = None, reset: Tensor | None = None, chunk_size: int = 64, *,
    boundary: Boundary | None = None, period: int | None = None, state_dtype: torch.dtype | None = None,
) -> tuple[Tensor, FastWeightState]:
    """Chunked form of :func:`hebbian_scan_sequential` (same arguments, same results up to rounding).

    Inside a chunk, with b the cumulative (effective) log-decay: o_i = sum_{j <= i} exp(b_i - b_j) (q_i . k_j)
    eta_j v_j + exp(b_i) q_i^T S_entry; across chunks S <- exp(b_C) S + sum_j exp(b_C - b_j) eta_j k_j v_j^T.
    Only differences b_i - b_j with j <= i (or exp of b itself) are exponentiated, so no term overflows.
    A reset splits a chunk into segments that do not see each other or the entry state. Without a boundary
    rule blocks of 16 chunks are computed at once and only the (Dk x Dv) state is carried in a loop; with one, each
    chunk waits for the rule's decision at its start, and a document boundary inside a chunk (resets, or a
    carried position that is not a multiple of ``period``) splits it there. ``period`` defaults to
    ``chunk_size`` and must not be smaller.
    """
    period = chunk_size if period is None else period
    if chunk_size < 1 or period < chunk_size:
        raise ValueError(f"need 1 <= chunk_size <= period, got chunk_size={chunk_size}, period={period}")
    out_dtype = q.dtype
    q, k, v, log_decay, eta, dtype = _prepare(q, k, v, log_decay, eta, reset, state_dtype)
    batch, heads, n, dk = q.shape
    state = _initial_state(initial_state, (batch, heads, dk, v.shape[-1]), dtype, q.device, boundary is not None)
    pos = _positions(state.position, reset, n)
    if boundary is None:
        memory, outs = state.memory, []
        block = chunk_size * _PLAIN_BLOCK_CHUNKS
        resets = [None] * -(-n // block) if reset is None else reset.split(block, 1)
        for qb, kb, vb, ldb, rb in zip(q.split(block, 2), (k * eta[..., None]).split(block, 2), v.split(block, 2),
                                       log_decay.split(block, 2), resets):
            o, memory = _chunked_plain(qb, kb, vb, ldb, memory, rb, chunk_size)
            outs.append(o)
        o, state = torch.cat(outs, 2), state._replace(memory=memory)
    else:
        o, state = _chunked_with_boundary(q, k, v, log_decay, eta, state, reset, pos, chunk_size, boundary, period)
    return o.to(out_dtype), state._replace(position=pos[:, -1] + 1)


# Chunks per block of the plain chunked scan: bounds the (chunks, C, C) intermediates (CPU caches, memory).
_PLAIN_BLOCK_CHUNKS = 16
BACKENDS = ("torch", "triton", "fla")


def hebbian_scan_fused(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, eta: float | Tensor,
    initial_state: FastWeightState | Tensor | None = None, reset: Tensor | None = None, chunk_size: int = 64, *,
    rule: MemoryBoundaryRule | None = None, period: int | None = None, state_dtype: torch.dtype | None = None,
    backend: str = "triton",
) -> tuple[Tensor, FastWeightState]:
    """:func:`hebbian_scan_chunked` restructured for a GPU (same arguments and results up to rounding; the rule
    must be a :class:`MemoryBoundaryRule` without resonance damping).

    Pass 1 (no gradient, one Triton launch: :mod:`models.layers.fast_weights_triton`) runs the rule and returns
    its decisions per token; pass 2 is the plain decayed attention with gates ``log_decay * gamma_scale`` and
    keys ``k * eta * eta_scale``, by the Triton kernels of the same module (``backend="triton"``: one launch
    forward, one backward) or fla's ``chunk_simple_gla`` (``backend="fla"``,
    :mod:`models.layers.fast_weights_fla`). Gradients flow as in the torch path (the decisions carry none there
    either). The rule's per-token records go to ``rule.token_records``.
    """
    from models.layers.fast_weights_fla import decayed_attention_fla
    from models.layers.fast_weights_triton import _check_device, decayed_attention_triton, rule_decisions_triton

    _check_device(q, backend)
    if backend not in ("triton", "fla"):
        raise ValueError(f"backend must be 'triton' or 'fla', got {backend!r}")
    if rule is not None and rule.resonance_damping > 0:
        raise ValueError("the fused Phase 2 scan has no resonance damping (a linear map of the memory at every "
                         "boundary); use backend 'torch' with resonance_damping > 0")
    period = chunk_size if period is None else period
    if chunk_size < 1 or period < 1:
        raise ValueError(f"need chunk_size >= 1 and period >= 1, got {chunk_size}, {period}")
    out_dtype = q.dtype
    q, k, v, log_decay, eta, dtype = _prepare(q, k, v, log_decay, eta, reset, state_dtype)
    batch, heads, n, dk = q.shape
    state = _initial_state(initial_state, (batch, heads, dk, v.shape[-1]), dtype, q.device, rule is not None)
    if rule is None:
        log_decay_eff, k_eff = log_decay, k * eta[..., None]
        position = _positions(state.position, reset, n)[:, -1] + 1
    else:
        with torch.no_grad():
            dec = rule_decisions_triton(
                k, v, log_decay, eta, reset, (state.position, state.memory, state.anchor, state.gamma_scale,
                                              state.eta_scale, state.anchor_log_decay),
                period=period, snr_threshold=rule.snr_threshold, gamma_bounds=rule.gamma_bounds,
                eta_bounds=rule.eta_bounds, chunk_size=chunk_size)
        rule.token_records = {"snr": dec["snr"], "norm": dec["norm"], "calls": dec["calls"]}
        log_decay_eff = log_decay * dec["gamma_scale_tokens"]
        k_eff = k * (eta * dec["eta_scale_tokens"])[..., None]
        state = state._replace(gamma_scale=dec["gamma_scale"], eta_scale=dec["eta_scale"], anchor=dec["anchor"],
                               anchor_log_decay=dec["anchor_log_decay"])
        position = dec["position"]
    if backend == "fla":
        o, memory = decayed_attention_fla(q, k_eff, v, log_decay_eff, state.memory, reset)
    else:
        o, memory = decayed_attention_triton(q, k_eff, v, log_decay_eff, state.memory, reset, chunk_size)
    return o.to(out_dtype), state._replace(memory=memory, position=position)


def _chunked_plain(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, memory: Tensor, reset: Tensor | None,
                   chunk: int) -> tuple[Tensor, Tensor]:
    """All chunks at once; k already carries eta. Zero padding at the end leaves outputs and state unchanged."""
    batch, heads, n, dk = q.shape
    dv = v.shape[-1]
    chunks = -(-n // chunk)
    pad = chunks * chunk - n
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        log_decay = F.pad(log_decay, (0, pad))
        reset = None if reset is None else F.pad(reset, (0, pad))
    qc, kc = q.reshape(batch, heads, chunks, chunk, dk), k.reshape(batch, heads, chunks, chunk, dk)
    vc = v.reshape(batch, heads, chunks, chunk, dv)
    b = log_decay.reshape(batch, heads, chunks, chunk).cumsum(-1)
    b_last = b[..., -1:]
    seg = None if reset is None else reset.reshape(batch, 1, chunks, chunk).cumsum(-1)
    o = _intra(qc, kc, vc, b, seg)
    if seg is None:
        w_last, carry, w_entry = (b_last - b).exp(), b_last.exp(), b.exp()
    else:
        seg_last = seg[..., -1:]
        w_last = _masked_exp(seg == seg_last, b_last - b)
        carry = _masked_exp(seg_last == 0, b_last)
        w_entry = _masked_exp(seg == 0, b)
    local = (kc * w_last[..., None]).mT @ vc
    entries = []
    for local_c, carry_c in zip(local.unbind(2), carry.unbind(2)):  # unbind: one backward node, not T scatters
        entries.append(memory)
        memory = torch.addcmul(local_c, carry_c[..., None], memory)
    o = torch.baddbmm(o.reshape(-1, chunk, dv), (qc * w_entry[..., None]).reshape(-1, chunk, dk),
                      torch.stack(entries, 2).reshape(-1, dk, dv))
    return o.reshape(batch, heads, chunks * chunk, dv)[:, :, :n], memory


def _select(cases: Sequence[tuple[Tensor, Tensor]], default: Tensor) -> Tensor:
    """Row-wise choice: the value of the first case whose (B,) condition holds, else ``default``."""
    out = default
    for cond, value in reversed(cases):
        out = torch.where(cond.view(-1, *([1] * (value.dim() - 1))), value, out)
    return out


def _chunked_with_boundary(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, eta: Tensor, state: FastWeightState, reset: Tensor | None,
    pos: Tensor, chunk: int, boundary: Boundary, period: int,
) -> tuple[Tensor, FastWeightState]:
    """Chunk loop with the boundary rule. Because chunk <= period, a chunk holds at most one boundary per row
    after its first token, and only in the segment that continues the entry state (a document starting inside
    the chunk reaches its next boundary after the chunk ends). Segment ids: 0 = continues the entry state,
    1 = after that boundary (continues the rule's output), 2r = after the r-th reset."""
    n = q.shape[2]
    calls = _boundary_calls(pos, reset, period)
    starts = list(range(0, n, chunk))
    padded = torch.cat([calls, calls.new_zeros(calls.shape[0], len(starts) * chunk - n)], 1)
    inner = padded.view(calls.shape[0], len(starts), chunk)[:, :, 1:]
    entry = calls[:, starts]
    entry_any, entry_all, inner_any = torch.stack([entry.any(0), entry.all(0), inner.any((0, 2))]).tolist()  # 1 sync
    outs = []
    pieces = zip(*(x.split(chunk, 2) for x in (q, k, v, log_decay, eta)))  # split: linear-time backward
    for c, (s, (qc, kc, vc, ldc, etac)) in enumerate(zip(starts, pieces)):
        e = min(s + chunk, n)
        idx = torch.arange(e - s, device=q.device)
        if entry_any[c]:
            state = _apply_boundary(boundary, state._replace(position=pos[:, s]), calls[:, s], entry_all[c])
        seg = None if reset is None else reset[:, s:e].cumsum(-1) * 2
        gm, em = state.gamma_scale[..., None], state.eta_scale[..., None]
        if seg is not None:
            gm, em = (torch.where(seg[:, None] == 0, x, 1.0) for x in (gm, em))
        b = (ldc * gm).cumsum(-1)
        post, bp = None, None
        if inner_any[c]:
            icalls = calls[:, s + 1:e]
            active = icalls.any(-1)
            p = icalls.int().argmax(-1) + 1  # the boundary token (1 on inactive rows, unused there)
            bp = b.gather(-1, (p - 1)[:, None, None].expand(*b.shape[:2], 1))  # log-decay up to token p - 1
            w = _masked_exp((idx < p[:, None])[:, None], bp - b)
            pre = bp.exp()[..., None] * state.memory + (kc * (etac * em * w)[..., None]).mT @ vc
            post = _apply_boundary(boundary, FastWeightState(
                pre, pos[:, s:e].gather(1, p[:, None])[:, 0], state.gamma_scale, state.eta_scale, state.anchor,
                state.anchor_log_decay + bp[..., 0]), active)
            after = (idx >= p[:, None]) & active[:, None]
            if seg is not None:
                after = after & (seg == 0)
            gm = torch.where(after[:, None], post.gamma_scale[..., None], gm)
            em = torch.where(after[:, None], post.eta_scale[..., None], em)
            b = (ldc * gm).cumsum(-1)  # unchanged before token p
            seg = after.long() if seg is None else seg + after.long()
        keff = kc * (etac * em)[..., None]
        seg_h = None if seg is None else seg[:, None]
        o = _intra(qc, keff, vc, b, seg_h)
        o = o + (qc * (b.exp() if seg is None else _masked_exp(seg_h == 0, b))[..., None]) @ state.memory
        if post is not None:
            o = o + (qc * _masked_exp(seg_h == 1, b - bp)[..., None]) @ post.memory
        outs.append(o)
        state = _chunk_exit(state, post, keff, vc, b, bp, seg, reset[:, s:e] if reset is not None else None)
    return torch.cat(outs, 2), state


def _chunk_exit(state: FastWeightState, post: FastWeightState | None, k: Tensor, v: Tensor, b: Tensor,
                bp: Tensor | None, seg: Tensor | None, reset: Tensor | None) -> FastWeightState:
    """State after a chunk: the writes of the last segment plus that segment's decayed entry state."""
    b_last = b[..., -1:]
    if seg is None:
        memory = b_last.exp()[..., None] * state.memory + (k * (b_last - b).exp()[..., None]).mT @ v
        return state._replace(memory=memory, anchor_log_decay=state.anchor_log_decay + b_last[..., 0])
    last = seg[:, -1]
    memory = (k * _masked_exp((seg == last[:, None])[:, None], b_last - b)[..., None]).mT @ v
    from_entry, from_post = last == 0, last == 1
    memory = memory + _masked_exp(from_entry[:, None, None], b_last)[..., None] * state.memory
    if post is not None:
        memory = memory + _masked_exp(from_post[:, None, None], b_last - bp)[..., None] * post.memory
    else:
        post = state  # no inner boundary: no row has segment 1
    if reset is not None:  # a row whose last segment starts at a reset: log-decay counted from that token
        idx = torch.arange(b.shape[-1], device=b.device)
        lr = torch.where(reset, idx, -1).amax(-1)
        b_ref = torch.where((lr > 0)[:, None], b.gather(-1, (lr - 1).clamp(min=0)[:, None, None].expand(
            *b.shape[:2], 1))[..., 0], 0.0)
    else:
        b_ref = torch.zeros_like(b_last[..., 0])
    cases = ((from_entry, 0), (from_post, 1))
    ones, zeros = torch.ones_like(state.gamma_scale), torch.zeros_like(state.anchor)
    return FastWeightState(
        memory, state.position,
        _select([(cond, (state, post)[i].gamma_scale) for cond, i in cases], ones),
        _select([(cond, (state, post)[i].eta_scale) for cond, i in cases], ones),
        _select([(cond, (state, post)[i].anchor) for cond, i in cases], zeros),
        _select([(from_entry, state.anchor_log_decay + b_last[..., 0]),
                 (from_post, post.anchor_log_decay + b_last[..., 0] - (bp[..., 0] if bp is not None else 0.0))],
                b_last[..., 0] - b_ref),
    )


def fixed_orthonormal_basis(dim: int, seed: int) -> Tensor:
    """A (dim, dim) orthonormal matrix from the QR of a seeded Gaussian, made in float64 on the CPU with its own
    generator (identical on every rank and instance); signs fixed so that R has a positive diagonal."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _resonant(energy: Tensor, threshold: float) -> Tensor:
    return energy > threshold * energy.mean(-1, keepdim=True)


def resonance(memory: Tensor, basis: Tensor, threshold: float) -> dict[str, Tensor]:
    """Spectral energy of S (..., Dk, Dv) along the basis columns (key directions).

    Returns mode_energy (..., Dk), resonant (..., Dk) bool (energy > threshold x mean mode energy),
    num_resonant_modes (...) and total_resonance_energy (...) (energy in resonant modes).
    """
    energy = (basis.to(memory.dtype).mT @ memory).square().sum(-1)
    resonant = _resonant(energy, threshold)
    return {"mode_energy": energy, "resonant": resonant, "num_resonant_modes": resonant.sum(-1),
            "total_resonance_energy": (energy * resonant).sum(-1)}


def lyapunov_bound(eta: float | Tensor, k: Tensor, v: Tensor, gamma_min: float | Tensor, delta: float) -> Tensor:
    """eta_max max_t(||k_t|| ||v_t||) / (1 - exp(-Gamma_min delta)) per (B, H): the geometric series of the
    largest write decayed at the slowest rate bounds ||S|| for every memory that starts below it."""
    batch, heads, n, _ = k.shape
    eta_max = torch.as_tensor(eta, dtype=k.dtype, device=k.device).broadcast_to(batch, heads, n).amax(-1)
    write = (k.norm(dim=-1) * v.norm(dim=-1)).amax(-1)
    gamma_min = torch.as_tensor(gamma_min, dtype=k.dtype, device=k.device)
    return eta_max * write / -torch.expm1(-gamma_min * delta)


def lyapunov_stable_ratio(state_norms: Tensor, bound: Tensor, mask: Tensor | None = None) -> Tensor:
    """Share of states (given as their norms ||S||_F) that satisfy ||S|| <= bound; ``mask`` picks the states."""
    ok = state_norms <= bound
    if mask is None:
        return ok.to(state_norms.dtype).mean()
    return (ok & mask).sum().to(state_norms.dtype) / mask.sum()


class MemoryBoundaryRule:
    """The Phase 2 boundary rule: SNR filter (Gamma / eta multipliers) and resonant-mode damping.

    Keeps detached per-boundary statistics in ``records`` (one dict per call) for diagnostics; a new rule is
    made for every forward pass, so nothing leaks between calls.
    """

    def __init__(self, basis: Tensor, snr_threshold: float | None = 2.0,
                 gamma_bounds: tuple[float, float] = (1.0, 4.0), eta_bounds: tuple[float, float] = (1.0, 2.0),
                 resonance_threshold: float = 4.0, resonance_damping: float = 0.0) -> None:
        self.basis = basis
        self.snr_threshold = snr_threshold
        self.gamma_bounds, self.eta_bounds = gamma_bounds, eta_bounds
        self.resonance_threshold, self.resonance_damping = resonance_threshold, resonance_damping
        self.records: list[dict[str, Tensor]] = []
        self.token_records: dict[str, Tensor] = {}  # the fused scan's per-token records (snr, norm, calls)

    def snr(self, state: FastWeightState) -> tuple[Tensor, Tensor]:
        """(snr, live) per (B, H): ||S - old||^2 / ||old||^2 with old = the decayed anchor; live: old is not zero.

        Where old is zero (a document's first two boundaries: nothing older survives yet) the ratio is infinite
        or undefined and says nothing about staleness, so no decision is taken there (issue 21: before, the
        infinite SNR of every second boundary doubled eta unconditionally)."""
        memory = state.memory.detach()
        old = state.anchor * state.anchor_log_decay.exp()[..., None, None]
        noise = old.square().sum((-2, -1))
        signal = (memory - old).square().sum((-2, -1))
        return signal / noise, noise > 0

    def __call__(self, state: FastWeightState, active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            snr, live = self.snr(state)
            ones = torch.ones_like(snr)
            gamma_scale, eta_scale = ones, ones
            if self.snr_threshold is not None:
                thr = self.snr_threshold
                gamma_scale = torch.where(live & (snr < thr), (thr / snr).clamp(*self.gamma_bounds), ones)
                eta_scale = torch.where(live & (snr > thr), (snr / thr).clamp(*self.eta_bounds), ones)
            self.records.append({"snr": snr, "live": live & active[:, None], "active": active,
                                 "norm": state.memory.detach().norm(dim=(-2, -1))})
        if self.resonance_damping == 0:
            return state.memory, gamma_scale, eta_scale
        basis = self.basis.to(state.memory.dtype)
        coeff = basis.mT @ state.memory  # mode amplitudes, computed once for the test and the damping
        resonant = _resonant(coeff.detach().square().sum(-1), self.resonance_threshold)
        shrink = 1.0 - math.sqrt(1.0 - self.resonance_damping)
        return state.memory - shrink * (basis @ (coeff * resonant[..., None])), gamma_scale, eta_scale


def _inverse_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


class DissipativeHebbianMemory(nn.Module):
    """Multi-head dissipative Hebbian fast-weight memory with input-dependent forgetting.

    Gamma_t = softplus(W_Gamma x_t + b) + base_decay per head (positive by construction; the biases start the
    heads at geometrically spaced rates 1/16 ... 1/1024 above base_decay). Keys are L2-normalised per head: a
    write k v^T then has norm ||v||, the crosstalk of two keys is at most 1 and the stability bound reads
    eta_max max||v|| / (1 - exp(-Gamma_min delta)); queries are scaled by head_dim^-1/2. Every ``chunk_size``
    document tokens :class:`MemoryBoundaryRule` adjusts Gamma / eta (``snr_threshold=None`` turns the filter
    off) and damps resonant modes (``resonance_damping > 0``). eta is a per-head buffer that forward never
    writes. ``forward(x, state, reset)`` carries state only when it is passed in. ``backend``: ``"torch"``
    (:func:`hebbian_scan_chunked`, the default), ``"triton"`` or ``"fla"`` (:func:`hebbian_scan_fused`; CUDA,
    no resonance damping).
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int, base_decay: float = 0.01, hebbian_eta: float = 1.0,
                 snr_threshold: float | None = 2.0, chunk_size: int = 64, delta: float = 1.0,
                 gamma_bounds: tuple[float, float] = (1.0, 4.0), eta_bounds: tuple[float, float] = (1.0, 2.0),
                 resonance_damping: float = 0.0, num_basis_seed: int = 0, zero_init_output: bool = False,
                 resonance_threshold: float = 4.0, backend: str = "torch") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend != "torch" and resonance_damping > 0:
            raise ValueError(f"backend {backend!r} has no resonance damping; use backend 'torch'")
        self.backend = backend
        if base_decay < 0 or delta <= 0 or chunk_size < 1:
            raise ValueError("need base_decay >= 0, delta > 0 and chunk_size >= 1")
        for name, (lo, hi) in (("gamma_bounds", gamma_bounds), ("eta_bounds", eta_bounds)):
            if not 1.0 <= lo <= hi:
                raise ValueError(f"{name} must satisfy 1 <= low <= high (multipliers only enlarge), got {(lo, hi)}")
        if not 0.0 <= resonance_damping < 1.0:
            raise ValueError(f"resonance_damping must be in [0, 1), got {resonance_damping}")
        self.n_heads, self.head_dim = n_heads, head_dim
        self.base_decay, self.delta, self.chunk_size = base_decay, delta, chunk_size
        self.snr_threshold, self.gamma_bounds, self.eta_bounds = snr_threshold, tuple(gamma_bounds), tuple(eta_bounds)
        self.resonance_threshold, self.resonance_damping = resonance_threshold, resonance_damping
        width = n_heads * head_dim
        self.q_proj = nn.Linear(d_model, width, bias=False)
        self.k_proj = nn.Linear(d_model, width, bias=False)
        self.v_proj = nn.Linear(d_model, width, bias=False)
        self.gamma_proj = nn.Linear(d_model, n_heads)
        self.out_proj = nn.Linear(width, d_model, bias=False)
        with torch.no_grad():
            self.gamma_proj.weight.normal_(0.0, 0.02)
            self.gamma_proj.bias.copy_(_inverse_softplus(torch.logspace(-4, -10, n_heads, base=2.0)))
            if zero_init_output:
                self.out_proj.weight.zero_()
        self.register_buffer("eta", torch.full((n_heads,), float(hebbian_eta)))
        self.register_buffer("basis", fixed_orthonormal_basis(head_dim, num_basis_seed), persistent=False)
        self._diagnostics: dict[str, Tensor] = {}
        self._pending: tuple | None = None  # what the last forward left for diagnostics() (summarised lazily)

    def gamma(self, x: Tensor) -> Tensor:
        """Gamma_t, (B, N, n_heads), in float32 (float64 for float64 input)."""
        logits = self.gamma_proj(x)
        return F.softplus(logits.to(torch.promote_types(logits.dtype, torch.float32))) + self.base_decay

    def forward(self, x: Tensor, state: FastWeightState | None = None, reset: Tensor | None = None,
                return_state: bool = False, scan: str = "chunked") -> Tensor | tuple[Tensor, FastWeightState]:
        """x (B, N, d_model) -> (B, N, d_model); ``scan="sequential"`` runs the reference loop (tests).

        ``state`` continues earlier tokens (generation, streaming); it keeps its autograd history, so detach it
        for truncated BPTT. ``reset`` (B, N) bool marks document starts inside x.
        """
        batch, n, _ = x.shape
        heads, dim = self.n_heads, self.head_dim
        if scan == "chunked" and self.backend == "triton":
            return self._forward_triton(x, state, reset, return_state)
        q = self.q_proj(x).view(batch, n, heads, dim).transpose(1, 2) * dim**-0.5
        k = F.normalize(self.k_proj(x).view(batch, n, heads, dim).transpose(1, 2), dim=-1)
        v = self.v_proj(x).view(batch, n, heads, dim).transpose(1, 2)
        gamma = self.gamma(x)
        log_decay = -(gamma * self.delta).transpose(1, 2)
        eta = self.eta[:, None]
        rule = self._rule()
        if scan == "chunked" and self.backend != "torch":
            o, new_state = hebbian_scan_fused(q, k, v, log_decay, eta, state, reset, self.chunk_size, rule=rule,
                                              backend=self.backend)
        elif scan == "chunked":
            o, new_state = hebbian_scan_chunked(q, k, v, log_decay, eta, state, reset, self.chunk_size, boundary=rule)
        elif scan == "sequential":
            o, new_state = hebbian_scan_sequential(q, k, v, log_decay, eta, state, reset, boundary=rule,
                                                   period=self.chunk_size)
        else:
            raise ValueError(f"scan must be 'chunked' or 'sequential', got {scan!r}")
        y = self.out_proj(o.transpose(1, 2).reshape(batch, n, heads * dim).to(x.dtype))
        with torch.no_grad():
            # only (B, H) write sizes now; the summary's few dozen small operations run when diagnostics() asks
            write = (k.detach().norm(dim=-1) * v.detach().norm(dim=-1)).amax(-1)
            self._pending, self._diagnostics = (gamma.detach(), write, new_state.memory.detach(), rule), {}
        return (y, new_state) if return_state else y

    def _rule(self) -> MemoryBoundaryRule | None:
        if self.snr_threshold is None and self.resonance_damping == 0:
            return None
        return MemoryBoundaryRule(self.basis, self.snr_threshold, self.gamma_bounds, self.eta_bounds,
                                  self.resonance_threshold, self.resonance_damping)

    def _forward_triton(self, x: Tensor, state: FastWeightState | None, reset: Tensor | None,
                        return_state: bool) -> Tensor | tuple[Tensor, FastWeightState]:
        """The layer on the Triton kernels, projections aside, in two launches forward and two backward: one
        projection [q | k | v | Gamma logits] (the four weights concatenated), the rule kernel in RAW mode (q
        scale, key normalisation, Gamma, the boundary rule, document positions; :class:`_LayerInputs`), the
        decayed attention writing o in the output projection's layout. Same results as the torch path (the
        reference) up to rounding; the diagnostics' inputs come out of the rule kernel."""
        from models.layers.fast_weights_triton import _check_device, decayed_attention_triton, layer_inputs_triton

        _check_device(x, "triton")
        batch, n, _ = x.shape
        if reset is not None and reset.shape != (batch, n):
            raise ValueError(f"reset must be (B, N) = {(batch, n)}, got {tuple(reset.shape)}")
        heads, dim = self.n_heads, self.head_dim
        dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype  # as _compute_dtype
        rule = self._rule()
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.gamma_proj.weight])
        carried = None if state is None else (
            state.position, state.memory, state.anchor, state.gamma_scale, state.eta_scale, state.anchor_log_decay)
        q, k, v, log_decay, gamma, write, dec = layer_inputs_triton(
            F.linear(x, weight), self.gamma_proj.bias, self.eta, reset, carried, heads=heads, dk=dim, dv=dim,
            dtype=dtype, scale=dim**-0.5, base_decay=self.base_decay, delta=self.delta, chunk_size=self.chunk_size,
            rule=None if rule is None else (rule.snr_threshold, rule.gamma_bounds, rule.eta_bounds))
        o, memory = decayed_attention_triton(q, k, v, log_decay, None if state is None else state.memory, reset,
                                             self.chunk_size, heads_last=True)
        y = self.out_proj(o.to(x.dtype))
        if rule is not None:
            rule.token_records = {"snr": dec["snr"], "norm": dec["norm"], "calls": dec["calls"]}
        self._pending, self._diagnostics = (gamma, write, memory.detach(), rule), {}
        if not return_state:
            return y
        return y, FastWeightState(memory, dec["position"], dec["gamma_scale"], dec["eta_scale"], dec["anchor"],
                                  dec["anchor_log_decay"])

    def _summarise(self, gamma: Tensor, write: Tensor, memory: Tensor,
                   rule: MemoryBoundaryRule | None) -> dict[str, Tensor]:
        nan = torch.full((), math.nan, dtype=memory.dtype, device=memory.device)
        eta_max = self.eta.to(memory.dtype) * (self.eta_bounds[1] if self.snr_threshold is not None else 1.0)
        # lyapunov_bound from the per-(B, H) largest write ||k_t|| ||v_t|| kept by forward
        gamma_min = gamma.to(memory.dtype).amin(1)
        bound = eta_max * write.to(memory.dtype) / -torch.expm1(-gamma_min * self.delta)
        norms, masks = [memory.norm(dim=(-2, -1))[..., None]], [torch.ones_like(bound, dtype=torch.bool)[..., None]]
        snr_mean, snr_low = nan, nan
        if rule is not None and (rule.records or rule.token_records):
            if rule.token_records:  # fused path: per token, (B, H, N); calls (B, N)
                rec = rule.token_records
                snr, live = rec["snr"], rec["snr"].isfinite()
                norms.append(rec["norm"].nan_to_num(0.0))
                masks.append(rec["calls"][:, None].expand_as(rec["norm"]))
            else:
                rec = rule.records
                snr, live = torch.stack([r["snr"] for r in rec]), torch.stack([r["live"] for r in rec])
                norms += [r["norm"][..., None] for r in rec]
                masks += [r["active"][:, None, None].expand(*bound.shape, 1) for r in rec]
            # geometric mean over the decided boundaries (SNR is a ratio: one huge value must not dominate);
            # 0 maps to the smallest positive float so a boundary with no new writes counts, not -inf
            finite = live & snr.isfinite()
            tiny = torch.finfo(snr.dtype).tiny
            snr_mean = (torch.where(finite, snr.clamp(min=tiny).log(), 0.0).sum() / finite.sum()).exp()
            if self.snr_threshold is not None:
                snr_low = (live & (snr < self.snr_threshold)).sum().to(memory.dtype) / live.sum()
        res = resonance(memory, self.basis, self.resonance_threshold)
        return {
            "gamma_mean": gamma.mean(), "gamma_std": gamma.std(), "gamma_min": gamma.min(), "gamma_max": gamma.max(),
            "snr_mean": snr_mean, "snr_low_ratio": snr_low,
            "resonant_modes": res["num_resonant_modes"].to(memory.dtype).mean(),
            "resonance_energy": res["total_resonance_energy"].mean(),
            "stability_ratio": lyapunov_stable_ratio(torch.cat(norms, -1), bound[..., None], torch.cat(masks, -1)),
            "fast_weight_energy": memory.square().sum((-2, -1)).mean(),
        }

    def diagnostics(self) -> dict[str, Tensor]:
        """Detached scalar tensors from the last forward (empty before the first): statistics of Gamma_t;
        snr_mean (geometric mean of the decided SNRs) and snr_low_ratio over the boundaries with an older
        memory; resonant_modes and resonance_energy (means over sequences and heads) of the final memory;
        stability_ratio, the share of the memories at boundaries and at the end within this call's
        :func:`lyapunov_bound`; fast_weight_energy, the mean ||S||^2 of the final memory. Computed on the first
        call after a forward (forward itself only keeps the inputs: no per-step cost when nobody asks)."""
        if self._pending is not None:
            with torch.no_grad():
                self._diagnostics = self._summarise(*self._pending)
            self._pending = None
        return dict(self._diagnostics)
