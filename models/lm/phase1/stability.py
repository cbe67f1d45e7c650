"""Stability checks of the BK resolvent mixer, and the Phase 1 errors.

The BK feature is ``g_t = 1 / (a_t - z - k_t g_{t-1})`` with ``Im z = eta > 0``, ``Im a_t <= 0`` and ``k_t >= 0``.
Then ``Im g_t >= 0`` and ``|g_t| <= 1/eta`` hold exactly, for every sequence length: the checks are these
scale-free facts, not a determinant. (A determinant of ``H - z`` over a long sequence is a product of N
factors; in floating point it underflows to 0 or overflows to inf long before anything is wrong, so a
threshold on it reports a healthy long sequence as unstable.) :class:`BKStabilityMonitor` reports

* ``bound_ratio = eta * max|g|`` (at most 1; above ``1 + stability_threshold`` the recurrence has left its
  theorem, e.g. a potential with ``Im a > 0``, a gain instead of a loss);
* ``min_imag = eta * min Im g`` (at least 0, up to the same tolerance);
* ``transfer_log10_condition``: the largest log10 condition number of the per-token 2x2 transfer matrices
  ``[[a_t - z, -k_t], [1, 0]]`` (per token, so it never under- or overflows); large values are a warning
  (ill-conditioned parallel scan), not a failure: ``g`` itself stays bounded.

Recovery is the project's callbacks (and, for a hand-written loop, ``errors.Phase1ErrorRecovery``):
:class:`NumericalInstabilityError` is
raised when a Phase 1 model trains without ``callbacks.stability.StabilityMonitor`` and the bound breaks; with
the callback attached the same numbers arrive as health signals (``health/bk_bound_ratio`` reads inf when
the bound breaks) and the callback rolls back and lowers the learning rate. :class:`VRAMExhaustedError` is
raised before training when the memory model says even micro-batch 1 does not fit the device; smaller
overruns are for ``callbacks.oom_recovery.OOMRecovery``, which splits the batch.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from models.layers.bk_mixer import transfer_log10_condition
from models.lm.phase1.errors import NumericalInstabilityError, VRAMExhaustedError

__all__ = ["BKStabilityMonitor", "NumericalInstabilityError", "VRAMExhaustedError"]  # the errors: see errors.py


class BKStabilityMonitor:
    """Scale-free stability check of BK resolvent diagonals.

    Args:
        stability_threshold: relative tolerance on ``|g| <= 1/eta`` and ``Im g >= 0`` (float rounding).
        condition_warning: log10 transfer-matrix condition above which a warning is added.
    """

    def __init__(self, stability_threshold: float = 1e-3, condition_warning: float = 6.0) -> None:
        if stability_threshold < 0:
            raise ValueError(f"stability_threshold must be >= 0, got {stability_threshold}")
        self.stability_threshold = stability_threshold
        self.condition_warning = condition_warning

    @torch.no_grad()
    def check_stability(
        self,
        G_ii: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
        epsilon: float = 1.0,
        k: torch.Tensor | None = None,
        model: Any = None,
    ) -> dict[str, Any]:
        """Check resolvent diagonals ``G_ii`` (complex, any shape) computed with ``Im z = epsilon``.

        Args:
            G_ii: the resolvent diagonal g (complex); ``None`` (the guide's default call): check ``model``'s
                BK layers from what their last forward recorded (``diagnostics.check_model_stability``).
            model: with ``G_ii=None``, a :class:`Phase1LM` after a forward.
            v: the potential a_t (real or complex, broadcastable to ``G_ii``); with it ``Im v <= 0`` is checked
                and, together with ``k``, the transfer-matrix conditioning.
            epsilon: ``eta = Im z > 0``.
            k: the couplings (real, >= 0), for the conditioning.
        Returns:
            ``is_stable`` (bool), ``warnings`` (list of str), ``bound_ratio``, ``min_imag``,
            ``transfer_log10_condition`` (floats; the last is nan without ``v`` and ``k``).
        """
        if G_ii is None:
            if model is None:
                raise ValueError("check_stability needs G_ii (the resolvent diagonal) or model= (a Phase 1 model "
                                 "after a forward)")
            from models.lm.phase1.diagnostics import check_model_stability  # (it imports this module)

            return check_model_stability(model)
        if not G_ii.is_complex():
            raise TypeError(f"G_ii must be complex, got {G_ii.dtype}")
        if epsilon <= 0:
            raise ValueError(f"epsilon (Im z) must be > 0, got {epsilon}")
        tol = self.stability_threshold
        warnings: list[str] = []
        finite = bool(torch.isfinite(G_ii).all())
        bound_ratio = float(G_ii.abs().amax() * epsilon) if G_ii.numel() else 0.0
        min_imag = float(G_ii.imag.amin() * epsilon) if G_ii.numel() else 0.0
        condition = float("nan")
        stable = finite
        if not finite:
            warnings.append("G_ii has NaN/Inf entries")
        if finite and bound_ratio > 1 + tol:
            stable = False
            warnings.append(f"max|G_ii| = {bound_ratio / epsilon:.4g} exceeds the bound 1/epsilon = {1 / epsilon:.4g}")
        if finite and min_imag < -tol:
            stable = False
            warnings.append(f"Im G_ii reaches {min_imag / epsilon:.4g} < 0 (the resolvent left the upper half-plane)")
        if v is not None and v.is_complex() and float(v.imag.amax()) > tol * epsilon:
            stable = False
            warnings.append(f"the potential has Im v up to {float(v.imag.amax()):.4g} > 0 (gain, not decay)")
        if v is not None and k is not None:
            d = (v if v.is_complex() else v.to(G_ii.dtype)) - 1j * epsilon
            condition = float(transfer_log10_condition(d, k.to(d.real.dtype)).amax())
            if not math.isfinite(condition) or condition > self.condition_warning:
                warnings.append(f"transfer matrices are ill-conditioned: log10 condition {condition:.3g} "
                                f"(> {self.condition_warning:g})")
        return {"is_stable": stable, "warnings": warnings, "bound_ratio": bound_ratio, "min_imag": min_imag,
                "transfer_log10_condition": condition}

    def assert_stable(self, G_ii: torch.Tensor, v: torch.Tensor | None = None, epsilon: float = 1.0,
                      k: torch.Tensor | None = None, where: str = "BK mixer") -> dict[str, Any]:
        """:meth:`check_stability`, raising :class:`NumericalInstabilityError` when unstable."""
        result = self.check_stability(G_ii, v, epsilon, k)
        if not result["is_stable"]:
            raise NumericalInstabilityError(
                f"{where}: {'; '.join(result['warnings'])}. Train with callbacks.stability.StabilityMonitor to roll "
                "back and lower the learning rate instead of stopping")
        return result

    def check_mixer_stats(self, stats: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The same verdict from a ``BKMixer.stats()`` dict (what the model records each forward)."""
        if not stats:
            return {"is_stable": True, "warnings": [], "bound_ratio": float("nan"), "min_imag": float("nan"),
                    "transfer_log10_condition": float("nan")}
        max_g, bound = float(stats["max_abs_g"]), float(stats["bound"])
        cond = float(stats["transfer_condition"])
        ratio = max_g / bound
        warnings = []
        stable = math.isfinite(ratio) and ratio <= 1 + self.stability_threshold
        if not math.isfinite(ratio):
            warnings.append("g has NaN/Inf entries")
        elif not stable:
            warnings.append(f"max|g| = {max_g:.4g} exceeds the bound 1/eta = {bound:.4g}")
        if not math.isfinite(cond) or cond > self.condition_warning:
            warnings.append(f"transfer matrices are ill-conditioned: log10 condition {cond:.3g}")
        return {"is_stable": stable, "warnings": warnings, "bound_ratio": ratio, "min_imag": float("nan"),
                "transfer_log10_condition": cond}
