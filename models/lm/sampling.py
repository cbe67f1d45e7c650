"""Token sampling shared by every language model's ``generate``."""

from __future__ import annotations

import torch
from torch import nn


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from last-position ``logits (B, V)``: greedy at ``temperature=0``, else softmax sampling at
    ``temperature`` over the ``top_k`` largest logits (all when ``None``). Returns ``(B, 1)``."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


def generate_with_state(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """``generate`` for recurrent models whose ``forward(idx, state=..., return_state=True)`` returns
    ``(logits, state)``: the prompt is read once, then every new token is one step on the carried state."""
    logits, state = model(idx, return_state=True)
    out = [idx]
    for i in range(max_new_tokens):
        nxt = sample_next_token(logits[:, -1], temperature, top_k, generator)
        out.append(nxt)
        if i + 1 < max_new_tokens:
            logits, state = model(nxt, state=state, return_state=True)
    return torch.cat(out, dim=1)
