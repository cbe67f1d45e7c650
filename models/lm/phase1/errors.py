"""The Phase 1 errors (the guide's ``errors`` module) and :class:`Phase1ErrorRecovery`, its recovery entry point.

Both errors take the project's one-line message or the guide's structured arguments:
``VRAMExhaustedError(current_mb, limit_mb, suggestions)`` and ``NumericalInstabilityError(component,
diagnostics)``; either way the message is one readable line and the fields are attributes.

In a Lightning run recovery is the callbacks' job (``callbacks.oom_recovery.OOMRecovery`` halves the micro-batch,
``callbacks.stability.StabilityMonitor`` rolls back and lowers the learning rate). :class:`Phase1ErrorRecovery`
is the guide's entry point for a hand-written loop: it applies the cheapest remaining remedy and says whether
the step may be retried.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


class NumericalInstabilityError(RuntimeError):
    """The BK recurrence left its bound (or produced NaN/Inf). Recovery: train with
    ``callbacks.stability.StabilityMonitor`` (rollback to the last good snapshot and a lower learning rate), or
    :meth:`Phase1ErrorRecovery.handle_numerical_instability` in a hand-written loop.

    Args:
        message: the message, or (guide form) the component where it happened.
        diagnostics: (guide form) the numbers that show it, kept as ``.diagnostics``.
    """

    def __init__(self, message: str = "", diagnostics: dict[str, Any] | None = None) -> None:
        self.component = message if diagnostics is not None else ""
        self.diagnostics = dict(diagnostics or {})
        if diagnostics is not None:
            details = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in diagnostics.items())
            message = f"numerical instability in {message}" + (f": {details}" if details else "")
        super().__init__(message)


class VRAMExhaustedError(torch.OutOfMemoryError):
    """The configuration cannot fit the device memory. Recovery: a smaller preset or sizes (``phase1.preset``,
    ``memory.target_vram_gb``); batch-size overruns are handled by ``callbacks.oom_recovery.OOMRecovery``.

    Args:
        message: the message, or (guide form) the memory in use in MiB.
        limit_mb: (guide form) the device limit in MiB.
        suggestions: (guide form) what to change, kept as ``.suggestions``.
    """

    def __init__(self, message: str | float = "", limit_mb: float | None = None,
                 suggestions: list[str] | None = None) -> None:
        self.current_mb = float(message) if isinstance(message, (int, float)) else None
        self.limit_mb, self.suggestions = limit_mb, list(suggestions or [])
        if self.current_mb is not None:
            message = f"VRAM exhausted: {self.current_mb:.1f} MiB of {limit_mb or float('nan'):.1f} MiB"
            if self.suggestions:
                message += "; try: " + "; ".join(self.suggestions)
        super().__init__(message)


@dataclass
class RecoveryAction:
    """One remedy :class:`Phase1ErrorRecovery` applied."""

    action_type: str
    details: dict[str, Any] = field(default_factory=dict)


class Phase1ErrorRecovery:
    """Apply the cheapest remaining remedy for a Phase 1 error; ``handle_*`` return True when the step may be
    retried, False when nothing is left (re-raise then). Remedies are recorded in ``actions``.

    Args:
        max_recovery_attempts: remedies per error kind before giving up.
        lr_factor: learning-rate multiplier per instability.
    """

    def __init__(self, max_recovery_attempts: int = 3, lr_factor: float = 0.5) -> None:
        if max_recovery_attempts < 0 or not 0.0 < lr_factor < 1.0:
            raise ValueError(f"need max_recovery_attempts >= 0 and 0 < lr_factor < 1, got "
                             f"{max_recovery_attempts}, {lr_factor}")
        self.max_recovery_attempts, self.lr_factor = max_recovery_attempts, lr_factor
        self.actions: list[RecoveryAction] = []
        self._attempts = {"vram": 0, "instability": 0}

    def _take(self, kind: str) -> bool:
        if self._attempts[kind] >= self.max_recovery_attempts:
            return False
        self._attempts[kind] += 1
        return True

    def handle_vram_exhausted(self, error: BaseException, model: torch.nn.Module, config: Any = None) -> bool:
        """Turn on gradient checkpointing (``config`` / ``model.config``), else halve every AR-SSM layer's active
        rank (down to its ``min_rank``), and release cached device memory."""
        if not self._take("vram"):
            return False
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for cfg in {id(c): c for c in (config, getattr(model, "config", None)) if c is not None}.values():
            if hasattr(cfg, "use_gradient_checkpointing") and not cfg.use_gradient_checkpointing:
                cfg.use_gradient_checkpointing = True
                self.actions.append(RecoveryAction("enable_gradient_checkpointing", {"error": str(error)}))
                return True
        layers = [m for m in model.modules() if hasattr(m, "set_active_rank") and hasattr(m, "min_rank")]
        ranks = {id(m): (m.active_rank, max(m.min_rank, m.active_rank // 2)) for m in layers}
        if not any(new < old for old, new in ranks.values()):
            return False
        for m in layers:
            m.set_active_rank(ranks[id(m)][1])
        self.actions.append(RecoveryAction("reduce_ar_ssm_rank", {"ranks": sorted({n for _, n in ranks.values()})}))
        return True

    def handle_numerical_instability(self, error: BaseException, optimizer: torch.optim.Optimizer,
                                     config: Any = None, model: torch.nn.Module | None = None) -> bool:
        """Multiply every parameter group's learning rate by ``lr_factor`` (the model's weights are the caller's
        to roll back: ``callbacks.stability.StabilityMonitor`` does both in a Lightning run)."""
        if not self._take("instability"):
            return False
        lrs = []
        for group in optimizer.param_groups:
            group["lr"] *= self.lr_factor
            lrs.append(group["lr"])
        self.actions.append(RecoveryAction("reduce_learning_rate", {"lr": lrs, "error": str(error)}))
        return True
