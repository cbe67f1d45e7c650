"""The folders and files one process writes for one run: recorded when created, locked while in use.

A run's clean-up after an early failure must remove exactly what this process created, never what another
process wrote meanwhile into a shared folder (``runs/<config>``): :class:`RunFolder` records each folder it
creates itself (a new ``version_N`` is reserved with ``os.mkdir``, atomic, so two processes never share one)
and each file the caller reports, and :meth:`RunFolder.remove_created` deletes only those (a shared parent it
created only when empty).

:meth:`RunFolder.lock` takes an exclusive ``fcntl.flock`` on ``<folder>/.adaptlab.lock`` so two processes never
train in one run folder (two ``--ckpt_path last`` resumes of one run): the second gets :class:`RunFolderBusy`.
The kernel releases the lock when the holder dies (SIGKILL included), so a stale lock file never blocks; the
file is deleted on release, and a locker checks that the file it locked is still the one at the path.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

LOCK_NAME = ".adaptlab.lock"


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's lock; the message names the folder and that process."""


class RunFolder:
    """What this process created for one run (folders it owns, shared parents, single files), and its locks."""

    def __init__(self) -> None:
        self.preexisting: set[Path] = set()  # files named like this process's that were there before this run
        self.owned: list[Path] = []  # folders reserved by this process: removed whole
        self.parents: list[Path] = []  # shared folders this process created: removed only when empty
        self.files: list[Path] = []  # files this process created in folders it does not own
        self._locks: list[tuple[Path, int]] = []

    def make_parents(self, folder: Path) -> None:
        """Create ``folder`` and its missing parents one level at a time, recording those this process made."""
        missing = []
        for p in [folder, *folder.parents]:
            if p.exists():
                break
            missing.append(p)
        for p in reversed(missing):
            try:
                p.mkdir()
            except FileExistsError:
                continue  # another process made it first: shared, not ours
            self.parents.append(p)

    def reserve_version(self, root: Path, start: int = 0) -> int:
        """The first ``root/version_N`` (N >= ``start``) that this process could create: atomic (``os.mkdir``),
        so two processes starting at once never get the same folder."""
        self.make_parents(root)
        n = start
        while True:
            try:
                (root / f"version_{n}").mkdir()
            except FileExistsError:
                n += 1
                continue
            self.owned.append(root / f"version_{n}")
            return n

    def make_folder(self, folder: Path) -> None:
        """``folder`` for this run: owned (removed whole on failure) when this process creates it."""
        if folder.exists():
            return
        self.make_parents(folder.parent)
        try:
            folder.mkdir()
        except FileExistsError:
            return
        self.owned.append(folder)

    def record_file(self, path: Path | str | None) -> None:
        """A file this process created (in a folder it may not own, e.g. a resumed run's)."""
        if path is not None and not any(Path(path).is_relative_to(f) for f in self.owned):
            self.files.append(Path(path))

    def lock(self, folder: Path) -> None:
        """Exclusive lock of ``folder`` (non-blocking); :class:`RunFolderBusy` when another process holds it."""
        if fcntl is None:
            return
        path = folder / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                os.close(fd)
                who = f" (pid {holder})" if holder.isdigit() else ""
                raise RunFolderBusy(f"run folder {str(folder)!r} is in use by another process{who}: two runs must "
                                    "not train in one folder; wait for it to end or stop it") from None
            try:  # the holder before us may have deleted the file after we opened it: lock the file at the path
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._locks.append((path, fd))

    def release(self) -> None:
        """Delete the lock files (while still holding them) and release the locks; safe to call twice."""
        while self._locks:
            path, fd = self._locks.pop()
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(fd)

    def remove_created(self) -> None:
        """Delete what this process created: its own folders whole, its files, then the shared parents it made
        when they are empty (another process may have written into them meanwhile)."""
        for path in reversed(self.files):
            with contextlib.suppress(OSError):
                path.unlink()
        for folder in reversed(self.owned):
            shutil.rmtree(folder, ignore_errors=True)
        for folder in reversed(self.parents):
            with contextlib.suppress(OSError):
                folder.rmdir()
        self.owned, self.files, self.parents = [], [], []
