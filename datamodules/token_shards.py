"""Token data larger than memory: tokenize a corpus once into shards, then train from them without loading it.

**Prepare** (``python -m datamodules.token_shards --config <config.yaml> --out <folder>``): the config's
``data:`` section (a :class:`datamodules.text.TextDataModule`: sources, globs, splits, ``tokenizer``) selects
the files and splits; each split's documents are tokenized one file at a time and appended to shards
``<split>_<k>.bin`` of at most ``shard_tokens`` tokens: raw little-endian ``uint16`` (vocabulary <= 65 536) or
``uint32`` arrays (``np.memmap(path, dtype, mode="r")`` reads them), documents separated by the tokenizer's
separator exactly as ``TextDataModule`` joins them. ``index.json`` lists every shard with its token count,
the dtype, the vocabulary and the tokenizer (copied in as ``tokenizer.json``). The folder is written under a
temporary name and renamed at the end, so a half-written preparation is never mistaken for a finished one.
Memory: one file's documents at a time (the largest file, not the corpus).

**Read** (:class:`TokenShardDataModule`, ``data.class_path: datamodules.token_shards.TokenShardDataModule``):
windows of ``seq_len + 1`` tokens over each split's virtual stream (windows may span shards), read with
``os.pread`` per sample, so resident memory stays flat however large the corpus (a memory map would count
every page it touched). The samples are the ones ``TextDataModule`` builds from the same files (a test checks
it). Training order: :class:`datamodules.resumable.EpochSeededSampler`'s permutation (held compactly) in a
:class:`~datamodules.resumable.ResumableDataLoader` (exact mid-epoch resume); under DDP Lightning shards the
sampler's indices across ranks, and each rank reads only its windows.
"""

from __future__ import annotations

import argparse
import bisect
import codecs
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.resumable import EpochSeededSampler, SplitLoaders
from datamodules.text import SPLITS, ByteTokenizer, TextDataModule
from models.utils.command_line import config_init_args, errors_as_one_line

INDEX = "index.json"
FORMAT_VERSION = 1
#: tokens converted and written at a time
CHUNK = 2**16


def token_dtype(vocab_size: int) -> np.dtype:
    """``uint16`` when every id fits, else ``uint32``."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class _ShardWriter:
    """Appends token arrays to ``<split>_<k>.bin`` files of at most ``shard_tokens`` tokens."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.limit = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.file = None

    def write(self, tokens: np.ndarray) -> None:
        """Append ``tokens`` in pieces of at most ``CHUNK`` (small, reused temporaries: memory stays flat)."""
        while len(tokens):
            if self.file is None or self.shards[-1]["tokens"] == self.limit:
                self._next()
            take = min(self.limit - self.shards[-1]["tokens"], CHUNK, len(tokens))
            tokens[:take].astype(self.dtype.newbyteorder("<")).tofile(self.file)
            tokens = tokens[take:]
            self.shards[-1]["tokens"] += take

    def _next(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self.file = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def stream_utf8(path: Path, lo: float = 0.0, hi: float = 1.0, block: int = 2**16) -> Iterator[bytes]:
    """The bytes ``[round(lo * size), round(hi * size))`` of a UTF-8 text file in blocks, checked as
    :func:`datamodules.text.read_text_bytes` checks a whole file (valid UTF-8, no NUL), with the same messages."""
    size = path.stat().st_size
    start, end = round(lo * size), round(hi * size)
    full = (start, end) == (0, size)
    if not full:  # a split inside the file: the whole file is checked first, as TextDataModule does
        for _ in stream_utf8(path, block=block):
            pass
    decoder = codecs.getincrementaldecoder("utf-8")()
    seen = 0
    try:
        with open(path, "rb") as f:
            f.seek(start)
            while seen < end - start:
                chunk = f.read(min(block, end - start - seen))
                if not chunk:
                    break
                if full:
                    decoder.decode(chunk, final=False)
                if b"\x00" in chunk:
                    at = start + seen + chunk.index(0)
                    raise ValueError(f"text file {str(path)!r} contains NUL bytes (byte {at}): a binary file, not "
                                     "text; exclude it")
                seen += len(chunk)
                yield chunk
            if full:
                decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise ValueError(f"text file {str(path)!r} is not valid UTF-8 (near byte {seen + e.start}); exclude it or "
                         "convert it") from e
    except OSError as e:
        raise OSError(f"cannot read text file {str(path)!r}: {e.strerror or e}") from e


def prepare_shards(data: TextDataModule, out: str | Path, shard_tokens: int = 2**27, progress: bool = True) -> Path:
    """Tokenize every split ``data`` selects into shards under ``out`` (a new folder); returns ``out``."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {str(out)!r} exists and is not empty (nothing is overwritten)")
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    tok = data.tokenizer
    dtype = token_dtype(tok.vocab_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        index: dict[str, Any] = {"version": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": tok.vocab_size,
                                 "separator": tok.separator, "tokenizer": "bytes", "splits": {}}
        if not isinstance(tok, ByteTokenizer):
            shutil.copyfile(tok.path, tmp / "tokenizer.json")
            index["tokenizer"] = "tokenizer.json"
        for split in SPLITS:
            files = data.split_files[split]
            writer = _ShardWriter(tmp, split, dtype, shard_tokens)
            first = True
            for n, path in enumerate(files, 1):
                if isinstance(tok, ByteTokenizer) and path.suffix != ".jsonl":  # one document, streamed
                    if not first:
                        writer.write(np.array([tok.separator]))
                    for block in stream_utf8(path, *data.split_ranges[split]):
                        writer.write(np.frombuffer(block, dtype=np.uint8))
                    first = False
                    continue
                docs = data.documents(path, split)
                if isinstance(tok, ByteTokenizer):
                    ids = [np.frombuffer(d, dtype=np.uint8) for d in docs]
                else:
                    ids = [np.asarray(x, dtype=np.int64) for x in tok.encode_batch([d.decode("utf-8") for d in docs])]
                for arr in ids:
                    if not first:
                        writer.write(np.array([tok.separator]))
                    writer.write(arr)
                    first = False
                if progress and sys.stderr.isatty():
                    sys.stderr.write(f"\r{split}: {n}/{len(files)} files")
            writer.close()
            if progress and sys.stderr.isatty() and files:
                sys.stderr.write("\n")
            index["splits"][split] = writer.shards
        (tmp / INDEX).write_text(json.dumps(index, indent=1) + "\n")
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_index(folder: str | Path) -> dict[str, Any]:
    """``index.json`` of a prepared folder, checked (every shard present with the recorded size)."""
    folder = Path(folder).expanduser()
    path = folder / INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"data.path {str(folder)!r} has no {INDEX}: prepare it first with `python -m "
                                "datamodules.token_shards --config <config.yaml> --out <folder>`") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"data.path: {str(path)!r} cannot be read ({e})") from e
    if not isinstance(index, dict) or index.get("version") != FORMAT_VERSION:
        raise ValueError(f"data.path: {str(path)!r} is not a version-{FORMAT_VERSION} token-shard index")
    itemsize = np.dtype(index["dtype"]).itemsize
    for split, shards in index["splits"].items():
        for shard in shards:
            f = folder / shard["file"]
            if Path(shard["file"]).name != shard["file"] or not f.is_file():
                raise FileNotFoundError(f"data.path: shard {shard['file']!r} of the {split} split is missing")
            if f.stat().st_size != shard["tokens"] * itemsize:
                raise ValueError(f"data.path: shard {str(f)!r} has {f.stat().st_size} bytes, the index says "
                                 f"{shard['tokens']} tokens of {index['dtype']} (a truncated or changed file)")
    return index


class ShardWindows(Dataset):
    """Windows of ``seq_len + 1`` tokens over one split's shards (the same windows as
    :class:`datamodules.text.TokenWindows` over the joined stream); each sample is read with ``os.pread``."""

    def __init__(self, folder: Path, shards: list[dict], dtype: str, seq_len: int, stride: int,
                 max_windows: int | None = None) -> None:
        self.paths = [str(folder / s["file"]) for s in shards if s["tokens"]]
        sizes = [s["tokens"] for s in shards if s["tokens"]]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.seq_len, self.stride = seq_len, stride
        total = self.offsets[-1]
        self.n = (total - 1 - seq_len) // stride + 1 if total > seq_len else 0
        self.starts = None
        if max_windows is not None and self.n > max_windows:
            self.starts = (torch.linspace(0, self.n - 1, max_windows).round().long() * stride).tolist()
            self.n = max_windows
        self._fds: dict[int, int] = {}
        self._pid = -1

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}, "_pid": -1}  # file descriptors are per process

    def _fd(self, k: int) -> int:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        if k not in self._fds:
            self._fds[k] = os.open(self.paths[k], os.O_RDONLY)
        return self._fds[k]

    def read(self, start: int, count: int) -> np.ndarray:
        """``count`` tokens of the split's stream from position ``start``."""
        out, size = [], self.dtype.itemsize
        k = bisect.bisect_right(self.offsets, start) - 1
        while count > 0:
            local = start - self.offsets[k]
            take = min(count, self.offsets[k + 1] - start)
            buf = os.pread(self._fd(k), take * size, local * size)
            out.append(np.frombuffer(buf, dtype=self.dtype))
            start, count, k = start + take, count - take, k + 1
        return out[0] if len(out) == 1 else np.concatenate(out)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        s = self.starts[i] if self.starts is not None else i * self.stride
        w = torch.from_numpy(self.read(s, self.seq_len + 1).astype(np.int64))
        return {"index": i, "input_ids": w[:-1], "labels": w[1:]}

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass


class CompactEpochSeededSampler(EpochSeededSampler):
    """:class:`EpochSeededSampler`'s order (the same permutation) kept as an int64 tensor and handed out in
    pieces: 8 bytes per window instead of a Python list's ~36, for corpora of millions of windows."""

    def __iter__(self):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for i in range(0, self.n, 4096):
            yield from perm[i : i + 4096].tolist()


class TokenShardDataModule(SplitLoaders, L.LightningDataModule):
    """Windows from a folder of token shards made by ``python -m datamodules.token_shards`` (see the module).

    Args:
        path: the prepared folder (``index.json`` and its shards).
        seq_len: tokens per input; each sample holds ``seq_len + 1`` tokens.
        stride: distance between window starts (default ``seq_len``: non-overlapping).
        batch_size: windows per batch.
        num_workers: DataLoader worker processes.
        max_windows: at most this many windows per split (evenly spaced); ``None`` = all.
        predict_split: the split ``predict`` scores.
    """

    train_sampler = CompactEpochSeededSampler  # millions of windows: no Python list of the permutation

    def __init__(
        self,
        path: str,
        seq_len: int = 128,
        stride: int | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        max_windows: int | None = None,
        predict_split: str = "test",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for key, value in (("seq_len", seq_len), ("batch_size", batch_size), ("stride", stride),
                           ("max_windows", max_windows)):
            if value is not None and value <= 0:
                raise ValueError(f"`{key}` must be positive, got {value}")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers}")
        if predict_split not in SPLITS:
            raise ValueError(f"`predict_split` must be one of {SPLITS}, got {predict_split!r}")
        self.folder = Path(path).expanduser()
        self.index = read_index(self.folder)
        from datamodules.tokenization import load_tokenizer

        spec = self.index["tokenizer"]
        self.tokenizer = load_tokenizer("bytes" if spec == "bytes" else self.folder / spec)
        self.vocab_size = self.index["vocab_size"]
        self.datasets: dict[str, ShardWindows] = {}

    def load_split(self, split: str) -> ShardWindows:
        if split not in self.datasets:
            hp = self.hparams
            ds = ShardWindows(self.folder, self.index["splits"].get(split, []), self.index["dtype"], hp.seq_len,
                              hp.stride or hp.seq_len, hp.max_windows)
            if len(ds) == 0:
                raise ValueError(f"data.path {str(self.folder)!r}: the {split} split has fewer than seq_len + 1 = "
                                 f"{hp.seq_len + 1} tokens")
            self.datasets[split] = ds
        return self.datasets[split]

    def preflight(self, stage: str) -> None:
        """Open the stage's splits now, so an empty split fails before any run folder exists."""
        self.setup(stage)

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",),
                  "predict": (self.hparams.predict_split,)}
        for split in splits.get(stage or "", SPLITS):
            self.load_split(split)

    def predict_split_name(self) -> str:
        return self.hparams.predict_split


def main(argv: list[str] | None = None) -> None:
    """``python -m datamodules.token_shards --config <config.yaml> --out <folder>``: prepare token shards from the
    files and splits the config's ``data:`` section selects (a TextDataModule's keys, ``tokenizer`` included)."""
    p = argparse.ArgumentParser(prog="python -m datamodules.token_shards", description=main.__doc__)
    p.add_argument("--config", required=True, help="a YAML whose data: section is a TextDataModule")
    p.add_argument("--out", required=True, help="the folder to create (refused if it exists and is not empty)")
    p.add_argument("--shard_tokens", type=int, default=2**27, help="tokens per shard file (default 2**27)")
    a = p.parse_args(argv)
    with errors_as_one_line(OSError, ValueError, ImportError, TypeError):
        init = {k: v for k, v in config_init_args(a.config, "data").items()
                if k not in ("seq_len", "stride", "batch_size", "num_workers", "max_windows")}
        out = prepare_shards(TextDataModule(**init), a.out, a.shard_tokens)
    index = read_index(out)
    counts = ", ".join(f"{s} {sum(x['tokens'] for x in v):,} tokens in {len(v)} shards"
                       for s, v in index["splits"].items())
    print(f"wrote {out}: {counts}")


if __name__ == "__main__":
    main()
