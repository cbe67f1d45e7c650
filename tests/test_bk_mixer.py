"""Causal resolvent (BK) mixer: exactness against dense inverses, parallel == sequential, exact gradients,
causality, the 1/eta bound, streaming == full, real token mixing and scale-free stability statistics.

Each test names the defect of the public implementation it guards against where there is one.
"""

import pytest
import torch

from models.layers.bk_mixer import BKMixer, resolvent_diagonal, transfer_log10_condition

CDOUBLE = torch.complex128


def _coefficients(shape, eta=1.0, scale=2.0, k_max=2.0, dtype=torch.float64, seed=0):
    """Random d with Im d <= -eta (some extra decay) and couplings k in (0.05, k_max)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    decay = torch.rand(shape, generator=gen, dtype=torch.float64)
    k = 0.05 + torch.rand(shape, generator=gen, dtype=torch.float64) * (k_max - 0.05)
    d = torch.complex(a, -(eta + decay))
    return d.to(torch.complex64 if dtype == torch.float32 else CDOUBLE), k.to(dtype)


def _g0(shape, seed=1, dtype=CDOUBLE):
    """A carried state in the upper half-plane (where every g lives), |g0| <= 1."""
    gen = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(shape, generator=gen) * 0.3, torch.rand(shape, generator=gen) * 0.5).to(dtype)


def _dense_leading_diagonal(d: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[(H_{0..t} - z)^{-1}]_{tt} for every t by torch.linalg.inv; H has H[t-1, t] = k_t, H[t, t-1] = 1."""
    n, channels = d.shape
    out = torch.empty_like(d)
    for c in range(channels):
        h = torch.diag(d[:, c]) + torch.diag(k[1:, c].to(d.dtype), 1) + torch.diag(torch.ones(n - 1, dtype=d.dtype), -1)
        for t in range(n):
            out[t, c] = torch.linalg.inv(h[: t + 1, : t + 1])[t, t]
    return out


@pytest.mark.parametrize("method", ["sequential", "parallel"])
def test_equals_dense_inverse_of_the_leading_block(method):
    """g_t is the last diagonal entry of the leading block's inverse, with k_t on the bond (t-1, t).
    The public code's coupling index was off by one; k varies per token here, so a shifted index fails."""
    d, k = _coefficients((9, 3))
    expected = _dense_leading_diagonal(d, k)
    g = resolvent_diagonal(d, k, method=method, chunk_size=4)
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(resolvent_diagonal(d, k.roll(1, 0), method=method, chunk_size=4), expected)
    # g0 acts as one earlier token whose own diagonal entry is g0 (d_{-1} = 1 / g0), coupled by k_0
    g0 = _g0(3)
    with_token = _dense_leading_diagonal(torch.cat([1 / g0[None], d]), torch.cat([k[:1], k]))[1:]
    torch.testing.assert_close(
        resolvent_diagonal(d, k, g0, method=method, chunk_size=4), with_token, rtol=1e-12, atol=1e-12
    )


def test_full_inverse_diagonal_is_not_the_causal_feature():
    """The public code used the diagonal of the *full* inverse, which depends on later tokens: it matches g only
    at the last token and changes when a future token changes; g does not."""
    d, k = _coefficients((8, 1))
    full = torch.linalg.inv(
        torch.diag(d[:, 0]) + torch.diag(k[1:, 0].to(d.dtype), 1) + torch.diag(torch.ones(7, dtype=d.dtype), -1)
    ).diagonal()
    g = resolvent_diagonal(d, k)[:, 0]
    torch.testing.assert_close(g[-1], full[-1], rtol=1e-12, atol=1e-12)
    assert ((g[:-1] - full[:-1]).abs() > 1e-6).all()


@pytest.mark.parametrize("n", [1, 15, 17, 4097])
@pytest.mark.parametrize("with_g0", [False, True])
def test_parallel_equals_sequential(n, with_g0):
    """Chunk 16: one token, chunk - 1, chunk + 1 (a padded second chunk) and many chunks (the public scan
    mis-indexed). The carried g of each chunk comes from the renormalised transfer products."""
    d, k = _coefficients((2, n, 3))
    g0 = _g0((2, 3)) if with_g0 else None
    expected = resolvent_diagonal(d, k, g0, method="sequential")
    torch.testing.assert_close(resolvent_diagonal(d, k, g0, chunk_size=16), expected, rtol=1e-12, atol=1e-12)


def test_parallel_equals_sequential_default_chunk_and_float32():
    d, k = _coefficients((4097, 2))
    expected = resolvent_diagonal(d, k, method="sequential")
    torch.testing.assert_close(resolvent_diagonal(d, k), expected, rtol=1e-12, atol=1e-12)
    g32 = resolvent_diagonal(d.to(torch.complex64), k.float())
    assert g32.dtype == torch.complex64
    torch.testing.assert_close(g32.to(CDOUBLE), expected, rtol=0, atol=1e-4)


def test_non_contiguous_inputs_and_leading_dims():
    d, k = _coefficients((3, 2, 4, 21))  # channels first, then transposed to (..., N, C)
    g0 = _g0((2, 3, 4))
    expected = resolvent_diagonal(d.permute(1, 0, 3, 2).contiguous(), k.permute(1, 0, 3, 2).contiguous(), g0)
    g = resolvent_diagonal(d.permute(1, 0, 3, 2), k.permute(1, 0, 3, 2), g0, chunk_size=8)
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)
    assert g.shape == (2, 3, 21, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_long_sequence_with_large_diagonal_stays_finite(dtype):
    """|a| ~ 1e4 and k up to 1e4 over 4097 tokens: a raw transfer product overflows (shown below), the
    renormalised scan must not (the public parallel scan overflowed)."""
    d, k = _coefficients((4097, 4), scale=1e4, k_max=1e4, dtype=dtype)
    assert torch.isinf(d[:, 0].abs().prod())  # what an unnormalised product of M_t would face
    g = resolvent_diagonal(d, k)
    assert torch.isfinite(torch.view_as_real(g)).all()
    assert (g.abs() <= 1.0 + 1e-6).all()
    expected = resolvent_diagonal(d.to(CDOUBLE), k.double(), method="sequential")
    scale = 1e-12 if dtype == torch.float64 else 1e-5  # |g| ranges over orders of magnitude here: compare relative
    assert ((g.to(CDOUBLE) - expected).abs() <= scale * expected.abs() + 1e-30).all()


@pytest.mark.parametrize("n,chunk", [(1, 4), (7, 3), (9, 3), (6, 6)])
def test_gradcheck_parallel(n, chunk):
    """The custom backward (reverse linear scan) is the exact gradient (the public backward was a heuristic)."""
    d, k = _coefficients((2, n, 2))
    d, k, g0 = d.requires_grad_(), k.requires_grad_(), _g0((2, 2)).requires_grad_()
    assert torch.autograd.gradcheck(lambda d, k, g0: resolvent_diagonal(d, k, g0, chunk_size=chunk), (d, k, g0))
    assert torch.autograd.gradcheck(lambda d, k: resolvent_diagonal(d, k, chunk_size=chunk), (d, k))


def test_gradcheck_sequential():
    d, k = _coefficients((5, 2))
    d, k, g0 = d.requires_grad_(), k.requires_grad_(), _g0(2).requires_grad_()
    assert torch.autograd.gradcheck(lambda d, k, g0: resolvent_diagonal(d, k, g0, method="sequential"), (d, k, g0))


def test_parallel_gradients_equal_autograd_through_sequential():
    d, k = _coefficients((2, 70, 3))
    cot = _g0((2, 70, 3), seed=5)
    grads = []
    for method in ("sequential", "parallel"):
        dd, kk, g0 = d.clone().requires_grad_(), k.clone().requires_grad_(), _g0((2, 3)).requires_grad_()
        g = resolvent_diagonal(dd, kk, g0, method=method, chunk_size=16)
        torch.autograd.backward(g, cot)
        grads.append((dd.grad, kk.grad, g0.grad))
    for seq, par in zip(*grads):
        torch.testing.assert_close(par, seq, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["sequential", "parallel"])
def test_future_tokens_leave_earlier_outputs_bit_identical(method):
    d, k = _coefficients((2, 37, 3))
    g0 = _g0((2, 3))
    cut = 13  # mid-chunk with chunk 8; the last chunk is padded
    d2, k2 = d.clone(), k.clone()
    d2[:, cut:] = d2[:, cut:] * 3 - 5j
    k2[:, cut:] = k2[:, cut:] * 7
    g = resolvent_diagonal(d, k, g0, method=method, chunk_size=8)
    g2 = resolvent_diagonal(d2, k2, g0, method=method, chunk_size=8)
    assert torch.equal(g[:, :cut], g2[:, :cut])
    assert not torch.equal(g[:, cut:], g2[:, cut:])


@pytest.mark.parametrize("method", ["sequential", "parallel"])
def test_module_is_causal(method):
    torch.manual_seed(0)
    mixer = BKMixer(8, chunk_size=8, method=method).double()
    x = torch.randn(2, 37, 8, dtype=torch.float64)
    decay = torch.rand(2, 37, 8, dtype=torch.float64)
    x2, decay2 = x.clone(), decay.clone()
    x2[:, 20:] += torch.randn(2, 17, 8, dtype=torch.float64)
    decay2[:, 20:] += 1
    y, y2 = mixer(x, decay=decay), mixer(x2, decay=decay2)
    assert torch.equal(y[:, :20], y2[:, :20])
    assert not torch.equal(y[:, 20:], y2[:, 20:])


def test_bound_holds():
    """|g| <= 1/eta whenever Im d <= -eta and k >= 0, however large k, the decay or |Re d| are."""
    eta = 0.5
    d, k = _coefficients((3, 300, 4), eta=eta, scale=3.0, k_max=50.0)
    g0 = _g0((3, 4)) * 2  # |g0| <= 1/eta, upper half-plane
    for method in ("sequential", "parallel"):
        g = resolvent_diagonal(d, k, g0, method=method, chunk_size=16)
        assert (g.abs() <= (1 / eta) * (1 + 1e-12)).all()
        assert (g.imag >= 0).all()
    # a purely decaying chain (Re d = 0, k -> 0) attains the bound
    g = resolvent_diagonal(torch.full((5, 1), -1j * eta, dtype=CDOUBLE), torch.zeros(5, 1, dtype=torch.float64))
    torch.testing.assert_close(g.abs(), torch.full((5, 1), 1 / eta, dtype=torch.float64))


def test_module_bound_with_decay_and_decay_acts():
    torch.manual_seed(0)
    mixer = BKMixer(8, eta=0.25, chunk_size=8).double()
    x = torch.randn(2, 40, 8, dtype=torch.float64) * 5
    decay = torch.rand(2, 40, 8, dtype=torch.float64) * 10
    d, k, _ = mixer.coefficients(x, decay)
    assert (d.imag <= -0.25).all() and (k >= 0).all()
    assert (resolvent_diagonal(d, k).abs() <= 4 * (1 + 1e-12)).all()
    y = mixer(x, decay=decay)
    stats = mixer.stats()
    # the recorded bound is 1 / (eta + Gamma_min) (issue 21), below the decay-free 1 / eta
    torch.testing.assert_close(stats["bound"], 1 / (0.25 + decay.min()))
    assert stats["max_abs_g"] <= stats["bound"] < 4 and bool(stats["stable"])
    assert (resolvent_diagonal(d, k).abs() * (0.25 + decay) <= 1 + 1e-12).all()  # per token 1 / (eta + Gamma_t)
    assert not torch.allclose(y, mixer(x))
    mixer(x)
    assert mixer.stats()["bound"] == 4


@pytest.mark.parametrize("method", ["sequential", "parallel"])
def test_token_by_token_decoding_equals_full_forward(method):
    torch.manual_seed(0)
    mixer = BKMixer(6, chunk_size=8, method=method).double()
    x = torch.randn(2, 23, 6, dtype=torch.float64)
    decay = torch.rand(2, 23, 6, dtype=torch.float64)
    full, last = mixer(x, decay=decay, return_state=True)
    state, steps = None, []
    for t in range(23):
        y, state = mixer(x[:, t : t + 1], state=state, decay=decay[:, t : t + 1], return_state=True)
        steps.append(y)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, last, rtol=1e-12, atol=1e-12)


def test_state_carried_across_two_halves_equals_whole():
    torch.manual_seed(0)
    mixer = BKMixer(6, chunk_size=8).double()
    x = torch.randn(2, 41, 6, dtype=torch.float64)
    full = mixer(x)
    first, state = mixer(x[:, :19], return_state=True)
    second = mixer(x[:, 19:], state=state)
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-12, atol=1e-12)
    d, k = _coefficients((41, 3))
    g = resolvent_diagonal(d, k, chunk_size=8)
    g1 = resolvent_diagonal(d[:19], k[:19], chunk_size=8)
    torch.testing.assert_close(
        torch.cat([g1, resolvent_diagonal(d[19:], k[19:], g1[-1], chunk_size=8)]), g, rtol=1e-12, atol=1e-12
    )


def test_module_gradcheck_and_gradients_equal_sequential():
    torch.manual_seed(0)
    mixer = BKMixer(3, chunk_size=2).double()
    x = torch.randn(1, 5, 3, dtype=torch.float64, requires_grad=True)
    decay = torch.rand(1, 5, 3, dtype=torch.float64, requires_grad=True)
    state = _g0((1, 3)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, decay, state: mixer(x, state=state, decay=decay), (x, decay, state))

    x = torch.randn(2, 30, 3, dtype=torch.float64)
    grads = []
    for method in ("sequential", "parallel"):
        mixer.method = method
        mixer.zero_grad()
        mixer(x).square().sum().backward()
        grads.append([p.grad.clone() for p in mixer.parameters()])
    for seq, par in zip(*grads):
        torch.testing.assert_close(par, seq, rtol=1e-10, atol=1e-12)


def test_tokens_mix_through_input_dependent_couplings():
    """The public code's couplings were constant buffers: no mixing. Here k is a function of the token,
    gradients reach the coupling projection, and an earlier token changes later outputs."""
    torch.manual_seed(0)
    mixer = BKMixer(8, chunk_size=4)
    assert list(mixer.buffers()) == []
    x = torch.randn(1, 12, 8)
    _, k, _ = mixer.coefficients(x)
    _, k2, _ = mixer.coefficients(x + 1)
    assert not torch.allclose(k, k2) and not torch.allclose(k[:, 0], k[:, 1])
    x2 = x.clone()
    x2[:, 0] += 1
    y, y2 = mixer(x), mixer(x2)
    assert ((y[:, 1:] - y2[:, 1:]).abs().amax(-1) > 1e-6).all()
    y[:, -1].sum().backward()  # the last output sees earlier tokens only through g, i.e. through a and k
    coupling_rows = mixer.in_proj.weight.grad[8:16]
    assert coupling_rows.abs().amax() > 0 and mixer.in_proj.bias.grad[8:16].abs().amax() > 0


def test_zero_init_output_starts_as_identity_residual():
    mixer = BKMixer(8, zero_init_output=True)
    x = torch.randn(2, 10, 8)
    y = mixer(x)
    assert torch.equal(y, torch.zeros_like(y))
    y.square().sum().backward()
    assert mixer.out_proj.weight.grad is not None


def test_float32_module():
    mixer = BKMixer(8, chunk_size=4)
    y, state = mixer(torch.randn(2, 9, 8), return_state=True)
    assert y.dtype == torch.float32 and state.dtype == torch.complex64 and state.shape == (2, 8)


def test_transfer_condition_matches_singular_values():
    d, k = _coefficients((50,), scale=5.0, k_max=5.0)
    m = torch.zeros(50, 2, 2, dtype=CDOUBLE)
    m[:, 0, 0], m[:, 0, 1], m[:, 1, 0] = d, -k.to(CDOUBLE), 1
    s = torch.linalg.svdvals(m)
    torch.testing.assert_close(transfer_log10_condition(d, k), (s[:, 0] / s[:, 1]).log10(), rtol=1e-10, atol=1e-10)


def test_stats_report_stable_on_a_healthy_long_sequence():
    """The public stability 'determinant' (a product of per-token determinants) underflows to 0 on long
    sequences and so always reported unstable. These statistics are per token / log-scale."""
    torch.manual_seed(0)
    mixer = BKMixer(16)
    x = torch.randn(1, 4097, 16)
    mixer(x)
    stats = mixer.stats()
    assert set(stats) == {"max_abs_g", "bound", "transfer_condition", "stable"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad for v in stats.values())
    assert bool(stats["stable"]) and torch.isfinite(stats["transfer_condition"])
    assert 0 < stats["max_abs_g"] <= stats["bound"]
    mixer(x[:, :50].clone().index_fill_(1, torch.tensor([7]), float("nan")))
    assert not bool(mixer.stats()["stable"])  # and the flag does fail when g is broken
    _, k, _ = mixer.coefficients(x)
    assert k[0, :, 0].prod() == 0  # |det M_t| = k_t: their product underflows on this very input
    # a nearly decoupled token: the condition itself (~1e41) overflows float32, its log10 does not
    d32, k32 = torch.tensor([100.0 - 1j]), torch.tensor([1e-37])
    torch.testing.assert_close(
        transfer_log10_condition(d32, k32).double(),
        transfer_log10_condition(d32.to(CDOUBLE), k32.double()),
        rtol=1e-6,
        atol=0,
    )


def test_bad_inputs_raise():
    d, k = _coefficients((4, 2))
    with pytest.raises(TypeError):
        resolvent_diagonal(d.real, k)
    with pytest.raises(ValueError):
        resolvent_diagonal(d, k.float())
    with pytest.raises(ValueError):
        resolvent_diagonal(d, k, _g0(3))
    with pytest.raises(ValueError):
        resolvent_diagonal(d, k, method="scan")
    with pytest.raises(ValueError):
        BKMixer(4, eta=0.0)
