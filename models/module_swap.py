"""Find modules by name pattern and replace them in place: the one helper behind every layer swap.

LoRA (:func:`models.adapters.lora.inject_lora`), 4-bit quantization (:func:`models.quant.convert.quantize_model`),
log-number-system linears and tensor-train embeddings all do the same thing: pick modules of a type whose
names match user patterns, then put a new module at each name. Patterns are plain names (matching the
full name or its trailing components, ``"qkv"`` matches ``blocks.0.attn.qkv``) or regular expressions
(anything with regex characters, searched in the full name).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from torch import nn

_REGEX_CHARS = set("\\^$*+?[](){}|")


def matches(name: str, patterns: Sequence[str]) -> bool:
    """True when ``name`` equals a pattern, ends with ``"." + pattern``, or a regex pattern is found in it."""
    for p in patterns:
        if name == p or name.endswith("." + p):
            return True
        if _REGEX_CHARS & set(p) and re.search(p, name):
            return True
    return False


def find_modules(
    model: nn.Module,
    types: type[nn.Module] | tuple[type[nn.Module], ...],
    include: Sequence[str] | Callable[[str], bool] | None = None,
    exclude: Sequence[str] = (),
    accept: Callable[[str, nn.Module], bool] | None = None,
    what: str = "the selection",
) -> list[str]:
    """Full names (model order) of the ``types`` submodules selected by ``include`` minus ``exclude``.

    Args:
        include: patterns, a predicate on the name, or ``None`` for every module of the type.
        exclude: patterns of names to leave out.
        accept: extra filter on ``(name, module)`` (e.g. skip already-converted layers).
        what: how the error message names the selection (e.g. ``"target_modules=['qkv']"``).

    Raises:
        ValueError: nothing matched; the message lists the modules of that type.
    """
    candidates = [(n, m) for n, m in model.named_modules() if n and isinstance(m, types)
                  and (accept is None or accept(n, m))]
    chosen = []
    for name, _ in candidates:
        hit = True if include is None else include(name) if callable(include) else matches(name, include)
        if hit and not (exclude and matches(name, exclude)):
            chosen.append(name)
    if not chosen:
        available = [n for n, _ in candidates]
        shown = ", ".join(available[:40]) + (" ..." if len(available) > 40 else "")
        kinds = "/".join(("nn." if t.__module__.startswith("torch.nn") else "") + t.__name__
                         for t in (types if isinstance(types, tuple) else (types,)))
        raise ValueError(f"{what} matched no {kinds} in {type(model).__name__}. "
                         f"Available: {shown or '(none)'}")
    return chosen


def replace_modules(model: nn.Module, names: Sequence[str], build: Callable[[str, nn.Module], nn.Module]) -> list[str]:
    """Put ``build(name, old_module)`` at each name (in place); returns ``names`` as a list."""
    for name in names:
        model.set_submodule(name, build(name, model.get_submodule(name)))
    return list(names)
