"""BKStabilityMonitor: scale-free checks that call a healthy long sequence stable (where a determinant
under/overflows) and a blown-up one unstable; the errors' recovery path is the project's callbacks."""

import pytest
import torch

from models.layers.bk_mixer import resolvent_diagonal
from models.lm.phase1 import BKStabilityMonitor, NumericalInstabilityError, VRAMExhaustedError


def _coefficients(n: int, channels: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(1, n, channels, generator=g)
    k = torch.nn.functional.softplus(torch.randn(1, n, channels, generator=g))
    return a, k


def test_healthy_long_sequence_is_stable_where_a_determinant_underflows():
    eta = 0.5
    a, k = _coefficients(20000)
    d = a.to(torch.complex64) - 1j * eta
    g = resolvent_diagonal(d, k)
    # the public check's quantity: det(H - z) of the whole sequence = product of the pivots 1 / g_t
    det = torch.prod(1 / g[0, :, 0])
    assert det.abs() == 0 or not torch.isfinite(det.abs())  # under/overflows in float32: useless as a test
    result = BKStabilityMonitor().check_stability(G_ii=g, v=a, epsilon=eta, k=k)
    assert result["is_stable"], result["warnings"]
    assert result["bound_ratio"] <= 1.0 and result["min_imag"] >= 0
    assert result["transfer_log10_condition"] < 6


def test_blown_up_sequences_are_unstable():
    eta = 0.5
    a, k = _coefficients(500)
    monitor = BKStabilityMonitor()
    gain = (a - 1j * eta + 1.5j).to(torch.complex64)  # Im(a - z) > 0: a gain, the bound does not hold
    g = resolvent_diagonal(gain, k, method="sequential")
    result = monitor.check_stability(G_ii=g, epsilon=eta)  # g alone gives it away: Im g < 0
    assert not result["is_stable"] and any("half-plane" in w for w in result["warnings"])
    result = monitor.check_stability(G_ii=g, v=a.to(torch.complex64) + 1.5j, epsilon=eta)
    assert not result["is_stable"] and any("Im v" in w for w in result["warnings"])
    nan = torch.full((1, 5, 2), float("nan"), dtype=torch.complex64)
    assert not monitor.check_stability(G_ii=nan, epsilon=eta)["is_stable"]
    with pytest.raises(NumericalInstabilityError, match="StabilityMonitor"):
        monitor.assert_stable(nan, epsilon=eta)


def test_tiny_couplings_warn_about_conditioning_without_failing():
    eta = 1.0
    a, k = _coefficients(64)
    k = k * 1e-9
    g = resolvent_diagonal(a.to(torch.complex64) - 1j * eta, k)
    result = BKStabilityMonitor().check_stability(G_ii=g, v=a, epsilon=eta, k=k)
    assert result["is_stable"] and any("ill-conditioned" in w for w in result["warnings"])


def test_errors_are_the_kinds_the_recovery_callbacks_handle():
    from callbacks.oom_recovery import is_out_of_memory

    assert is_out_of_memory(VRAMExhaustedError("x"))  # an OOM to OOMRecovery
    assert issubclass(NumericalInstabilityError, RuntimeError)
