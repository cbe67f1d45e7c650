"""The Phase 1 language model: recurrent O(N) token mixers + MLPs, dense or tensor-train embedding.

Layout (``config`` = :class:`models.lm.phase1.config.Phase1Config`)::

    embed        nn.Embedding, or TTEmbedding (HTT) when htt_enabled
    blocks[i]    x = x + bk(norm_bk(x))          BKMixer (causal resolvent), when bk_enabled
                 x = x + ar_ssm(norm_ssm(x))     ARSSM (adaptive-rank semiseparable), when ar_ssm_enabled
                 x = x + mlp(norm_mlp(x))        create_mlp(mlp_class)
    ln_f         final norm
    head         tied: embed (TT cores contracted without the dense table) | lm_head linear

Both mixers are causal recurrences with a carried state (BK: g of the last token; AR-SSM: its conv window
and scan state), so ``forward(idx, state, return_state=True)`` continues a sequence where the previous call
stopped: token-by-token decoding gives the full forward's logits. With ``use_gradient_checkpointing`` each
block is recomputed in the backward (``torch.utils.checkpoint``, non-reentrant); AR-SSM's running gate
statistics are updated once per step even so. The AR-SSM gate L1 penalty of the last forward is
``model.aux_loss`` (add it to the training loss). ``zero_init_mixers`` zeroes the mixers' output
projections, so a block starts as its MLP-only baseline (used by conversion).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.layers.ar_ssm import ARSSM, ARSSMState
from models.layers.bk_mixer import BKMixer
from models.layers.create import create_mlp, create_norm
from models.layers.tt_embedding import TTEmbedding
from models.lm.phase1.config import Phase1Config
from models.lm.sampling import generate_with_state


class BlockState(NamedTuple):
    """Carried state of one block: BK's g of the last token (complex (B, d_model)) and the AR-SSM state."""

    bk: torch.Tensor | None
    ar_ssm: ARSSMState | None


def _norm(config: Phase1Config) -> nn.Module:
    return create_norm(config.norm_class, config.d_model, config.norm_eps, config.bias)


class Phase1Block(nn.Module):
    """Pre-norm residual block: [BK mixer] -> [AR-SSM] -> MLP (each optional mixer with its own norm)."""

    def __init__(self, config: Phase1Config, zero_init_mixers: bool = False) -> None:
        super().__init__()
        d = config.d_model
        self.norm_bk = _norm(config) if config.bk_enabled else None
        self.bk = (BKMixer(d, eta=config.bk_eta, chunk_size=config.bk_chunk_size, zero_init_output=zero_init_mixers,
                           track_stats=config.stability_monitoring_enabled) if config.bk_enabled else None)
        self.norm_ssm = _norm(config) if config.ar_ssm_enabled else None
        self.ar_ssm = (ARSSM(d, config.ar_ssm_max_rank, config.ar_ssm_min_rank, config.ar_ssm_conv_kernel,
                             config.ar_ssm_l1_regularization, config.ar_ssm_use_fused_scan,
                             zero_init_output=zero_init_mixers) if config.ar_ssm_enabled else None)
        self.norm_mlp = _norm(config)
        self.mlp = create_mlp(config.mlp_class, d, config.mlp_size, config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, state: BlockState | None = None, return_state: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, BlockState | None]:
        """``(x, gate L1 penalty, new state or None)``."""
        new_bk = new_ssm = None
        aux = x.new_zeros((), dtype=torch.float32)
        if self.bk is not None:
            out = self.bk(self.norm_bk(x), state=None if state is None else state.bk, return_state=return_state)
            if return_state:
                out, new_bk = out
            x = x + self.drop(out)
        if self.ar_ssm is not None:
            out = self.ar_ssm(self.norm_ssm(x), state=None if state is None else state.ar_ssm,
                              return_state=return_state)
            if return_state:
                out, new_ssm = out
            x = x + self.drop(out)
            if self.training and self.ar_ssm.l1_regularization:
                aux = aux + self.ar_ssm.gate_l1_loss().float()
        x = x + self.drop(self.mlp(self.norm_mlp(x)))
        return x, aux, (BlockState(new_bk, new_ssm) if return_state else None)


class Phase1LM(nn.Module):
    """Phase 1 language model; ``forward(idx) -> logits (B, N, vocab_size)`` (see the module docstring)."""

    #: ``forward(idx, state, return_state=True)`` continues a sequence (:func:`models.lm.sampling.generate`)
    carries_state = True

    def __init__(self, config: Phase1Config, zero_init_mixers: bool = False) -> None:
        super().__init__()
        config.check_ranks()
        self.config = config
        if config.htt_enabled:
            self.embed: nn.Module = TTEmbedding(config.vocab_size, config.d_model, rank=config.htt_rank,
                                                num_cores=config.htt_num_cores,
                                                phase_encoding=config.htt_phase_encoding)
        else:
            self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Phase1Block(config, zero_init_mixers) for _ in range(config.n_layers))
        self.ln_f = _norm(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._init_weights()
        self.aux_loss: torch.Tensor = torch.zeros(())
        if config.lns_enabled:
            from models.lm.phase1.convert import swap_to_lns

            swap_to_lns(self, config.lns_format, config.lns_target_modules)

    @torch.no_grad()
    def _init_weights(self) -> None:
        """GPT-style N(0, 0.02) for the embedding, MLPs and head; the mixers keep their own initialisation."""
        if isinstance(self.embed, nn.Embedding):
            nn.init.normal_(self.embed.weight, std=0.02)
        linears = [m for b in self.blocks for m in b.mlp.modules() if isinstance(m, nn.Linear)]
        for m in linears + ([self.lm_head] if self.lm_head is not None else []):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # -------------------------------------------------------------------------------------------- head
    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., d_model) -> logits (..., vocab_size)."""
        if self.lm_head is not None:
            return self.lm_head(h)
        if isinstance(self.embed, TTEmbedding):
            return self.embed.logits(h)
        return F.linear(h, self.embed.weight)

    def _checkpointed(self, block: Phase1Block, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block under ``torch.utils.checkpoint``; the recomputation leaves AR-SSM's gate statistics as the
        first pass set them (the recomputed output is the same: in training the computed ranks do not depend
        on the statistics)."""
        calls = [0]

        def run(inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            calls[0] += 1
            saved = None
            if calls[0] > 1 and block.ar_ssm is not None:
                saved = (block.ar_ssm.gate_running_max.clone(), block.ar_ssm.gate_updates.clone())
            try:
                out, aux, _ = block(inp)
            finally:  # the recomputation may stop early (an exception) once it has what the backward needs
                if saved is not None:
                    with torch.no_grad():
                        block.ar_ssm.gate_running_max.copy_(saved[0])
                        block.ar_ssm.gate_updates.copy_(saved[1])
            return out, aux

        return checkpoint(run, x, use_reentrant=False)

    @property
    def epsilon(self) -> float:
        """The guide's name for the BK mixers' ``Im z`` (``config.bk_eta``): |g| <= 1 / epsilon."""
        return self.config.bk_eta

    def forward(
        self, idx: torch.Tensor, state: list[BlockState] | None = None, return_state: bool = False,
        return_diagnostics: bool = False,
    ) -> torch.Tensor | tuple:
        """``idx`` (B, N) -> logits (B, N, vocab); with ``return_state`` also the per-block states after the
        last token. ``state`` (from a previous call) continues that sequence. ``return_diagnostics`` (the guide's
        ``output, diagnostics = model(batch)``) appends a dict of detached tensors: ``bk_bound_ratio`` and
        ``bk_transfer_log10_condition`` (see ``diagnostics.phase1_health``, with BK stats tracking on),
        ``aux_loss`` (the AR-SSM gate L1 term) and ``ar_ssm_effective_rank`` (mean over layers). Without it a
        plain tensor comes back, so unpacking it into two names is an error only for a batch of two: ask for
        the diagnostics explicitly."""
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(f"expected token ids of shape (B, N>=1), got {tuple(idx.shape)}")
        if state is not None and len(state) != len(self.blocks):
            raise ValueError(f"state has {len(state)} block states, the model has {len(self.blocks)} blocks")
        x = self.drop(self.embed(idx))
        aux = x.new_zeros((), dtype=torch.float32)
        use_ckpt = (self.config.use_gradient_checkpointing and self.training and torch.is_grad_enabled()
                    and state is None and not return_state)
        new_states = []
        for i, block in enumerate(self.blocks):
            if use_ckpt:
                x, a = self._checkpointed(block, x)
            else:
                x, a, s = block(x, None if state is None else state[i], return_state)
                new_states.append(s)
            aux = aux + a
        self.aux_loss = aux
        logits = self.head(self.ln_f(x))
        out = (logits, new_states) if return_state else (logits,)
        if return_diagnostics:
            out = (*out, self.diagnostics())
        return out if len(out) > 1 else logits

    @torch.no_grad()
    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Detached tensors of the last forward (no host sync): see ``forward(return_diagnostics=True)``."""
        from models.lm.phase1.diagnostics import phase1_health

        out = dict(phase1_health(self))
        out["aux_loss"] = self.aux_loss.detach()
        layers = self.ar_ssm_layers()
        if layers and all(m._last_gate is not None for m in layers):
            out["ar_ssm_effective_rank"] = torch.stack([m.effective_rank() for m in layers]).mean()
        return out

    # --------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
        generator: torch.Generator | None = None, top_p: float | None = None,
        on_token: Callable[[torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Append ``max_new_tokens`` sampled tokens to ``idx (B, T)`` (``temperature=0``: greedy). The prompt is
        read once; each new token costs one recurrent step with the carried state (no re-reading)."""
        return generate_with_state(self, idx, max_new_tokens, temperature, top_k, generator, top_p, on_token)

    # -------------------------------------------------------------------------------------- conveniences
    def bk_mixers(self) -> list[BKMixer]:
        return [b.bk for b in self.blocks if b.bk is not None]

    def ar_ssm_layers(self) -> list[ARSSM]:
        return [b.ar_ssm for b in self.blocks if b.ar_ssm is not None]

    def set_active_rank(self, rank: int) -> None:
        """AR-SSM rank curriculum: every AR-SSM layer computes ranks ``< rank`` in training."""
        for layer in self.ar_ssm_layers():
            layer.set_active_rank(rank)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def create_phase1_model(config: Phase1Config | None = None, zero_init_mixers: bool = False) -> Phase1LM:
    """A freshly initialised :class:`Phase1LM` (``config`` default: ``Phase1Config()``)."""
    return Phase1LM(config or Phase1Config(), zero_init_mixers=zero_init_mixers)
