"""Atomic file writes: a crash while writing never leaves a half-written file at the target path."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it is flushed to disk and renamed onto
    ``path`` (``os.replace``, atomic on POSIX and Windows), on any error it is removed and ``path`` is untouched.

    Example: ``with atomic_path(out) as tmp: tmp.write_text(text)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
