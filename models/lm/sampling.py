"""Token sampling and generation shared by every language model (GPT, Phase 1, Phase 2).

:class:`GenerationConfig` holds the user-facing options (``max_new_tokens``, ``temperature``, ``top_k``,
``top_p``, ``seed``). :func:`generate` runs any model: a recurrent one (``forward(idx, state=...,
return_state=True)``; ``model.carries_state = True``) reads the prompt once and then takes one step per token
on the carried state; a transformer without a cache re-reads its last ``block_size`` tokens each step.
``on_token`` is called with each new token as soon as it is sampled (streaming to a console).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class GenerationConfig:
    """Sampling options (the ``generation`` keys of the language-model families).

    ``temperature: 0`` is greedy. ``top_k`` keeps the k most likely tokens, ``top_p`` the smallest set whose
    probability reaches p (nucleus sampling); ``null`` turns either off. ``seed`` seeds the sampler, so the
    same options give the same text.
    """

    max_new_tokens: int = 120
    temperature: float = 0.8
    top_k: int | None = 20
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 0:
            raise ValueError(f"generation.max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise ValueError(f"generation.temperature must be finite and >= 0, got {self.temperature!r}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"generation.top_k must be positive or null, got {self.top_k!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"generation.top_p must be in (0, 1] or null, got {self.top_p!r}")


def sample_next_token(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                      generator: torch.Generator | None = None, top_p: float | None = None) -> torch.Tensor:
    """One token per row from last-position ``logits (B, V)``: greedy at ``temperature=0``, else softmax sampling at
    ``temperature`` over the ``top_k`` largest logits and, within them, the smallest set of tokens whose
    probability reaches ``top_p`` (the most likely token is always kept). Returns ``(B, 1)``."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


@torch.no_grad()
def generate(
    model: nn.Module,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    top_p: float | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    block_size: int | None = None,
    vocab_limit: int | None = None,
) -> torch.Tensor:
    """Append ``max_new_tokens`` sampled tokens to ``idx (B, T)``; returns ``(B, T + max_new_tokens)``.

    With ``model.carries_state`` the prompt is read once and every new token is one step on the carried state
    (O(1) per token); otherwise each step re-reads the last ``block_size`` tokens (all when ``None``).
    ``on_token(tokens (B, 1))`` sees each new token at once. ``vocab_limit``: only ids below it are sampled (a
    model whose vocabulary is larger than its tokenizer's).
    """
    out = [idx]
    if max_new_tokens == 0:
        return idx
    stateful = getattr(model, "carries_state", False)
    if stateful:
        logits, state = model(idx, return_state=True)
    else:
        logits = model(idx if block_size is None else idx[:, -block_size:])
    seq = idx
    for i in range(max_new_tokens):
        last = logits[:, -1]
        if vocab_limit is not None and vocab_limit < last.size(-1):
            last = last.float().index_fill(-1, torch.arange(vocab_limit, last.size(-1), device=last.device),
                                           float("-inf"))
        nxt = sample_next_token(last, temperature, top_k, generator, top_p)
        out.append(nxt)
        if on_token is not None:
            on_token(nxt)
        if i + 1 == max_new_tokens:
            break
        if stateful:
            logits, state = model(nxt, state=state, return_state=True)
        else:
            seq = torch.cat([seq, nxt], dim=1)
            logits = model(seq if block_size is None else seq[:, -block_size:])
    return torch.cat(out, dim=1)


def generate_with_state(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, generator: torch.Generator | None = None,
                        top_p: float | None = None, on_token: Callable[[torch.Tensor], None] | None = None
                        ) -> torch.Tensor:
    """:func:`generate` for a recurrent model (``forward(idx, state=..., return_state=True)``): the prompt is read
    once, then every new token is one step on the carried state."""
    if not getattr(model, "carries_state", False):
        raise TypeError(f"{type(model).__name__} does not carry a recurrent state (set carries_state = True)")
    return generate(model, idx, max_new_tokens, temperature, top_k, generator, top_p, on_token)
