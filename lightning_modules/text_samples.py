"""Generated text in TensorBoard for the language-model families (GPT, Phase 1, Phase 2)."""

from __future__ import annotations

import lightning as L
import torch

from lightning_modules.lm_predict import data_tokenizer


def log_text_sample(module: L.LightningModule, prompt: str | None, tokens: int) -> None:
    """Add a continuation of ``prompt`` (``tokens`` bytes, top-k 20 at temperature 0.8, seed 0) to TensorBoard's
    Text tab as ``samples``; reading a sample beats a number. Rank 0 only, skipped in the sanity check, with
    ``tokens: 0`` or without a TensorBoard logger. ``module.model`` must have ``generate``."""
    logger = module.logger
    if module.trainer.sanity_checking or not tokens or module.global_rank != 0:
        return
    if not hasattr(getattr(logger, "experiment", None), "add_text"):  # no TensorBoard logger
        return
    tok = data_tokenizer(module)
    ids = tok.encode(prompt or "\n").unsqueeze(0).to(module.device)
    g = torch.Generator(device=module.device).manual_seed(0)
    out = module.model.generate(ids, tokens, temperature=0.8, top_k=20, generator=g)
    logger.experiment.add_text("samples", "```\n" + tok.decode(out[0].tolist()) + "\n```", module.global_step)
