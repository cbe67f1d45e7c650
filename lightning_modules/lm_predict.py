"""``predict`` for the language-model families (GPT, Phase 1, Phase 2): perplexity of the predict data and
continuations of prompts, streamed to the console and written to the run folder."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
import torch.nn.functional as F

from datamodules.text import ByteTokenizer, jsonl_rows
from models.lm.sampling import GenerationConfig, generate


def data_tokenizer(module: L.LightningModule) -> Any:
    """The tokenizer of the module's DataModule (``tokenizer`` attribute), else UTF-8 bytes."""
    trainer = module._trainer
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    return getattr(datamodule, "tokenizer", None) or ByteTokenizer()


def check_lm_data(datamodule: L.LightningDataModule, vocab_size: int, context: int | None, key: str) -> None:
    """The data's tokenizer must fit the model's vocabulary and its windows the context (``context``: the
    longest sequence the model accepts, ``None`` = any); raised before any run folder exists."""
    vocab = getattr(datamodule, "vocab_size", None)
    if vocab is not None and vocab > vocab_size:
        tok = getattr(getattr(datamodule, "tokenizer", None), "path", "bytes")
        raise ValueError(f"the data's tokenizer ({tok}) has {vocab} tokens but model.config.{key} is "
                         f"{vocab_size}; raise model.config.{key} to at least {vocab}")
    hp = getattr(datamodule, "hparams", {})
    seq_len = hp.get("seq_len") if hasattr(hp, "get") else None
    if context is not None and seq_len is not None and seq_len > context:
        raise ValueError(f"data.seq_len ({seq_len}) exceeds the model's context ({context}); lower data.seq_len")


def read_prompts(prompts: list[str] | None, prompt_file: str | None, default: str) -> list[str]:
    """Prompts from ``prompts`` and then ``prompt_file`` (``.txt``: one per non-empty line; ``.jsonl``: the
    ``prompt`` or ``text`` field of each line, newlines allowed); ``[default]`` when neither is given."""
    out = list(prompts or [])
    if prompt_file is not None:
        path = Path(prompt_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"model.prompt_file {prompt_file!r} cannot be read as UTF-8 text ({e})") from e
        if path.suffix == ".jsonl":
            for n, row in jsonl_rows(text, f"model.prompt_file {prompt_file!r}"):
                value = row.get("prompt", row.get("text")) if isinstance(row, dict) else None
                if not isinstance(value, str):
                    raise ValueError(f"model.prompt_file {prompt_file!r} line {n} has no string `prompt` or `text`")
                out.append(value)
        else:
            out.extend(line for line in text.splitlines() if line.strip())
        if not out:
            raise ValueError(f"model.prompt_file {prompt_file!r} holds no prompt")
    return out or [default]


class TextStream:
    """Writes a continuation to ``write`` token by token: decodes the whole continuation each time and writes
    what is new, holding back an incomplete UTF-8 character (shown as U+FFFD) until its bytes arrive."""

    def __init__(self, tokenizer: Any, write: Callable[[str], Any]) -> None:
        self.tokenizer, self.write = tokenizer, write
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, token: torch.Tensor) -> None:
        self.ids.append(int(token.reshape(-1)[0]))
        self._emit(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def _emit(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.write(text[len(self.shown):])
            self.shown = text
            sys.stdout.flush()

    def finish(self) -> str:
        text = self.tokenizer.decode(self.ids)
        self._emit(text)
        return text


def unique_path(folder: Path, name: str) -> Path:
    """``folder/name``, or ``name-1``, ``name-2`` ... when taken (earlier outputs are never overwritten)."""
    stem, suffix = Path(name).stem, Path(name).suffix
    path, k = folder / name, 1
    while path.exists():
        path, k = folder / f"{stem}-{k}{suffix}", k + 1
    return path


class LMPrediction:
    """Mixin (listed before ``L.LightningModule``) giving a language model a useful ``predict``.

    ``predict_step`` scores the predict data (every selected file: the user's text) by next-token loss;
    ``on_predict_epoch_end`` prints its loss and perplexity, then generates a continuation of each prompt with
    ``generation``'s options (:func:`models.lm.sampling.generate`: carried state for recurrent models, ids
    limited to the tokenizer's vocabulary), streaming it to the console, and writes everything to
    ``predictions.txt`` and ``predictions.json`` in the run folder (paths printed). The module needs
    ``self.model`` (with a ``config``), ``forward(input_ids) -> logits`` and, from ``__init__``,
    :meth:`init_prediction`.
    """

    def init_prediction(self, prompts: list[str] | None, prompt_file: str | None,
                        generation: GenerationConfig | None, default_prompt: str) -> None:
        self.generation = generation or GenerationConfig()
        self.prompts = read_prompts(prompts, prompt_file, default_prompt or "\n")
        self._nll_sum = self._nll_tokens = 0.0
        self._windows = 0

    def on_predict_epoch_start(self) -> None:
        self._nll_sum = self._nll_tokens = 0.0
        self._windows = 0

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Per-window summed next-token loss (nats) and token count: ``{"index", "nll", "tokens"}``."""
        logits = self(batch["input_ids"]).float()
        nll = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none").sum(1)  # (B,)
        tokens = torch.full_like(nll, batch["labels"].size(1))
        self._nll_sum += float(nll.sum())
        self._nll_tokens += float(tokens.sum())
        self._windows += len(nll)
        return {"index": batch["index"], "nll": nll, "tokens": tokens}

    def _scores(self) -> dict[str, float] | None:
        totals = torch.tensor([self._nll_sum, self._nll_tokens, float(self._windows)], dtype=torch.float64,
                              device=self.device)
        if self.trainer.world_size > 1:
            totals = self.all_gather(totals).reshape(-1, 3).sum(0)
        nll, tokens, windows = (float(v) for v in totals)
        if not tokens:
            return None
        return {"windows": int(windows), "tokens": int(tokens), "loss": nll / tokens,
                "perplexity": math.exp(nll / tokens)}

    def generate_text(self, prompt: str, write: Callable[[str], Any] | None = None) -> str:
        """The continuation of ``prompt`` with ``generation``'s options (its seed makes it repeatable),
        streamed to ``write`` as it is sampled."""
        return self.generate_tokens(prompt, write)[0]

    def generate_tokens(self, prompt: str, write: Callable[[str], Any] | None = None) -> tuple[str, list[int]]:
        """:meth:`generate_text` and the continuation's token ids."""
        tok, cfg = data_tokenizer(self), self.generation
        ids = tok.encode(prompt)
        if len(ids) == 0:
            ids = torch.tensor([getattr(tok, "separator", 0)])
        g = torch.Generator(device=self.device).manual_seed(cfg.seed)
        stream = TextStream(tok, write or (lambda _: None))
        was_training = self.training
        self.eval()
        try:
            generate(self.model, ids.unsqueeze(0).to(self.device), cfg.max_new_tokens, cfg.temperature, cfg.top_k,
                     g, cfg.top_p, stream, block_size=getattr(self.model.config, "block_size", None),
                     vocab_limit=tok.vocab_size)
        finally:
            self.train(was_training)
        return stream.finish(), stream.ids

    def on_predict_epoch_end(self) -> None:
        scores = self._scores()
        if self.global_rank != 0:
            return
        out = sys.stdout
        lines, samples = [], []
        if scores is not None:
            lines.append(f"predict: {scores['windows']} windows, {scores['tokens']} tokens, loss "
                         f"{scores['loss']:.4f} nats/token, perplexity {scores['perplexity']:.3f}")
            out.write(lines[-1] + "\n")
        if self.generation.max_new_tokens:
            for prompt in self.prompts:
                out.write(f"--- prompt: {prompt!r}\n{prompt}")
                out.flush()
                text, ids = self.generate_tokens(prompt, out.write)
                out.write("\n")
                samples.append({"prompt": prompt, "continuation": text, "tokens": ids})
                lines.append(f"--- prompt: {prompt!r}\n{prompt}{text}")
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        txt, js = unique_path(folder, "predictions.txt"), unique_path(folder, "predictions.json")
        txt.write_text("\n".join(lines) + "\n", encoding="utf-8")
        js.write_text(json.dumps({"scores": scores, "generation": asdict(self.generation), "samples": samples},
                                 indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        out.write(f"predictions written to {txt} and {js}\n")
        out.flush()
