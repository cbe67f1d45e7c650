"""What the project's ``python -m`` tools (token shards, tokenizer training, model export, glyph backbone) share with
``cli.py``: bad input (a missing file, a wrong value) ends in one ``error:`` line and exit status 2, not a traceback;
and the ``init_args`` of a section of an adaptlab YAML config."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml


@contextmanager
def errors_as_one_line(*kinds: type[BaseException]) -> Iterator[None]:
    """Inside, an exception of one of ``kinds`` ends the command: its message on one ``error:`` line, status 2."""
    try:
        yield
    except kinds as e:
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(2) from None


def config_init_args(path: str | Path, key: str) -> dict[str, Any]:
    """``init_args`` of the ``key:`` section (``data``, ``model``) of a YAML config; empty when it has none."""
    cfg = yaml.safe_load(Path(path).read_text()) or {}
    section = cfg.get(key) if isinstance(cfg, dict) else None
    return dict(section.get("init_args") or {}) if isinstance(section, dict) else {}
