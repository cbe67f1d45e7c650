"""Byte-level text windows for language models, from the Python standard library or your own files.

The embedded default corpus is the standard library's ``.py`` files (found via ``sysconfig``), so
everything runs offline. Include/exclude globs (relative to the stdlib root, ``**`` = any depth) carve it
into domains, e.g. top-level modules for pre-training and ``email/**`` for fine-tuning.

Files are split into train/val/test *by file*, from a hash of each file's path relative to its data root (the
stdlib root, or the folder a ``paths`` entry names or globs from) and ``split_seed``: a file's split does not
depend on which other files are selected or where the folder lives, so splits are disjoint and stable (only a
selection so small that val or test would be empty moves one train file there). ``split_by: position`` splits
inside every file instead (its first bytes train, then val, then test: a single file gets a validation split),
and ``val_paths``/``test_paths`` name the validation/test files explicitly. ``predict`` reads every selected file.
Each split's files (sorted) are joined with a NUL byte as document separator and cut into
fixed windows of ``seq_len + 1`` bytes. Every sample carries a stable integer ``index`` (its window
number within the split), which is the key of :class:`models.cache.skip_cache.SkipCache`. Tokens are bytes by
default or come from a Hugging Face ``tokenizer.json`` (``tokenizer``); each line of a ``.jsonl`` file is a
document (its ``text_field``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import Dataset

from datamodules.resumable import SplitLoaders

SPLITS = ("train", "val", "test")
#: Never useful as stdlib text: third-party packages, test suites (some are not UTF-8), caches.
DEFAULT_STDLIB_EXCLUDE: tuple[str, ...] = (
    "site-packages/**",
    "dist-packages/**",
    "test/**",
    "**/test/**",
    "**/tests/**",
    "idlelib/idle_test/**",
    "**/__pycache__/**",
)
DOC_SEPARATOR = b"\x00"


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to download, lossless round trip."""

    vocab_size = 256
    separator = 0  # the NUL byte between documents

    def encode(self, text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def stdlib_root() -> Path:
    """Directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=256)
def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Compile a path glob: ``**`` spans directories, ``*`` and ``?`` stay within one path component."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def matches_any(rel_path: str, patterns: Sequence[str]) -> bool:
    return any(glob_to_regex(p).match(rel_path) for p in patterns)


def path_hash(rel_path: str, seed: int) -> float:
    """A uniform number in [0, 1) from the path and seed (stable across runs and machines)."""
    digest = hashlib.sha256(f"{seed}:{rel_path}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(rel_path: str, val_fraction: float, test_fraction: float, seed: int) -> str:
    """``train``/``val``/``test`` for one file, from a hash of its relative path (stable across runs)."""
    u = path_hash(rel_path, seed)
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def list_stdlib_files(include: Sequence[str], exclude: Sequence[str]) -> tuple[Path, list[str]]:
    """Root and sorted relative paths of the stdlib ``.py`` files matching ``include`` but not ``exclude``."""
    root = stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory {str(root)!r} (sysconfig 'stdlib') does not exist")
    prune = [p for p in exclude if p.endswith("/**")]  # whole directories we never need to walk
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        dirnames[:] = [d for d in dirnames if not matches_any(f"{prefix}{d}/", prune)]
        rels.extend(prefix + f for f in filenames if f.endswith(".py"))
    return root, sorted(r for r in rels if matches_any(r, include) and not matches_any(r, exclude))


def entry_root(entry: str) -> Path:
    """The data root of a ``paths`` entry: the folder itself, a glob's folder before its first wildcard, or a
    single file's folder. Split hashes use paths relative to it, so moving the data keeps the splits."""
    p = Path(entry).expanduser()
    if p.is_dir():
        return p.resolve()
    if p.is_file():
        return p.resolve().parent
    parts = []
    for part in p.parts:
        if glob.has_magic(part):
            break
        parts.append(part)
    return Path(*parts).resolve() if parts else Path.cwd()


def list_user_files(paths: Sequence[str], exclude: Sequence[str], key: str = "paths") -> list[tuple[str, Path]]:
    """Expand user paths/globs (``**`` allowed) into sorted ``(path relative to the entry's root, file)`` pairs;
    every entry must match something."""
    files: dict[Path, str] = {}
    for entry in paths:
        p = Path(entry).expanduser()
        if p.is_file():
            found = [p]
        elif p.is_dir():
            found = [f for f in p.rglob("*") if f.is_file()]
        else:
            found = [Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file()]
        if not found:
            raise FileNotFoundError(f"`{key}` entry {entry!r} matches no file")
        root = entry_root(entry)
        for f in found:
            f = f.resolve()
            rel = f.relative_to(root).as_posix() if f.is_relative_to(root) else f.name
            files.setdefault(f, rel)
    return sorted(((rel, f) for f, rel in files.items()
                   if not matches_any(rel, exclude) and not matches_any(f.name, exclude)), key=lambda e: e[1])


def read_text_bytes(path: Path) -> bytes:
    """The file's UTF-8 bytes; unreadable or non-UTF-8 files raise an error naming the file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise OSError(f"cannot read text file {str(path)!r}: {e.strerror or e}") from e
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"text file {str(path)!r} is not valid UTF-8 (byte {e.start}); exclude it or convert it"
        ) from e
    if DOC_SEPARATOR in data:
        raise ValueError(f"text file {str(path)!r} contains NUL bytes (byte {data.index(DOC_SEPARATOR)}): a binary "
                         "file, not text; exclude it")
    return data


def jsonl_rows(text: str, name: str) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed row)`` of every non-empty line of JSON Lines ``text``; a line that is not JSON is
    refused naming ``name`` and the line."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name} line {n} is not JSON ({e.msg})") from e


def read_jsonl_texts(path: Path, field: str) -> list[bytes]:
    """The ``field`` of every non-empty line of a ``.jsonl`` file, UTF-8 encoded; a bad line names the file and
    line."""
    out = []
    for n, row in jsonl_rows(read_text_bytes(path).decode("utf-8"), repr(str(path))):
        text = row.get(field) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{str(path)!r} line {n} has no string field {field!r} (set data.text_field)")
        if "\x00" in text:
            raise ValueError(f"{str(path)!r} line {n}: field {field!r} contains a NUL character")
        out.append(text.encode("utf-8"))
    return out


class TokenWindows(Dataset):
    """Windows of ``seq_len + 1`` tokens over one token stream; sample ``i`` is always the same window.

    Returns dicts ``{"index", "input_ids", "labels"}`` (labels are the inputs shifted by one).
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, stride: int, max_windows: int | None = None) -> None:
        n = (len(tokens) - 1 - seq_len) // stride + 1 if len(tokens) > seq_len else 0
        starts = torch.arange(max(n, 0)) * stride
        if max_windows is not None and len(starts) > max_windows:
            # Evenly spaced windows cover the whole split rather than its first files only.
            starts = starts[torch.linspace(0, len(starts) - 1, max_windows).round().long()]
        self.tokens, self.seq_len, self.starts = tokens, seq_len, starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        s = int(self.starts[i])
        w = self.tokens[s : s + self.seq_len + 1].long()
        return {"index": i, "input_ids": w[:-1], "labels": w[1:]}


class TextDataModule(SplitLoaders, L.LightningDataModule):
    """Fixed-length byte windows from the stdlib (default) or from user files, split by file.

    Args:
        source: ``python_stdlib`` (the running interpreter's standard library) or ``files``.
        include: globs relative to the stdlib root (``python_stdlib``), e.g. ``["email/**"]`` or ``["*.py"]``
            (top-level modules only); ``None`` = every ``.py`` file. Not used with ``source: files`` (a warning
            says so; select files with ``paths``).
        exclude: globs to drop; ``None`` = :data:`DEFAULT_STDLIB_EXCLUDE` for the stdlib, nothing for files.
        paths: files, directories or globs (``source: files``), read as UTF-8.
        val_paths: files, directories or globs of the validation split (``source: files``); given, ``paths``
            all go to training (or to test, see ``test_paths``) and ``val_fraction`` is not used.
        test_paths: the same for the test split.
        split_by: ``file`` (each file goes to one split, by the hash of its relative path) or ``position`` (every
            file is cut: its first ``1 - val_fraction - test_fraction`` bytes train, then val, then test).
        seq_len: tokens per input; each sample holds ``seq_len + 1`` tokens.
        stride: distance between window starts (default ``seq_len``: non-overlapping).
        max_files: at most this many files per split (first in sorted order); ``None`` = all.
        max_windows: at most this many windows per split (evenly spaced); ``None`` = all.
        batch_size: windows per batch.
        num_workers: DataLoader worker processes.
        val_fraction: share of files (or, with ``split_by: position``, of every file) in the validation split.
        test_fraction: share of files (or of every file) in the test split.
        split_seed: changes which files land in which split.
        tokenizer: ``bytes`` (UTF-8 bytes, vocabulary 256) or the path of a Hugging Face ``tokenizer.json``
            (needs ``tokenizers``; train one with ``python -m datamodules.tokenization``). Documents are joined by
            the tokenizer's separator (NUL for bytes, its end-of-text token otherwise).
        text_field: the field of each ``.jsonl`` line that holds a document's text (every other file is one
            document).
    """

    def __init__(
        self,
        source: Literal["python_stdlib", "files"] = "python_stdlib",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        paths: list[str] | None = None,
        val_paths: list[str] | None = None,
        test_paths: list[str] | None = None,
        split_by: Literal["file", "position"] = "file",
        seq_len: int = 128,
        stride: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        max_files: int | None = None,
        max_windows: int | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        tokenizer: str = "bytes",
        text_field: str = "text",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if source not in ("python_stdlib", "files"):
            raise ValueError(f"`source` must be 'python_stdlib' or 'files', got {source!r}")
        if split_by not in ("file", "position"):
            raise ValueError(f"`split_by` must be 'file' or 'position', got {split_by!r}")
        for key, value in (("seq_len", seq_len), ("batch_size", batch_size)):
            if value <= 0:
                raise ValueError(f"`{key}` must be positive, got {value}")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers}")
        if stride is not None and stride <= 0:
            raise ValueError(f"`stride` must be positive, got {stride}")
        for key, value in (("max_files", max_files), ("max_windows", max_windows)):
            if value is not None and value <= 0:
                raise ValueError(f"`{key}` must be positive or null, got {value}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"`val_fraction` ({val_fraction}) and `test_fraction` ({test_fraction}) must be in [0, 1) "
                "and leave files for training"
            )
        if (val_paths or test_paths) and source != "files":
            raise ValueError("`val_paths`/`test_paths` need `source: files`")
        if (val_paths or test_paths) and split_by != "file":
            raise ValueError("`val_paths`/`test_paths` name whole files: use them with `split_by: file`")
        if source == "files" and include:
            rank_zero_warn(f"TextDataModule: `include` {include} is only used with `source: python_stdlib`; "
                           "with `source: files` the files are the ones `paths` selects")
        from datamodules.tokenization import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer)
        self.vocab_size = self.tokenizer.vocab_size
        #: fraction range of every file that each split reads (``split_by: position``), else the whole file
        self.split_ranges = {s: (0.0, 1.0) for s in SPLITS}
        #: split -> why it is empty although its fraction is positive (raised when a stage reads it)
        self.empty_splits: dict[str, str] = {}
        self.split_files = self._resolve_files()
        self.datasets: dict[str, TokenWindows] = {}

    def _resolve_files(self) -> dict[str, list[Path]]:
        """Files of each split, validated now so a bad source fails before any work starts."""
        hp = self.hparams
        if hp.source == "python_stdlib":
            if hp.paths:
                raise ValueError("`paths` is only used with `source: files`; use `include` for the stdlib")
            exclude = DEFAULT_STDLIB_EXCLUDE if hp.exclude is None else hp.exclude
            root, rels = list_stdlib_files(hp.include or ["**/*.py"], exclude)
            entries = [(r, root / r) for r in rels]
            where = f"standard library at {str(root)!r} with include={hp.include} exclude={list(exclude)}"
        else:
            if not hp.paths:
                raise ValueError("`paths` must list files, directories or globs when `source: files`")
            entries = list_user_files(hp.paths, hp.exclude or [])
            where = f"`paths` {hp.paths} (exclude={hp.exclude})"
        if not entries:
            raise ValueError(f"no text files found in the {where}")
        out: dict[str, list[Path]] = {s: [] for s in SPLITS}
        if hp.split_by == "position":
            v, t = hp.val_fraction, hp.test_fraction
            self.split_ranges = {"train": (0.0, 1 - v - t), "val": (1 - v - t, 1 - t), "test": (1 - t, 1.0)}
            for split, fraction in zip(SPLITS, (1.0, v, t)):
                out[split] = [path for _, path in entries] if fraction > 0 else []
                if hp.max_files is not None:
                    out[split] = out[split][: hp.max_files]
            return out
        explicit = {"val": hp.val_paths, "test": hp.test_paths}
        if any(explicit.values()):
            train_files = {path for _, path in entries}
            for split, listed in explicit.items():
                if listed:
                    out[split] = [f for _, f in list_user_files(listed, hp.exclude or [], key=f"{split}_paths")]
                    overlap = sorted(str(f) for f in set(out[split]) & train_files)
                    if overlap:
                        raise ValueError(f"`{split}_paths` and `paths` share {len(overlap)} file(s), e.g. "
                                         f"{overlap[0]!r}: a file must be in one split only")
            fractions = {"val": 0.0 if hp.val_paths else hp.val_fraction,
                         "test": 0.0 if hp.test_paths else hp.test_fraction}
        else:
            fractions = {"val": hp.val_fraction, "test": hp.test_fraction}
        for rel, path in entries:
            out[split_of(rel, fractions["val"], fractions["test"], hp.split_seed)].append(path)
        # Very small selections: an empty val/test split borrows the train file whose hash is lowest.
        hashes = {path: path_hash(rel, hp.split_seed) for rel, path in entries}
        for split in ("test", "val"):
            if fractions[split] > 0 and not out[split] and len(out["train"]) > 1:
                moved = min(out["train"], key=hashes.__getitem__)
                out["train"].remove(moved)
                out[split].append(moved)
        for split, fraction in zip(SPLITS, (1.0, fractions["val"], fractions["test"])):
            if fraction > 0 and not out[split]:  # an error when a stage needs the split (predict reads all files)
                self.empty_splits[split] = (
                    f"the {split} split is empty ({len(entries)} files in the {where}); select more files, change "
                    f"`val_fraction`/`test_fraction`/`split_seed`, split inside files with `split_by: position`, or "
                    f"name the files with `val_paths`/`test_paths`"
                )
            if hp.max_files is not None:
                out[split] = out[split][: hp.max_files]
        return out

    def _read(self, path: Path, split: str) -> bytes:
        data = read_text_bytes(path)
        lo, hi = self.split_ranges[split]
        if (lo, hi) == (0.0, 1.0):
            return data
        return data[round(lo * len(data)) : round(hi * len(data))]

    def documents(self, path: Path, split: str) -> list[bytes]:
        """The file's documents (UTF-8): one per ``.jsonl`` line (its ``text_field``), else the whole file; with
        ``split_by: position`` only the split's share (of the lines for ``.jsonl``, of the bytes otherwise)."""
        lo, hi = (0.0, 1.0) if split == "all" else self.split_ranges[split]
        if path.suffix != ".jsonl":
            return [read_text_bytes(path) if split == "all" else self._read(path, split)]
        docs = read_jsonl_texts(path, self.hparams.text_field)
        return docs[round(lo * len(docs)) : round(hi * len(docs))]

    def _tokenize(self, docs: list[bytes]) -> torch.Tensor:
        """Documents -> one token stream, separated by the tokenizer's separator (bytes: uint8, else int32)."""
        if isinstance(self.tokenizer, ByteTokenizer):
            data = DOC_SEPARATOR.join(docs)
            return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
        ids: list[int] = []
        for i, doc in enumerate(self.tokenizer.encode_batch([d.decode("utf-8") for d in docs])):
            if i:
                ids.append(self.tokenizer.separator)
            ids.extend(doc)
        return torch.tensor(ids, dtype=torch.int32)

    def iter_documents(self, split: str = "train") -> Iterator[str]:
        """The split's documents as text (what a tokenizer is trained on)."""
        if split in self.empty_splits:
            raise ValueError(self.empty_splits[split])
        for path in self.split_files[split]:
            for doc in self.documents(path, split):
                yield doc.decode("utf-8")

    def load_split(self, split: str) -> TokenWindows:
        """Read and window one split (cached on the DataModule); ``all`` = every selected file, whole."""
        if split in self.empty_splits:
            raise ValueError(self.empty_splits[split])
        if split not in self.datasets:
            hp = self.hparams
            files = sorted({p for s in SPLITS for p in self.split_files[s]}) if split == "all" \
                else self.split_files[split]
            tokens = self._tokenize([d for p in files for d in self.documents(p, split)])
            ds = TokenWindows(tokens, hp.seq_len, hp.stride or hp.seq_len, hp.max_windows)
            if len(ds) == 0 and files:
                raise ValueError(
                    f"the {split} split has {len(tokens)} tokens, fewer than seq_len + 1 = {hp.seq_len + 1}; "
                    "lower `seq_len` or add files"
                )
            self.datasets[split] = ds
        return self.datasets[split]

    def preflight(self, stage: str) -> None:
        """Read the stage's splits now (``callbacks.protocols.DataPreflight``): an unreadable, non-UTF-8 or binary
        file, or a split too short for one window, fails before any run folder exists. ``setup`` reuses them."""
        self.setup(stage)

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("all",)}
        for split in splits.get(stage or "", SPLITS):
            if split in ("all", "train") or self.split_files[split] or split in self.empty_splits:
                self.load_split(split)

    def predict_split_name(self) -> str:
        """Every selected file (the text to score), not only the test split."""
        return "all"
