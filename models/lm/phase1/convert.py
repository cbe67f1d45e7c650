"""Conversion into and out of the Phase 1 language model, and the LNS layer swap.

:func:`convert_to_phase1` takes a baseline language model, either a :class:`~models.lm.phase1.model.Phase1LM`
(typically with its features off: dense embedding, MLP-only blocks) or the project's
:class:`models.lm.gpt.GPT`, and builds a Phase 1 model of the same sizes:

* **kept**: every weight with a counterpart is copied exactly (MLPs and their norms, the final norm, an
  untied head, mixers already present);
* **approximated**: a dense embedding becomes a tensor-train embedding by TT-SVD
  (:meth:`TTEmbedding.from_dense`); the relative Frobenius error is reported; a GPT with the tanh GELU
  (GPT-2's ``gelu_new``, e.g. loaded by :mod:`models.lm.interop`) gets Phase 1's exact GELU, reported as
  ``blocks.*.mlp`` with the MLP's relative output error on unit-normal inputs;
* **new**: the BK mixer and AR-SSM of each block start with zeroed output projections, so each new residual
  branch adds exactly 0 and the converted model computes what the baseline computed (up to the TT error);
* **dropped**: weights Phase 1 has no place for. From a GPT that is each block's attention and its
  ``norm_1`` (the mixers replace attention; the model is recurrent, so learned positions go too): the
  converted model is the GPT *without attention* until it is fine-tuned, and its perplexity before
  fine-tuning says how much the attention carried.

The report (:class:`ConversionReport`) lists the four groups; ``strict=True`` refuses a source weight that
fits none of them. :func:`convert_from_phase1` materialises a TT embedding back to a dense one and LNS layers
back to ``nn.Linear`` (the mixers stay).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from models.layers.tt_embedding import TTEmbedding
from models.lm.phase1.config import Phase1Config
from models.lm.phase1.model import Phase1LM
from models.module_swap import find_modules, replace_modules
from models.quant.lns import LNS_FORMATS, LNSLinear

#: default LNS targets: MLP linears, BK projections, AR-SSM gate input and an untied head (the modules that
#: are called as modules; AR-SSM's U/V/W_o are read as weight slices and stay in full precision)
DEFAULT_LNS_TARGETS = (r"\.mlp\.", r"\.bk\.(in|out)_proj$", r"\.ar_ssm\.gate_in$", r"^lm_head$")


def swap_to_lns(
    model: nn.Module, lns_format: str = "lns8-g8", target_modules: Sequence[str] | None = None
) -> list[str]:
    """Replace the selected ``nn.Linear`` layers with :class:`LNSLinear` sharing their parameters (training
    stays ``F.linear``; eval runs the LNS emulation). Returns the swapped names."""
    if lns_format not in LNS_FORMATS:
        raise ValueError(f"lns_format must be one of {sorted(LNS_FORMATS)}, got {lns_format!r}")
    fmt = LNS_FORMATS[lns_format]
    patterns = list(target_modules) if target_modules is not None else list(DEFAULT_LNS_TARGETS)
    names = find_modules(model, nn.Linear, include=lambda n: any(re.search(p, n) for p in patterns),
                         accept=lambda n, m: not isinstance(m, LNSLinear), what=f"lns_target_modules={patterns}")
    return replace_modules(model, names, lambda _, lin: LNSLinear.from_linear(lin, fmt.gamma, fmt.exp_bits))


def swap_from_lns(model: nn.Module) -> list[str]:
    """Every :class:`LNSLinear` back to ``nn.Linear`` (same Parameters)."""
    names = [n for n, m in model.named_modules() if isinstance(m, LNSLinear)]

    def build(_: str, old: LNSLinear) -> nn.Linear:
        new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, device="meta")
        new.weight, new.bias = old.weight, old.bias
        return new.train(old.training)

    return replace_modules(model, names, build)


@dataclass
class ConversionReport:
    """What a conversion did with each weight (state-dict names of the converted model, or of the source for
    ``dropped``); ``approximated`` maps a name to its relative Frobenius error."""

    kept: list[str] = field(default_factory=list)
    approximated: dict[str, float] = field(default_factory=dict)
    new: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        approx = ", ".join(f"{k} (rel. error {v:.3g})" for k, v in self.approximated.items()) or "none"
        dropped = ", ".join(_collapse(self.dropped)) or "none"
        return (f"kept {len(self.kept)} tensors; approximated: {approx}; new {len(self.new)} tensors "
                f"({', '.join(_collapse(self.new)) or 'none'}); dropped: {dropped}")


def _collapse(names: list[str]) -> list[str]:
    """``blocks.3.bk.in_proj.weight`` -> ``blocks.*.bk``: one entry per module kind."""
    out: list[str] = []
    for n in names:
        short = re.sub(r"^blocks\.\d+\.", "blocks.*.", n)
        short = short.rsplit(".", 1)[0] if "." in short else short
        short = re.sub(r"^(blocks\.\*\.\w+)\..*", r"\1", short)
        if short not in out:
            out.append(short)
    return out


def _gpt_source(model: nn.Module, config: Phase1Config | None) -> tuple[Phase1Config, dict[str, torch.Tensor],
                                                                          list[str]]:
    """A GPT's sizes as a Phase1Config, its weights under Phase 1 names, and the names with no counterpart."""
    from models.lm.gpt import GPT

    assert isinstance(model, GPT)
    g = model.config
    state = model.state_dict()
    adapters = [k for k in state if ".base." in k or ".adapters." in k or k.startswith("skip2lora.")]
    if adapters:
        raise ValueError(f"the GPT has LoRA/Skip2-LoRA adapters ({adapters[0]}, ...); merge them first "
                         "(models.adapters.lora.merge_and_unload)")
    tied = torch.equal(model.lm_head.weight, model.wte.weight)
    base = config or Phase1Config()
    target = base.replace(vocab_size=g.vocab_size, d_model=g.n_embd, n_layers=g.n_layer, n_seq=g.block_size,
                          norm_class=g.norm_class, norm_eps=g.norm_eps, mlp_class=g.mlp_class,
                          intermediate_size=g.mlp_size, bias=g.bias, tie_embeddings=tied and base.tie_embeddings)
    mapped: dict[str, torch.Tensor] = {"embed.weight": state["wte.weight"]}
    dropped = []
    for key, value in state.items():
        if key == "wte.weight" or key.startswith("skip2lora."):
            continue
        if key == "lm_head.weight":
            if not target.tie_embeddings:
                mapped[key] = value
            continue
        m = re.match(r"blocks\.(\d+)\.(norm_2|mlp)\.(.*)", key)
        if m:
            part = "norm_mlp" if m[2] == "norm_2" else "mlp"
            mapped[f"blocks.{m[1]}.{part}.{m[3]}"] = value
        elif key.startswith("ln_f."):
            mapped[key] = value
        else:
            dropped.append(key)  # attention, norm_1, learned positions
    return target, mapped, dropped


def convert_to_phase1(
    model: nn.Module,
    config: Phase1Config | None = None,
    preserve_weights: bool = True,
    strict: bool = True,
    verbose: bool = False,
) -> Phase1LM:
    """A Phase 1 model built from a baseline LM; the report is ``result.conversion_report``.

    Args:
        model: a :class:`Phase1LM` (any features) or a :class:`models.lm.gpt.GPT` (adapters merged).
        config: the Phase 1 features wanted (``Phase1Config()`` by default); the sizes (vocab, width, depth,
            norm, MLP) always come from ``model``. A GPT with an untied head keeps it (``tie_embeddings``
            is switched off).
        preserve_weights: copy / approximate the baseline's weights (``False``: a fresh model of those sizes).
        strict: raise when a source weight is neither kept, approximated nor an expected drop (GPT attention,
            ``norm_1``, learned positions), or a kept weight's shape differs.
        verbose: print the report's summary.
    """
    from models.lm.gpt import GPT

    if isinstance(model, Phase1LM):
        s = model.config
        base = config or Phase1Config()
        target = base.replace(vocab_size=s.vocab_size, d_model=s.d_model, n_layers=s.n_layers, n_seq=s.n_seq,
                              norm_class=s.norm_class, norm_eps=s.norm_eps, mlp_class=s.mlp_class,
                              intermediate_size=s.mlp_size, bias=s.bias)
        source = model.state_dict()
        if isinstance(model.embed, TTEmbedding):  # compare dense tables; a TT source is re-fitted if needed
            source = {k: v for k, v in source.items() if not k.startswith("embed.")}
            source["embed.weight"] = model.embed.to_dense().detach()
        if not target.tie_embeddings and "lm_head.weight" not in source:
            source["lm_head.weight"] = source["embed.weight"]  # untying a tied head: both start as the table
        dropped: list[str] = []
    elif isinstance(model, GPT):
        target, source, dropped = _gpt_source(model, config)
    else:
        raise TypeError(f"convert_to_phase1 takes a Phase1LM or a models.lm.gpt.GPT, got {type(model).__name__}")

    new_model = Phase1LM(target.replace(lns_enabled=False), zero_init_mixers=True)
    report = ConversionReport()
    if not preserve_weights:
        report.new = list(new_model.state_dict())
        report.dropped = sorted(source)
    else:
        own = new_model.state_dict()
        to_load: dict = {}
        with torch.no_grad():
            for key, value in source.items():
                if key == "embed.weight" and isinstance(new_model.embed, TTEmbedding):
                    t = target
                    tt, err = TTEmbedding.from_dense(value.float(), t.htt_rank, t.htt_num_cores,
                                                     phase_encoding=t.htt_phase_encoding)
                    new_model.embed = tt.to(value.dtype)
                    report.approximated["embed"] = err
                elif key in own and (not isinstance(value, torch.Tensor) or own[key].shape == value.shape):
                    to_load[key] = value  # tensors, and extra states such as AR-SSM's active rank
                    report.kept.append(key)
                elif key in own and strict:
                    raise ValueError(f"{key}: source shape {tuple(value.shape)} != Phase 1 shape "
                                     f"{tuple(own[key].shape)}")
                elif key not in own and strict and not key.startswith("embed."):
                    raise ValueError(f"{key} of the source has no counterpart in the Phase 1 model "
                                     "(pass strict=False to drop it)")
                else:
                    report.dropped.append(key)
        new_model.load_state_dict(to_load, strict=False)
        approximated = {k for k in new_model.state_dict() if k.startswith("embed.") and report.approximated}
        report.new = [k for k in new_model.state_dict() if k not in set(report.kept) | approximated]
        report.dropped = dropped + report.dropped
    gelu = getattr(getattr(model, "config", None), "gelu_approximate", "none")
    if preserve_weights and gelu == "tanh" and len(new_model.blocks):
        report.approximated["blocks.*.mlp"] = _gelu_error(model.blocks[0].mlp, new_model.blocks[0].mlp)
    if target.lns_enabled:
        swap_to_lns(new_model, target.lns_format, target.lns_target_modules)
    new_model.config = target
    new_model.train(model.training)
    new_model.conversion_report = report  # type: ignore[attr-defined]
    if verbose:
        print(f"convert_to_phase1: {report.summary()}")
    return new_model


@torch.no_grad()
def _gelu_error(source_mlp: nn.Module, target_mlp: nn.Module) -> float:
    """Relative error of the exact-GELU MLP against the source's tanh-GELU one (same weights), on unit-normal
    inputs: what replacing GPT-2's ``gelu_new`` by Phase 1's GELU costs."""
    x = torch.randn(256, source_mlp.fc.in_features, generator=torch.Generator().manual_seed(0))
    x = x.to(source_mlp.fc.weight.dtype)
    ref = source_mlp(x)
    return float((target_mlp(x) - ref).norm() / ref.norm().clamp_min(1e-12))


def convert_from_phase1(model: Phase1LM) -> Phase1LM:
    """The same model with a dense ``nn.Embedding`` (the TT table materialised) and plain ``nn.Linear`` layers
    instead of LNS ones; mixers, MLPs and norms are kept as they are. In place; returns ``model``."""
    if isinstance(model.embed, TTEmbedding):
        with torch.no_grad():
            table = model.embed.to_dense()
            dense = nn.Embedding(table.shape[0], table.shape[1], device=table.device, dtype=table.dtype)
            dense.weight.copy_(table)
        model.embed = dense
    swap_from_lns(model)
    model.config = model.config.replace(htt_enabled=False, lns_enabled=False)
    return model
