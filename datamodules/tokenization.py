"""Tokenizers of the language-model data: UTF-8 bytes (built in) or a Hugging Face ``tokenizer.json``.

``load_tokenizer("bytes")`` is :class:`ByteTokenizer` (vocabulary 256, nothing to install);
``load_tokenizer("path/to/tokenizer.json")`` wraps the ``tokenizers`` package (optional: ``pip install
tokenizers``), e.g. GPT-2's file or one trained by :func:`train_bpe` / ``python -m datamodules.tokenization``.
Both offer ``encode(text) -> LongTensor``, ``decode(ids) -> str``, ``vocab_size`` and ``separator`` (the
token id between documents: NUL for bytes, the tokenizer's end-of-text token otherwise).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

import torch

from datamodules.text import ByteTokenizer
from models.utils.command_line import config_init_args, errors_as_one_line

#: special tokens a trained BPE tokenizer gets (the first is the document separator)
SPECIAL_TOKENS = ("<|endoftext|>",)


class Tokenizer(Protocol):
    vocab_size: int
    separator: int

    def encode(self, text: str) -> torch.Tensor: ...

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str: ...


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` read from a local ``tokenizer.json`` (never downloaded).

    Args:
        path: the ``tokenizer.json`` file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"data.tokenizer: {str(self.path)!r} does not exist (a tokenizer.json file, or "
                                    "`bytes`)")
        try:
            from tokenizers import Tokenizer as _Tokenizer
        except ImportError as e:
            raise ImportError(f"data.tokenizer: {str(self.path)!r} needs the `tokenizers` package (pip install "
                              "tokenizers); use `tokenizer: bytes` without it") from e
        try:
            self.backend = _Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises its own Exception type on a malformed file
            raise ValueError(f"data.tokenizer: {str(self.path)!r} is not a readable tokenizer.json ({e})") from e
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)
        sep = next((self.backend.token_to_id(t) for t in (*SPECIAL_TOKENS, "</s>", "<eos>")
                    if self.backend.token_to_id(t) is not None), None)
        if sep is None:
            raise ValueError(f"data.tokenizer: {str(self.path)!r} has no end-of-text token ({SPECIAL_TOKENS[0]!r}, "
                             "'</s>' or '<eos>') to separate documents")
        self.separator = sep

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.backend.encode(text, add_special_tokens=False).ids, dtype=torch.long)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(spec: str | Path = "bytes") -> Tokenizer:
    """``bytes`` -> :class:`ByteTokenizer`; a path -> :class:`HFTokenizer`."""
    if str(spec) == "bytes":
        return ByteTokenizer()
    return HFTokenizer(spec)


def train_bpe(texts: Iterable[str], vocab_size: int, out: str | Path, min_frequency: int = 2) -> Path:
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokenisation, offline) on ``texts``; writes ``out``
    (a ``tokenizer.json``) and returns its path. Its first token is ``<|endoftext|>``."""
    try:
        from tokenizers import Tokenizer as _Tokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers
    except ImportError as e:
        raise ImportError("training a BPE tokenizer needs the `tokenizers` package (pip install tokenizers)") from e
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {len(alphabet) + len(SPECIAL_TOKENS)} (256 byte symbols "
                         f"plus {len(SPECIAL_TOKENS)} special), got {vocab_size}")
    tok = _Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), initial_alphabet=alphabet,
                                  show_progress=sys.stderr.isatty())
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return out


def _documents(data_args: dict) -> Iterator[str]:
    """The training-split documents the TextDataModule built from ``data_args`` selects (the tokenizer must not
    see validation or test text)."""
    from datamodules.text import TextDataModule

    dm = TextDataModule(**data_args)
    yield from dm.iter_documents("train")


def main(argv: list[str] | None = None) -> None:
    """``python -m datamodules.tokenization --config configs/x.yaml --vocab_size 4096 --out tok.json``: train a BPE
    tokenizer on the training files the config's ``data:`` section selects (offline)."""
    p = argparse.ArgumentParser(prog="python -m datamodules.tokenization", description=main.__doc__)
    p.add_argument("--config", required=True, help="a YAML whose data: section is a TextDataModule")
    p.add_argument("--vocab_size", type=int, required=True)
    p.add_argument("--out", required=True, help="tokenizer.json to write (refused if it exists)")
    p.add_argument("--min_frequency", type=int, default=2)
    a = p.parse_args(argv)
    with errors_as_one_line(OSError, ValueError, ImportError, TypeError):
        init = config_init_args(a.config, "data")
        init.pop("tokenizer", None)
        if Path(a.out).exists():
            raise FileExistsError(f"--out {a.out!r} exists; choose another file (nothing is overwritten)")
        out = train_bpe(_documents(init), a.vocab_size, a.out, a.min_frequency)
    print(f"wrote {out} (vocab_size {load_tokenizer(out).vocab_size})")


if __name__ == "__main__":
    main()
