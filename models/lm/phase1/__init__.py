"""Phase 1 language model: BK resolvent mixer + AR-SSM blocks, tensor-train (HTT) embedding, LNS inference.

The API (pure PyTorch)::

    from models.lm.phase1 import Phase1Config, get_preset_config, create_phase1_model
    config = get_preset_config("8gb")                       # or Phase1Config(...), Phase1Config.from_nested(...)
    model = create_phase1_model(config)
    converted = convert_to_phase1(gpt, config)              # converted.conversion_report
    dense = convert_from_phase1(converted)
    collect_phase1_diagnostics(model, dataloader)          # ar_ssm_effective_rank, htt_compression_ratio, ...
    BKStabilityMonitor().check_stability(G_ii=g, v=a, epsilon=eta)   # or check_stability(model=model)
    logits, diagnostics = model(ids, return_diagnostics=True)  # the guide's forward; model.epsilon = bk_eta

The guide's names work too: ``models.lm.phase1.errors`` (``VRAMExhaustedError``, ``NumericalInstabilityError``,
``Phase1ErrorRecovery``), ``models.layers.ar_ssm.AdaptiveRankSemiseparableLayer``,
``models.layers.tt_embedding.HolographicTTEmbedding``, ``models.quant.lns.LNSLinear(use_lns=...)``.
"""

from models.lm.phase1.config import Phase1Config
from models.lm.phase1.convert import (
                                      ConversionReport,
                                      convert_from_phase1,
                                      convert_to_phase1,
                                      swap_from_lns,
                                      swap_to_lns,
)
from models.lm.phase1.diagnostics import collect_phase1_diagnostics, gate_statistics, phase1_health
from models.lm.phase1.errors import NumericalInstabilityError, Phase1ErrorRecovery, VRAMExhaustedError
from models.lm.phase1.model import BlockState, Phase1Block, Phase1LM, create_phase1_model
from models.lm.phase1.presets import PRESETS, estimate_memory, fit_to_budget, get_preset_config
from models.lm.phase1.stability import BKStabilityMonitor

__all__ = ["PRESETS", "BKStabilityMonitor", "BlockState", "ConversionReport", "NumericalInstabilityError",
           "Phase1Block", "Phase1Config", "Phase1ErrorRecovery", "Phase1LM", "VRAMExhaustedError",
           "collect_phase1_diagnostics", "convert_from_phase1", "convert_to_phase1", "create_phase1_model",
           "estimate_memory", "fit_to_budget", "gate_statistics", "get_preset_config", "phase1_health",
           "swap_from_lns", "swap_to_lns"]
