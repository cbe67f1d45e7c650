"""AR-SSM: adaptive-rank semiseparable token mixer for the Phase 1 language model.

Design, for ``x`` of shape ``(B, N, D)`` and ``R = max_rank`` ranks::

    xc  = SiLU(causal depthwise conv(x))       left padding only: token t reads x[t-K+1 .. t]
    g   = sigmoid(W2 relu(W1 xc))             (B, N, R): one gate per token and rank
    u   = (U xc) * g,   v = (V xc) * g         (B, N, R)
    h_t = lambda * h_{t-1} + v_t               per rank, lambda in (0, 1] (1 = plain cumulative sum)
    y   = W_o (u * h)                          (B, N, D)

So ``y_t = sum_{s <= t} W_o diag(u_t) Lambda^(t-s) diag(g_s) V xc_s``: a causal semiseparable operator whose
rank is at most the number of gates that are on. With ``lambda < 1`` the state is bounded,
``|h_t| <= max|v| / (1 - lambda)``; the learnable decay is ``exp(-(softplus(theta) + 1e-4))`` so it stays
below 1 in float32 however far theta moves (``decay=1.0`` fixes it at exactly 1 instead).

Adaptive rank saves work: only the selected ranks' rows of ``U``, ``V``, ``W2`` and columns of ``W_o`` enter
the matmuls and the scan (a slice when the ranks are a prefix, ``index_select`` otherwise).

* Training: ranks ``< active_rank`` (the rank curriculum, :func:`curriculum_rank`); the others are masked,
  i.e. skipped. Each forward also updates ``gate_running_max``, an EMA of each rank's largest gate in the
  batch (a BatchNorm-like running statistic; the first update of a rank copies the batch value).
* Inference (``eval()``): a rank is *off* when it is beyond ``active_rank`` or its running max gate is below
  ``prune_threshold``; off ranks are treated as gate 0 and not computed. The decision is data independent,
  so the layer stays causal and token-by-token decoding equals the full forward. ``prune_inference=False``
  computes every rank with the off gates multiplied by 0 (same output, no savings; for comparisons).

``use_fused_scan=True`` runs the scan with the Triton kernel of :mod:`models.layers.ar_ssm_triton` when the
tensor is on CUDA and triton imports, else with the chunked torch :func:`decayed_scan`;
``backend="triton"`` forces the kernel (on the CPU only under ``TRITON_INTERPRET=1``, for tests),
``backend="torch"`` the torch scan. The scan runs in float32 at least (float64 inputs stay float64).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.layers.ar_ssm_triton import HAS_TRITON, ar_ssm_triton, decayed_scan_triton, update_gate_stats_triton

_MIN_DECAY_RATE = 1e-4  # learnable decay <= exp(-1e-4): bounded state, timescale <= 10k tokens
_GATE_STAT_MOMENTUM = 0.1


def decayed_scan_reference(x: Tensor, decay: Tensor, initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sequential reference of :func:`decayed_scan` (a Python loop over time)."""
    h = torch.zeros_like(x[:, 0]) if initial_state is None else initial_state.to(x.dtype)
    out = []
    for t in range(x.shape[1]):
        h = decay * h + x[:, t]
        out.append(h)
    return torch.stack(out, dim=1), h


def _scan_log(x: Tensor, log_decay: Tensor, initial_state: Tensor | None, chunk_size: int) -> Tensor:
    """Chunked scan on ``log(decay)`` (finite even where ``decay ** chunk_size`` underflows to 0)."""
    batch, n, rank = x.shape
    c = min(chunk_size, n)
    n_chunks = -(-n // c)
    xc = F.pad(x, (0, 0, 0, n_chunks * c - n)).view(batch, n_chunks, c, rank)  # zero tail: no effect before n
    idx = torch.arange(c, device=x.device)
    lag = idx[:, None] - idx[None, :]
    # within a chunk: local_t = sum_{s <= t} decay^(t-s) x_s, a (c, c) lower-triangular matrix per rank
    weights = torch.exp(lag.clamp(min=0).to(x.dtype)[None] * log_decay[:, None, None])
    weights = weights * (lag >= 0).to(x.dtype)
    local = torch.einsum("rts,bksr->bktr", weights, xc)
    if n_chunks == 1:
        carry_in = None if initial_state is None else initial_state[:, None]
    else:
        # the state at each chunk end obeys the same recurrence with decay^c: scan it (recursively)
        ends = _scan_log(local[:, :, -1], log_decay * c, initial_state, chunk_size)
        first = torch.zeros_like(ends[:, :1]) if initial_state is None else initial_state[:, None].to(x.dtype)
        carry_in = torch.cat([first, ends[:, :-1]], dim=1)
    h = local
    if carry_in is not None:
        powers = torch.exp((idx + 1).to(x.dtype)[:, None] * log_decay[None])  # decay^(i+1), (c, R)
        h = local + powers * carry_in[:, :, None]
    return h.reshape(batch, n_chunks * c, rank)[:, :n]


def decayed_scan(
    x: Tensor, decay: Tensor, initial_state: Tensor | None = None, chunk_size: int = 64
) -> tuple[Tensor, Tensor]:
    """``h_t = decay * h_{t-1} + x_t`` along dim -2; returns ``(h, h_last)``.

    ``x``: (B, N, R) with N >= 1; ``decay``: (R,) in (0, 1]; ``initial_state``: (B, R) or None (zeros).
    Vectorised: a lower-triangular decay matrix inside chunks of ``chunk_size`` tokens and the chunk-end states
    carried by the same scan one level up. Differentiable in all three inputs.
    """
    if x.ndim != 3 or decay.shape != x.shape[-1:] or x.shape[1] == 0:
        raise ValueError(f"expected x (B, N>=1, R) and decay (R,), got {tuple(x.shape)} and {tuple(decay.shape)}")
    h = _scan_log(x, torch.log(decay.to(x.dtype)), initial_state, chunk_size)
    return h, h[:, -1]


def curriculum_rank(step: int, total_steps: int, min_rank: int, max_rank: int) -> int:
    """Rank for a linear curriculum: ``min_rank`` at step 0, each rank up to ``max_rank`` for an equal share of
    ``total_steps``, ``max_rank`` from ``total_steps`` on."""
    if not 1 <= min_rank <= max_rank:
        raise ValueError(f"need 1 <= min_rank <= max_rank, got min_rank={min_rank}, max_rank={max_rank}")
    if total_steps <= 0:
        return max_rank
    frac = min(max(step / total_steps, 0.0), 1.0)
    return min(max_rank, min_rank + int(frac * (max_rank - min_rank + 1)))


class ARSSMState(NamedTuple):
    """Streaming state: the last ``conv_kernel - 1`` inputs (B, K-1, D) and the scan state (B, max_rank)."""

    conv: Tensor
    scan: Tensor


class ARSSM(nn.Module):
    """Adaptive-rank semiseparable token mixer (see the module docstring for the equations)."""

    def __init__(
        self,
        d_model: int,
        max_rank: int = 32,
        min_rank: int = 4,
        conv_kernel: int = 4,
        l1_regularization: float = 1e-3,
        use_fused_scan: bool = True,
        gate_hidden: int | None = None,
        zero_init_output: bool = False,
        *,
        decay: float | None = None,
        prune_threshold: float = 1e-2,
        prune_inference: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
        self.backend = backend
        if not 1 <= min_rank <= max_rank:
            raise ValueError(f"need 1 <= min_rank <= max_rank, got min_rank={min_rank}, max_rank={max_rank}")
        if conv_kernel < 1:
            raise ValueError(f"conv_kernel must be >= 1, got {conv_kernel}")
        if decay is not None and not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.d_model, self.max_rank, self.min_rank = d_model, max_rank, min_rank
        self.conv_kernel, self.l1_regularization = conv_kernel, l1_regularization
        self.use_fused_scan = use_fused_scan
        self.prune_threshold, self.prune_inference = prune_threshold, prune_inference
        self.active_rank = max_rank
        hidden = gate_hidden or max(max_rank, d_model // 4)
        self.conv = nn.Conv1d(d_model, d_model, conv_kernel, groups=d_model)  # padded on the left by forward
        self.gate_in = nn.Linear(d_model, hidden)  # W1
        self.gate_out = nn.Linear(hidden, max_rank)  # W2
        self.U = nn.Linear(d_model, max_rank, bias=False)
        self.V = nn.Linear(d_model, max_rank, bias=False)
        self.W_o = nn.Linear(max_rank, d_model, bias=False)
        if zero_init_output:
            nn.init.zeros_(self.W_o.weight)
        if decay is None:
            # timescales 1 / rate log-spaced over [2, 256] tokens; theta = softplus^-1(rate - min rate)
            rates = 1.0 / torch.logspace(math.log10(2.0), math.log10(256.0), max_rank)
            self.decay_logit = nn.Parameter(torch.log(torch.expm1(rates - _MIN_DECAY_RATE)))
            self.register_buffer("fixed_log_decay", None)
        else:
            self.register_parameter("decay_logit", None)
            self.register_buffer("fixed_log_decay", torch.full((max_rank,), math.log(decay)))
        self.register_buffer("gate_running_max", torch.ones(max_rank))
        self.register_buffer("gate_updates", torch.zeros(max_rank, dtype=torch.long))
        self._last_gate: Tensor | None = None
        self._rank_cache: tuple[Any, tuple[Tensor, Tensor | None, bool]] | None = None

    # ----------------------------------------------------------------------------------------------- ranks
    def set_active_rank(self, rank: int) -> None:
        """Rank curriculum: ranks ``>= rank`` are masked (not computed)."""
        if not self.min_rank <= rank <= self.max_rank:
            raise ValueError(f"active rank {rank} must be in [min_rank={self.min_rank}, max_rank={self.max_rank}]")
        self.active_rank = int(rank)

    def get_extra_state(self) -> dict[str, int]:
        return {"active_rank": self.active_rank}

    def set_extra_state(self, state: dict[str, int]) -> None:
        self.set_active_rank(state["active_rank"])

    def inference_rank_mask(self) -> Tensor:
        """Bool (max_rank,): the ranks computed in eval mode (within ``active_rank`` and gate not off)."""
        mask = torch.arange(self.max_rank, device=self.gate_running_max.device) < self.active_rank
        if self.prune_threshold > 0:
            mask &= self.gate_running_max >= self.prune_threshold
        return mask

    def _ranks(self) -> tuple[Tensor, Tensor | None, bool]:
        """(indices of the computed ranks, gate multiplier over them or None, whether the indices are a prefix
        0..r-1 so weights can be sliced); cached while nothing it depends on changes (no device sync per call)."""
        buf = self.gate_running_max
        key = (self.training, self.prune_inference, self.active_rank, self.prune_threshold, buf.device)
        if not self.training:  # eval decisions read the running statistics (training updates them every step)
            key += (buf.data_ptr(), buf._version)
        if self._rank_cache is not None and self._rank_cache[0] == key:
            return self._rank_cache[1]
        all_ranks = torch.arange(self.max_rank, device=buf.device)
        if self.training:
            ranks = all_ranks[: self.active_rank], None, True
        elif self.prune_inference:
            idx = self.inference_rank_mask().nonzero().squeeze(1)
            ranks = idx, None, bool(torch.equal(idx, all_ranks[: idx.numel()]))
        else:
            ranks = all_ranks, self.inference_rank_mask().to(buf.dtype), True
        self._rank_cache = (key, ranks)
        return ranks

    def log_decay(self) -> Tensor:
        """log(lambda) per rank, (max_rank,)."""
        if self.decay_logit is None:
            return self.fixed_log_decay
        return -(F.softplus(self.decay_logit) + _MIN_DECAY_RATE)

    # --------------------------------------------------------------------------------------------- forward
    def fused(self, x: Tensor) -> bool:
        """Whether this input runs the GPU path: the Triton scan and the convolution as one ``conv1d``."""
        return self.backend == "triton" or (self.backend == "auto" and self.use_fused_scan and HAS_TRITON
                                            and x.is_cuda)

    def _scan(self, v: Tensor, decay: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
        if v.shape[-1] == 0:  # every rank off
            return v, v[:, -1]
        if self.fused(v):
            return decayed_scan_triton(v, decay, h0)
        return decayed_scan(v, decay, h0)

    def _causal_conv(self, x: Tensor, past: Tensor | None) -> Tensor:
        """Depthwise ``conv1d`` over ``[past, x]`` (``past`` = the previous K-1 inputs, zeros if None). On the fused
        path one ``F.conv1d`` (two launches with its backward, where the CPU form below costs ~30); else K shifted
        multiply-adds in the (B, N, D) layout: output t reads inputs t-K+1 .. t only, without transposes."""
        k, n = self.conv_kernel, x.shape[1]
        if self.fused(x):
            if past is None:  # zero padding on both sides; the first N outputs are the causal ones
                y = F.conv1d(x.transpose(1, 2), self.conv.weight, self.conv.bias, padding=k - 1, groups=self.d_model)
                return y[..., :n].transpose(1, 2)
            x = torch.cat([past, x], dim=1) if k > 1 else x
            return F.conv1d(x.transpose(1, 2), self.conv.weight, self.conv.bias, groups=self.d_model).transpose(1, 2)
        w = self.conv.weight[:, 0, :]  # (D, K); tap K-1 multiplies the current token
        y = torch.addcmul(self.conv.bias, x, w[:, k - 1])
        for tap in range(k - 1):
            shift = k - 1 - tap
            if shift < n:
                y[:, shift:].addcmul_(x[:, : n - shift], w[:, tap])
            if past is not None:
                m = min(shift, n)
                y[:, :m].addcmul_(past[:, tap : tap + m], w[:, tap])
        return y

    def forward(
        self, x: Tensor, state: ARSSMState | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, ARSSMState]:
        """``x`` (B, N, D) -> ``y`` (B, N, D); with ``return_state`` also the state after the last token.

        Feeding a sequence in pieces, each with the previous call's state, gives the full forward's output.
        """
        if x.ndim != 3 or x.shape[-1] != self.d_model or x.shape[1] == 0:
            raise ValueError(f"expected x of shape (B, N>=1, {self.d_model}), got {tuple(x.shape)}")
        past = None if state is None else state.conv.to(x.dtype)
        xc = F.silu(self._causal_conv(x, past), inplace=not torch.is_grad_enabled())

        idx, scale, prefix = self._ranks()
        r = idx.numel()

        def rows(w: Tensor) -> Tensor:  # no slice at full rank: its backward would be one more operation
            if prefix:
                return w if r == w.shape[0] else w[:r]
            return w.index_select(0, idx)

        if r > 0 and self.fused(x):
            return self._forward_fused(x, xc, state, return_state, idx, scale, rows)

        g = torch.sigmoid(F.linear(F.relu(self.gate_in(xc)), rows(self.gate_out.weight), rows(self.gate_out.bias)))
        if scale is not None:
            g = g * scale.to(g.dtype)
        u = F.linear(xc, rows(self.U.weight)) * g
        v = F.linear(xc, rows(self.V.weight)) * g
        out_dtype = xc.dtype
        del xc  # (B, N, D): free it before the output projection allocates another one (inference peak memory)
        log_decay = self.log_decay()
        scan_dtype = torch.promote_types(v.dtype, torch.float32)
        h0 = None if state is None else state.scan.index_select(1, idx).to(scan_dtype)
        h, last = self._scan(v.to(scan_dtype), torch.exp(rows(log_decay)).to(scan_dtype), h0)
        w_o = rows(self.W_o.weight.T).T
        y = F.linear((u * h).to(out_dtype), w_o)

        self._last_gate = g
        if self.training:
            self._update_gate_stats(idx, g)
        return (y, self._state_after(x, state, idx, last)) if return_state else y

    def _forward_fused(self, x: Tensor, xc: Tensor, state: ARSSMState | None, return_state: bool, idx: Tensor,
                       scale: Tensor | None, rows: Any) -> Tensor | tuple[Tensor, ARSSMState]:
        """The GPU path after the convolution: one projection ``xc [W1 | U | V]^T`` (the weights concatenated),
        the gate MLP, then :func:`models.layers.ar_ssm_triton.ar_ssm_triton` (gates, scan, u h and the gate
        statistics in one launch forward, one backward) and ``W_o``; the running gate statistics in one more
        launch. Same results as the torch path up to rounding."""
        r, hidden = idx.numel(), self.gate_in.out_features
        proj = F.linear(xc, torch.cat([self.gate_in.weight, rows(self.U.weight), rows(self.V.weight)]))
        pre, uv = proj.split([hidden, 2 * r], dim=-1)
        logits = F.linear(F.relu(pre + self.gate_in.bias), rows(self.gate_out.weight), rows(self.gate_out.bias))
        if self.decay_logit is None:
            decay, from_logit = rows(self.fixed_log_decay).exp(), False
        else:
            decay, from_logit = rows(self.decay_logit), True
        h0 = None if state is None else state.scan.index_select(1, idx).to(
            torch.promote_types(x.dtype, torch.float32))
        z, g, h, gmax = ar_ssm_triton(uv, logits, decay, from_logit=from_logit, scale=scale, h0=h0)
        y = F.linear(z, rows(self.W_o.weight.T).T)
        self._last_gate = g
        if self.training:
            update_gate_stats_triton(gmax, self.gate_running_max, self.gate_updates, _GATE_STAT_MOMENTUM)
        return (y, self._state_after(x, state, idx, h[:, -1])) if return_state else y

    def _state_after(self, x: Tensor, state: ARSSMState | None, idx: Tensor, last: Tensor) -> ARSSMState:
        """The streaming state after x, given the computed ranks' last scan state."""
        batch, n, _ = x.shape
        k = self.conv_kernel
        past = None if state is None else state.conv.to(x.dtype)
        log_decay = self.log_decay()
        if state is None:
            scan_state = last.new_zeros(batch, self.max_rank)
        else:  # ranks not computed here had v = 0: their state only decays
            scan_state = state.scan.to(last.dtype) * torch.exp(n * log_decay).to(last.dtype)
        scan_state = scan_state.index_copy(1, idx, last)
        past = x.new_zeros(batch, k - 1, self.d_model) if past is None else past
        conv_state = torch.cat([past, x[:, -(k - 1):]], dim=1)[:, -(k - 1):] if k > 1 else past  # a copy, not a view
        return ARSSMState(conv_state, scan_state)

    @torch.no_grad()
    def _update_gate_stats(self, idx: Tensor, g: Tensor) -> None:
        batch_max = g.detach().amax(dim=(0, 1)).to(self.gate_running_max.dtype)
        old = self.gate_running_max.index_select(0, idx)
        seen = self.gate_updates.index_select(0, idx) > 0
        new = torch.where(seen, old.lerp(batch_max, _GATE_STAT_MOMENTUM), batch_max)
        self.gate_running_max.index_copy_(0, idx, new)
        self.gate_updates.index_add_(0, idx, torch.ones_like(idx))

    # ----------------------------------------------------------------------------------------- diagnostics
    def _gate(self) -> Tensor:
        if self._last_gate is None:
            raise RuntimeError("call forward first")
        return self._last_gate

    def gate_l1_loss(self) -> Tensor:
        """``l1_regularization * mean |g|`` over the last forward's tokens and all max_rank ranks (skipped ranks
        count as 0); part of the graph, so adding it to the loss trains the gates."""
        return self.l1_regularization * self._gate().abs().sum(-1).mean() / self.max_rank

    def effective_rank(self, threshold: float = 0.5) -> Tensor:
        """Mean number of ranks per token whose gate exceeds ``threshold`` in the last forward (detached)."""
        return (self._gate().detach() > threshold).sum(-1).float().mean()

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, max_rank={self.max_rank}, min_rank={self.min_rank}, "
                f"active_rank={self.active_rank}, conv_kernel={self.conv_kernel}")


#: The guide's name for :class:`ARSSM` (same class).
AdaptiveRankSemiseparableLayer = ARSSM
