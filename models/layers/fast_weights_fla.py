"""Decayed linear attention by flash-linear-attention's ``chunk_simple_gla`` (optional extra ``fla-core``; GPU only).

Maps the fused Phase 2 scan's plain pass (per-token log-decays, keys already carrying eta, document resets, a
carried memory) onto fla: the log-decay is fla's gate ``g`` (S_t = exp(g_t) S_{t-1} + k_t v_t^T), our queries are
already scaled (``scale=1``), and resets become variable-length sequences: batch rows are concatenated into one
row and every row start and every reset opens a sequence (``cu_seqlens``); a sequence that opens at a row start
continues that row's carried memory, one that opens at a reset starts from zero. The final state of a row is
that of its last sequence.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

HAS_FLA = importlib.util.find_spec("fla") is not None


def decayed_attention_fla(q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, memory: Tensor,
                          reset: Tensor | None) -> tuple[Tensor, Tensor]:
    """o (B, H, N, Dv) and the final memory (B, H, Dk, Dv) of S_t = exp(log_decay_t) S_{t-1} + k_t v_t^T,
    o_t = S_t^T q_t, with S zeroed before every reset token; q, k (B, H, N, Dk), v (B, H, N, Dv)."""
    if not HAS_FLA:
        raise RuntimeError("backend 'fla' needs the optional package fla-core (pip install fla-core)")
    if not q.is_cuda:
        raise RuntimeError("backend 'fla' runs on CUDA tensors only (fla's Triton autotuner needs a GPU)")
    from fla.ops.simple_gla import chunk_simple_gla

    batch, heads, n, _ = q.shape
    dv = v.shape[-1]
    q, k, v, g = (x.transpose(1, 2).contiguous() for x in (q, k, v, log_decay))  # (B, N, H, ...)
    if reset is None:
        o, final = chunk_simple_gla(q, k, v, g, scale=1.0, initial_state=memory.contiguous(), output_final_state=True)
        return o.transpose(1, 2), final
    starts = reset.clone()
    starts[:, 0] = True
    first = starts.flatten().nonzero()[:, 0]  # flat index of each sequence's first token
    cu = torch.cat([first, first.new_tensor([batch * n])])
    row = first // n
    carried = (first % n == 0) & ~reset[:, 0][row]  # opens at a row start that is not a reset
    init = torch.where(carried[:, None, None, None], memory[row], 0.0).contiguous()
    o, final = chunk_simple_gla(*(x.reshape(1, batch * n, *x.shape[2:]) for x in (q, k, v, g)), scale=1.0,
                                initial_state=init, output_final_state=True, cu_seqlens=cu)
    last = starts.sum(1).cumsum(0) - 1  # each row's last sequence
    return o.reshape(batch, n, heads, dv).transpose(1, 2), final[last]
