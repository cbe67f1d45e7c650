"""Atomic file writes: a crash while writing never leaves a half-written file at the target path."""

from __future__ import annotations

import os
import re

try:
    import fcntl
except ImportError:  # Windows: a temporary file's writer is judged by its pid
    fcntl = None
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

#: ``.<name>.tmp-<pid>``: the temporary file :func:`atomic_path` writes before the rename.
_TMP = re.compile(r"^\..+\.tmp-(\d+)$")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write to; on success it is flushed to disk and renamed onto
    ``path`` (``os.replace``, atomic on POSIX and Windows), on any error it is removed and ``path`` is untouched.

    Example: ``with atomic_path(out) as tmp: tmp.write_text(text)``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    # held while writing: clean_stale_temporaries tells a live writer from a dead one by it, not by the pid
    # (a new process may get a dead writer's pid, e.g. in a container)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def clean_stale_temporaries(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Delete the temporary files that a killed :func:`atomic_path` writer left in ``folder`` (nobody holds
    their lock, and their process is gone or its pid is now this process's); files being written are kept.
    Returns the deleted paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for p in folder.rglob(".*.tmp-*") if recursive else folder.glob(".*.tmp-*"):
        match = _TMP.match(p.name)
        if match and p.is_file() and _stale(p, int(match[1])):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def _stale(path: Path, pid: int) -> bool:
    """No live writer: nobody holds the file's lock (``atomic_path`` holds it while writing), and the pid in
    its name is gone or is this process's own (a killed writer's pid taken by this process, as happens in
    containers); without ``fcntl``, the writer's process is gone."""
    if fcntl is None:
        return not _alive(pid)
    if pid != os.getpid() and _alive(pid):
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True
