"""Phase 1 diagnostics: health signals for ``StabilityMonitor``, gate statistics, and a dataloader sweep.

:func:`phase1_health` is what ``Phase1LanguageModel.health_signals()`` returns (larger = less healthy, no host
sync): ``bk_bound_ratio`` = max over BK layers of ``eta * max|g|`` (<= 1 by theorem; reported as ``inf`` once
it exceeds ``1 + stability_threshold``, so the callback treats a broken bound like a NaN) and
``bk_transfer_log10_condition``. :func:`gate_statistics` gives the AR-SSM gate numbers that are logged next to
them (``phase1/*``; not health signals: a lower effective rank is not healthier). :func:`collect_phase1_diagnostics`
runs a model over a dataloader and reports everything at once, with the peak memory of the sweep.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable

import torch
import torch.nn.functional as F

from models.layers.tt_embedding import TTEmbedding
from models.lm.phase1.model import Phase1LM
from models.lm.phase1.stability import BKStabilityMonitor
from models.utils.memory import measure_peak_memory


def phase1_health(model: Phase1LM) -> dict[str, torch.Tensor]:
    """Health signals of the last forward (empty without BK layers or with stability monitoring off)."""
    stats = [m.stats() for m in model.bk_mixers()]
    stats = [s for s in stats if s]
    if not stats:
        return {}
    ratio = torch.stack([s["max_abs_g"] / s["bound"] for s in stats]).amax()
    broken = ~torch.isfinite(ratio) | (ratio > 1 + model.config.stability_threshold)
    ratio = torch.where(broken, torch.full_like(ratio, float("inf")), ratio)
    cond = torch.stack([s["transfer_condition"] for s in stats]).amax()
    return {"bk_bound_ratio": ratio, "bk_transfer_log10_condition": cond}


def check_model_stability(model: Phase1LM) -> dict[str, Any]:
    """:class:`BKStabilityMonitor`'s verdict over every BK layer's last forward (host sync)."""
    monitor = BKStabilityMonitor(model.config.stability_threshold)
    out: dict[str, Any] = {"is_stable": True, "warnings": [], "bound_ratio": 0.0, "transfer_log10_condition": 0.0}
    for i, mixer in enumerate(model.bk_mixers()):
        r = monitor.check_mixer_stats(mixer.stats())
        out["is_stable"] &= r["is_stable"]
        out["warnings"] += [f"BK layer {i}: {w}" for w in r["warnings"]]
        for key in ("bound_ratio", "transfer_log10_condition"):
            if not math.isnan(r[key]):
                out[key] = max(out[key], r[key]) if math.isfinite(r[key]) else r[key]
    return out


@torch.no_grad()
def gate_statistics(model: Phase1LM) -> dict[str, float]:
    """AR-SSM gates of the last forward: mean effective rank (gates > 0.5 per token), mean gate, the ranks the
    eval path computes (within the active rank and not pruned), averaged over layers. Empty without AR-SSM."""
    layers = [m for m in model.ar_ssm_layers() if m._last_gate is not None]
    if not layers:
        return {}
    n = len(layers)
    return {
        "ar_ssm_effective_rank": sum(float(m.effective_rank()) for m in layers) / n,
        "ar_ssm_gate_mean": sum(float(m._last_gate.float().mean()) for m in layers) / n,
        "ar_ssm_inference_rank": sum(int(m.inference_rank_mask().sum()) for m in layers) / n,
        "ar_ssm_active_rank": sum(m.active_rank for m in layers) / n,
    }


def htt_compression_ratio(model: Phase1LM) -> float:
    """Dense embedding size over the TT's stored numbers (1.0 for a dense embedding)."""
    return model.embed.compression_ratio() if isinstance(model.embed, TTEmbedding) else 1.0


# --------------------------------------------------------------------------------------------- memory
# ------------------------------------------------------------------------------------------- the sweep
@torch.no_grad()
def collect_phase1_diagnostics(
    model: Phase1LM, dataloader: Iterable, max_batches: int | None = 8, device: torch.device | str | None = None
) -> dict[str, Any]:
    """Evaluate ``model`` (eval mode) on up to ``max_batches`` batches (dicts with ``input_ids`` and
    ``labels``, as ``TextDataModule`` gives, or ``(input_ids, labels)`` pairs).

    Returns ``ar_ssm_effective_rank`` (and the other :func:`gate_statistics`, averaged over batches),
    ``htt_compression_ratio`` (dense / TT numbers, e.g. 223), ``compression_ratio`` (the guide's fraction, TT /
    dense, e.g. 0.0045), ``num_parameters``, ``peak_memory_mb`` (of the sweep, see :func:`measure_peak_memory`;
    ``peak_vram_mb`` is the guide's name for the same number), ``loss``/``ppl``, ``tokens``, ``tokens_per_s``,
    and the stability verdict (``is_stable``, ``warnings``, ``bk_bound_ratio``, ``bk_transfer_log10_condition``;
    worst over batches).
    """
    was_training = model.training
    model.eval()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    totals: dict[str, float] = {}
    acc = {"loss": 0.0, "tokens": 0, "batches": 0, "seconds": 0.0}
    verdict: dict[str, Any] = {"is_stable": True, "warnings": [], "bound_ratio": 0.0, "transfer_log10_condition": 0.0}

    def sweep() -> None:
        for i, batch in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            ids, labels = (batch["input_ids"], batch["labels"]) if isinstance(batch, dict) else batch
            ids, labels = ids.to(device), labels.to(device)
            start = time.perf_counter()
            logits = model(ids)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
            acc["seconds"] += time.perf_counter() - start
            acc["loss"] += float(loss)
            acc["tokens"] += labels.numel()
            acc["batches"] += 1
            for key, value in gate_statistics(model).items():
                totals[key] = totals.get(key, 0.0) + value
            r = check_model_stability(model)
            verdict["is_stable"] &= r["is_stable"]
            verdict["warnings"] += [w for w in r["warnings"] if w not in verdict["warnings"]]
            for key in ("bound_ratio", "transfer_log10_condition"):
                verdict[key] = max(verdict[key], r[key])

    peak = measure_peak_memory(sweep, device)
    model.train(was_training)
    n = max(acc["batches"], 1)
    loss = acc["loss"] / max(acc["tokens"], 1)
    out: dict[str, Any] = {key: value / n for key, value in totals.items()}
    out.setdefault("ar_ssm_effective_rank", 0.0)
    out.update(
        htt_compression_ratio=htt_compression_ratio(model),
        compression_ratio=1.0 / htt_compression_ratio(model),
        num_parameters=model.num_parameters(),
        peak_memory_mb=peak,
        peak_vram_mb=peak,
        loss=loss,
        ppl=math.exp(min(loss, 50.0)),
        tokens=acc["tokens"],
        tokens_per_s=acc["tokens"] / acc["seconds"] if acc["seconds"] else float("nan"),
        is_stable=verdict["is_stable"],
        warnings=verdict["warnings"],
        bk_bound_ratio=verdict["bound_ratio"],
        bk_transfer_log10_condition=verdict["transfer_log10_condition"],
    )
    return out
