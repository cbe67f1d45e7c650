"""Dissipative Hebbian fast weights: chunked == sequential, gradients through time, causality, document resets,
carried state, SNR filter, resonance, Lyapunov bound, and one test per defect of the public code."""

import math

import pytest
import torch

from models.layers.fast_weights import (
    DissipativeHebbianMemory,
    FastWeightState,
    MemoryBoundaryRule,
    fixed_orthonormal_basis,
    hebbian_scan_chunked,
    hebbian_scan_sequential,
    lyapunov_bound,
    lyapunov_stable_ratio,
    resonance,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors: one thread is fastest and fair to the other jobs on the machine."""


def _inputs(b=2, h=3, n=37, dk=4, dv=5, seed=0, dtype=F64, decay=0.3):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, n, dk, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(b, h, n, dv, generator=g, dtype=dtype)
    log_decay = -torch.rand(b, h, n, generator=g, dtype=dtype) * decay
    return q, k, v, log_decay


def _resets(b=2, n=37):
    reset = torch.zeros(b, n, dtype=torch.bool)
    reset[0, 10] = True
    reset[1, 0] = True
    reset[1, 22] = reset[1, 23] = True  # a one-token document
    return reset


def _state(b, h, dk, dv, position, seed=1):
    g = torch.Generator().manual_seed(seed)
    return FastWeightState(torch.randn(b, h, dk, dv, generator=g, dtype=F64), torch.as_tensor(position),
                           1 + torch.rand(b, h, generator=g, dtype=F64), 1 + torch.rand(b, h, generator=g, dtype=F64),
                           torch.randn(b, h, dk, dv, generator=g, dtype=F64), -torch.rand(b, h, generator=g, dtype=F64))


def _rule(dk, threshold=2.0, damping=0.5, **kw):
    return MemoryBoundaryRule(fixed_orthonormal_basis(dk, 0), threshold, resonance_threshold=1.5,
                              resonance_damping=damping, **kw)


def _assert_states_close(a: FastWeightState, b: FastWeightState, tol=1e-10):
    assert torch.equal(a.position, b.position)
    for x, y in zip(a, b):
        assert (x.double() - y.double()).abs().max() <= tol


# ----------------------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("with_reset", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 8, 64])
def test_chunked_equals_sequential_float64(with_reset, chunk):
    q, k, v, ld = _inputs()
    eta = 0.5 + torch.rand(2, 3, 37, dtype=F64)  # per-token eta
    reset = _resets() if with_reset else None
    init = torch.randn(2, 3, 4, 5, dtype=F64)
    o1, s1 = hebbian_scan_sequential(q, k, v, ld, eta, init, reset)
    o2, s2 = hebbian_scan_chunked(q, k, v, ld, eta, init, reset, chunk_size=chunk)
    assert (o1 - o2).abs().max() <= 1e-10
    _assert_states_close(s1, s2)
    assert s2.position.tolist() == ([27, 14] if with_reset else [37, 37])


@pytest.mark.parametrize("with_reset", [False, True])
@pytest.mark.parametrize("chunk,position", [(8, [0, 0]), (3, [0, 0]), (5, [3, 9]), (8, [5, 1])])
def test_chunked_equals_sequential_with_filter_and_damping(with_reset, chunk, position):
    """Boundaries every 8 document tokens; chunks of 3/5 and carried positions put them inside chunks."""
    q, k, v, ld = _inputs(decay=0.05)
    reset = _resets() if with_reset else None
    init = _state(2, 3, 4, 5, position)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, ld)]
    r1, r2 = _rule(4), _rule(4)
    weight = torch.randn(2, 3, 37, 5, dtype=F64)
    o1, s1 = hebbian_scan_sequential(*leaves, 0.7, init, reset, boundary=r1, period=8)
    g1 = torch.autograd.grad((o1 * weight).sum() + s1.memory.sum(), leaves)
    o2, s2 = hebbian_scan_chunked(*leaves, 0.7, init, reset, chunk, boundary=r2, period=8)
    g2 = torch.autograd.grad((o2 * weight).sum() + s2.memory.sum(), leaves)
    assert (o1 - o2).abs().max() <= 1e-10
    _assert_states_close(s1, s2)
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() <= 1e-10
    # the rule really acted: both sides of the threshold and a damped mode occurred
    snr = torch.cat([r["snr"][r["live"]] for r in r2.records])
    assert (snr < 2.0).any() and (snr > 2.0).any()


def test_bfloat16_inputs_float32_state():
    q, k, v, ld = (t.to(torch.bfloat16) for t in _inputs(n=100, decay=0.05))
    ref, _ = hebbian_scan_sequential(*(t.double() for t in (q, k, v, ld)), 1.0, reset=_resets(n=100))
    out, state = hebbian_scan_chunked(q, k, v, ld, 1.0, reset=_resets(n=100), chunk_size=16)
    assert out.dtype == torch.bfloat16 and state.memory.dtype == torch.float32
    assert (out.double() - ref).norm() / ref.norm() <= 1e-2
    rule_out, _ = hebbian_scan_chunked(q, k, v, ld, 1.0, chunk_size=16, boundary=_rule(4), period=16)
    rule_ref, _ = hebbian_scan_sequential(*(t.double() for t in (q, k, v, ld)), 1.0, boundary=_rule(4), period=16)
    assert (rule_out.double() - rule_ref).norm() / rule_ref.norm() <= 1e-2


def test_gradcheck_chunked_and_sequential():
    q, k, v, ld = (t.requires_grad_() for t in _inputs(b=2, h=1, n=9, dk=2, dv=2, decay=0.5))
    eta = (0.5 + torch.rand(2, 1, 9, dtype=F64)).requires_grad_()
    init = torch.randn(2, 1, 2, 2, dtype=F64, requires_grad=True)
    reset = torch.zeros(2, 9, dtype=torch.bool)
    reset[1, 4] = True

    def chunked(*a):
        o, s = hebbian_scan_chunked(*a[:5], a[5], reset, chunk_size=4)
        return o, s.memory

    def sequential(*a):
        o, s = hebbian_scan_sequential(*a[:5], a[5], reset)
        return o, s.memory

    args = (q, k, v, ld, eta, init)
    assert torch.autograd.gradcheck(chunked, args)
    assert torch.autograd.gradcheck(sequential, args)


def test_gradcheck_with_boundary_rule():
    """Saturated multipliers (piecewise constant in the inputs) and damping: the map is smooth, so the analytic
    gradient must match finite differences, including through damping and a boundary inside a chunk."""
    q, k, v, ld = (t.requires_grad_() for t in _inputs(b=2, h=2, n=10, dk=3, dv=2, decay=0.2))
    init = _state(2, 2, 3, 2, [2, 0])

    def run(*a):
        rule = MemoryBoundaryRule(fixed_orthonormal_basis(3, 0), 2.0, gamma_bounds=(2.0, 2.0), eta_bounds=(1.5, 1.5),
                                  resonance_threshold=1.2, resonance_damping=0.3)
        o, s = hebbian_scan_chunked(*a, 0.8, init, chunk_size=3, boundary=rule, period=4)
        return o, s.memory

    assert torch.autograd.gradcheck(run, (q, k, v, ld))


# ----------------------------------------------------------------------------------------- causality, documents


def test_causality_future_tokens_do_not_change_the_past():
    q, k, v, ld = _inputs(n=30, decay=0.05)
    reset = _resets(n=30)
    for t in (0, 7, 8, 13, 29):
        q2, k2, v2, ld2 = (x.clone() for x in (q, k, v, ld))
        for x in (q2, k2, v2):
            x[:, :, t + 1:] = torch.randn_like(x[:, :, t + 1:]) * 10
        ld2[..., t + 1:] = -5 * torch.rand_like(ld2[..., t + 1:])
        reset2 = reset.clone()
        reset2[:, t + 1:] = ~reset2[:, t + 1:]
        for scan, kw in ((hebbian_scan_chunked, {"chunk_size": 8}), (hebbian_scan_sequential, {})):
            a, _ = scan(q, k, v, ld, 1.0, None, reset, boundary=_rule(4), period=8, **kw)
            b, _ = scan(q2, k2, v2, ld2, 1.0, None, reset2, boundary=_rule(4), period=8, **kw)
            assert torch.equal(a[:, :, : t + 1], b[:, :, : t + 1])


def _module(**kw):
    torch.manual_seed(0)
    kw = {"chunk_size": 8, "resonance_damping": 0.5, "resonance_threshold": 1.5, **kw}
    m = DissipativeHebbianMemory(12, 3, 4, **kw).double()
    with torch.no_grad():
        m.gamma_proj.weight.normal_(0, 0.3)  # input-dependent decay
    return m


def test_module_chunked_equals_sequential_with_gradients():
    """The layer as used (filter, damping, resets, carried state): outputs, state and every parameter gradient."""
    m = _module()
    x = torch.randn(2, 30, 12, dtype=F64)
    reset = _resets(n=30)
    _, state = m(torch.randn(2, 5, 12, dtype=F64), return_state=True)  # a carried position of 5: mid-chunk
    state = FastWeightState(*(t.detach() for t in state))  # truncated BPTT: the caller cuts the history
    results = []
    for scan in ("chunked", "sequential"):
        m.zero_grad()
        y, st = m(x, state, reset, return_state=True, scan=scan)
        (y.square().sum() + st.memory.sum()).backward()
        results.append((y, st, [p.grad.clone() for p in m.parameters()]))
    (y1, s1, g1), (y2, s2, g2) = results
    assert (y1 - y2).abs().max() <= 1e-10
    _assert_states_close(s1, s2)
    for a, b in zip(g1, g2):
        assert (a - b).abs().max() <= 1e-10


def test_module_causality():
    m = _module()
    x = torch.randn(2, 30, 12, dtype=F64)
    x2 = x.clone()
    x2[:, 17:] = torch.randn_like(x2[:, 17:])
    assert torch.equal(m(x)[:, :17], m(x2)[:, :17])


def test_variable_length_batch_and_packed_documents_equal_separate_sequences():
    m = _module()
    lengths = [29, 11, 20]
    docs = [torch.randn(1, n, 12, dtype=F64) for n in lengths]
    alone = [m(d, return_state=True) for d in docs]
    padded = torch.zeros(3, max(lengths), 12, dtype=F64)
    for i, d in enumerate(docs):
        padded[i, : lengths[i]] = d[0]
    out = m(padded)
    for i, (y, _) in enumerate(alone):
        assert (out[i, : lengths[i]] - y[0]).abs().max() <= 1e-10
    packed = torch.cat(docs, 1)
    reset = torch.zeros(1, packed.shape[1], dtype=torch.bool)
    reset[0, [0, 29, 40]] = True
    for scan in ("chunked", "sequential"):
        y, state = m(packed, reset=reset, return_state=True, scan=scan)
        assert (y - torch.cat([a[0] for a in alone], 1)).abs().max() <= 1e-10
        _assert_states_close(state, alone[-1][1])


def test_generation_with_carried_state_equals_parallel_forward():
    m = _module()
    x = torch.randn(2, 27, 12, dtype=F64)
    full, full_state = m(x, return_state=True)
    state, steps = None, []
    for t in range(27):
        y, state = m(x[:, t: t + 1], state, return_state=True)
        steps.append(y)
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-10
    _assert_states_close(state, full_state)
    head, state = m(x[:, :11], return_state=True)  # prefill of odd length, then one chunked call
    tail, state = m(x[:, 11:], state, return_state=True)
    assert (torch.cat([head, tail], 1) - full).abs().max() <= 1e-10
    _assert_states_close(state, full_state)


# ----------------------------------------------------------------------------------------- defects of the public code


def test_gamma_enters_the_operator_and_base_decay_shortens_memory():
    """Token 0's contribution to the head output at i is eta exp(-delta sum_{t=1..i} Gamma_t) (q_i . k_0) v_0;
    raising base_decay by d multiplies it by exp(-d delta i)."""
    h, dim, n, delta = 2, 3, 12, 0.5

    def make(base):
        torch.manual_seed(0)
        m = DissipativeHebbianMemory(h * dim, h, dim, base_decay=base, snr_threshold=None, delta=delta,
                                     hebbian_eta=0.7).double()
        with torch.no_grad():
            m.out_proj.weight.copy_(torch.eye(h * dim))  # y = head outputs side by side
            m.gamma_proj.weight.normal_(0, 0.5)
        return m

    x = torch.randn(1, n, h * dim, dtype=F64)
    x2 = x.clone()
    x2[:, 0] = torch.randn(h * dim)
    m = make(0.01)
    diff = (m(x) - m(x2)).view(n, h, dim)
    gamma = m.gamma(x)[0]  # (n, h)
    dq = m.q_proj(x)[0].view(n, h, dim) * dim**-0.5
    kv = []
    for inp in (x, x2):
        kk = torch.nn.functional.normalize(m.k_proj(inp)[0, 0].view(h, dim), dim=-1)
        kv.append(kk[:, :, None] * m.v_proj(inp)[0, 0].view(h, dim)[:, None, :])
    dk = kv[0] - kv[1]  # (h, dim, dim): difference of the first writes
    for i in range(1, n):  # q_0 differs between x and x2
        decay = torch.exp(-delta * gamma[1: i + 1].sum(0))  # (h,)
        expected = m.eta[:, None] * decay[:, None] * torch.einsum("hk,hkv->hv", dq[i], dk)  # eta: 0.7 in float32
        assert (diff[i] - expected).abs().max() <= 1e-12
    raised = make(0.01 + 0.2)
    diff2 = (raised(x) - raised(x2)).view(n, h, dim)
    for i in range(1, n):
        assert (diff2[i] - math.exp(-0.2 * delta * i) * diff[i]).abs().max() <= 1e-12
    assert diff[n - 1].abs().max() > 1e-3 and diff2[n - 1].abs().max() < diff[n - 1].abs().max()


@pytest.mark.parametrize("scan", ["chunked", "sequential"])
def test_gradient_flows_through_time(scan):
    """The loss at the last token reaches the first token's k and v and the Gamma projection (no detach)."""
    q, k, v, ld = (t.requires_grad_() for t in _inputs(n=20, decay=0.05))
    fn = hebbian_scan_chunked if scan == "chunked" else hebbian_scan_sequential
    kw = {"chunk_size": 8} if scan == "chunked" else {"period": 8}
    o, _ = fn(q, k, v, ld, 1.0, boundary=_rule(4), **kw)
    o[:, :, -1].sum().backward()
    assert (k.grad[:, :, 0].abs() > 0).all() and (v.grad[:, :, 0].abs() > 0).all()
    assert (ld.grad[:, :, 1:].abs() > 0).all()
    m = _module()
    x = torch.randn(2, 20, 12, dtype=F64, requires_grad=True)
    m(x, scan=scan)[:, -1].sum().backward()
    assert m.gamma_proj.weight.grad.abs().sum() > 0 and m.gamma_proj.bias.grad.abs().min() > 0
    assert (x.grad[:, 0].abs().sum(-1) > 0).all()


def test_snr_is_unbounded_both_ways():
    rule = _rule(3)
    old = torch.randn(1, 1, 3, 2, dtype=F64)
    new = torch.randn(1, 1, 3, 2, dtype=F64)
    for c in (1e-4, 1.0, 1e4):
        st = FastWeightState(old + c * new, torch.zeros(1, dtype=torch.long), torch.ones(1, 1, dtype=F64),
                             torch.ones(1, 1, dtype=F64), old, torch.zeros(1, 1, dtype=F64))
        snr, live = rule.snr(st)
        assert live.all()
        assert torch.allclose(snr, c**2 * new.square().sum() / old.square().sum(), rtol=1e-10)


@pytest.mark.parametrize("side", ["gamma", "eta"])
def test_filter_changes_outputs_exactly_when_it_triggers(side):
    """Head 0 keeps a long memory (low SNR), head 1 forgets fast (high SNR). Per (sequence, head) and chunk the
    output equals the unfiltered one iff no boundary so far triggered the enabled side of the filter."""
    q, k, v, _ = _inputs(b=2, h=2, n=40, dk=3, dv=3, seed=3)
    ld = torch.empty(2, 2, 40, dtype=F64)
    ld[:, 0], ld[:, 1] = -0.002, -0.6
    kw = {"gamma_bounds": (1.0, 4.0), "eta_bounds": (1.0, 1.0)} if side == "gamma" else \
        {"gamma_bounds": (1.0, 1.0), "eta_bounds": (1.0, 3.0)}
    on = _rule(3, 2.0, 0.0, **kw)
    off = _rule(3, None, 0.0, **kw)
    o_on, _ = hebbian_scan_chunked(q, k, v, ld, 1.0, chunk_size=8, boundary=on)
    o_off, _ = hebbian_scan_chunked(q, k, v, ld, 1.0, chunk_size=8, boundary=off)
    snr = torch.stack([r["snr"] for r in on.records])  # boundary c sits before chunk c
    live = torch.stack([r["live"] for r in on.records])
    fired = live & ((snr < 2.0) if side == "gamma" else (snr > 2.0))
    seen = fired.cummax(0).values.int()  # (chunks, B, H)
    same = torch.stack([(o_on[:, :, 8 * c: 8 * c + 8] == o_off[:, :, 8 * c: 8 * c + 8]).all(-1).all(-1)
                        for c in range(5)])
    assert torch.equal(same, seen == 0)
    assert same.any() and (~same).any()
    assert (live & (snr < 2.0)).any() and (live & (snr > 2.0)).any()


def test_module_snr_falls_on_both_sides_with_default_init():
    m = DissipativeHebbianMemory(32, 4, 8, chunk_size=16)
    m(torch.randn(2, 96, 32))
    low = m.diagnostics()["snr_low_ratio"]
    assert 0 < low < 1


def test_forward_does_not_mutate_parameters_buffers_or_input_state():
    m = _module()
    x = torch.randn(2, 30, 12, dtype=F64)
    _, state = m(x, return_state=True)
    before = {k: t.clone() for k, t in m.state_dict(keep_vars=False).items()}
    basis = m.basis.clone()
    saved = [t.clone() for t in state]
    m(x, state, return_state=True)[0].sum().backward()
    m(x)
    for name, t in m.state_dict().items():
        assert torch.equal(t, before[name]), name
    assert torch.equal(m.basis, basis)
    assert all(torch.equal(a, b) for a, b in zip(state, saved))
    assert m.diagnostics()["snr_low_ratio"] > 0  # the filter did act in those forwards


def test_resonance_basis_is_orthonormal_seeded_and_shared():
    rng_before = torch.random.get_rng_state()
    q = fixed_orthonormal_basis(16, 3)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert (q.mT @ q - torch.eye(16, dtype=F64)).abs().max() <= 1e-12
    assert torch.equal(q, fixed_orthonormal_basis(16, 3))
    assert not torch.equal(q, fixed_orthonormal_basis(16, 4))
    torch.manual_seed(1)
    a = DissipativeHebbianMemory(8, 2, 16, num_basis_seed=3)
    torch.manual_seed(2)
    b = DissipativeHebbianMemory(8, 2, 16, num_basis_seed=3)
    assert torch.equal(a.basis, b.basis) and torch.equal(a.basis, q)


def test_resonance_counts_and_damping_shrinks_resonant_modes():
    basis = fixed_orthonormal_basis(6, 0)
    amp = torch.tensor([10.0, 0.1, 0.2, 7.0, 0.3, 0.1], dtype=F64)
    coeff = amp[:, None] * torch.nn.functional.normalize(torch.randn(6, 4, dtype=F64), dim=-1)
    memory = (basis @ coeff).expand(2, 3, 6, 4)
    res = resonance(memory, basis, threshold=1.5)
    energy = amp.square()
    assert torch.allclose(res["mode_energy"], energy.expand(2, 3, 6), rtol=1e-12)
    assert (res["num_resonant_modes"] == 2).all()
    assert torch.allclose(res["total_resonance_energy"], (energy[0] + energy[3]).expand(2, 3), rtol=1e-12)
    rule = MemoryBoundaryRule(basis, None, resonance_threshold=1.5, resonance_damping=0.75)
    state = FastWeightState(memory, torch.zeros(2, dtype=torch.long), torch.ones(2, 3, dtype=F64),
                            torch.ones(2, 3, dtype=F64), torch.zeros_like(memory), torch.zeros(2, 3, dtype=F64))
    damped, gamma_scale, eta_scale = rule(state, torch.ones(2, dtype=torch.bool))
    assert (gamma_scale == 1).all() and (eta_scale == 1).all()  # SNR filter off
    after = resonance(damped, basis, threshold=1.5)["mode_energy"]
    factor = torch.tensor([0.25, 1, 1, 0.25, 1, 1], dtype=F64)  # resonant modes keep 1 - 0.75 of their energy
    assert torch.allclose(after, (factor * energy).expand(2, 3, 6), rtol=1e-12)


def test_damping_is_used_inside_the_module():
    x = torch.randn(1, 40, 12, dtype=F64)
    damped, plain = _module(), _module(resonance_damping=0.0)
    y1, y2 = damped(x), plain(x)
    assert torch.equal(y1[:, :8], y2[:, :8]) and not torch.allclose(y1[:, 8:], y2[:, 8:])


def test_state_is_only_carried_when_passed():
    m = _module()
    x = torch.randn(2, 20, 12, dtype=F64)
    y1, state = m(x, return_state=True)
    y2 = m(x)
    assert torch.equal(y1, y2)
    y3 = m(x, state)
    assert not torch.allclose(y3, y1)


# ----------------------------------------------------------------------------------------- Lyapunov stability


def test_energy_never_grows_without_input():
    m = _module()
    _, state = m(torch.randn(2, 13, 12, dtype=F64), return_state=True)
    energies = [state.memory.square().sum((-2, -1))]
    zero = torch.zeros(2, 1, 12, dtype=F64)  # x = 0: k = v = 0, no writes
    for _ in range(30):  # crosses several boundaries (filter and damping act)
        _, state = m(zero, state, return_state=True)
        energies.append(state.memory.square().sum((-2, -1)))
    e = torch.stack(energies)
    assert (e[1:] <= e[:-1]).all() and (e[-1] < e[0]).all()


def test_lyapunov_bound_holds_and_is_tight():
    g = torch.Generator().manual_seed(0)
    b, h, n, gamma_min, delta = 2, 3, 200, 0.05, 0.5
    k = torch.randn(b, h, n, 4, generator=g, dtype=F64)
    v = torch.randn(b, h, n, 3, generator=g, dtype=F64)
    eta = torch.rand(b, h, n, generator=g, dtype=F64)
    ld = -delta * (gamma_min + torch.rand(b, h, n, generator=g, dtype=F64))
    ld[1] = -delta * gamma_min  # slowest decay with constant aligned writes: the bound is approached
    k[1], v[1], eta[1] = k[1, :, :1], v[1, :, :1], 1.0
    bound = lyapunov_bound(eta, k, v, gamma_min, delta)
    state, norms = None, []
    for t in range(n):
        _, state = hebbian_scan_chunked(k[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], ld[..., t:t + 1],
                                        eta[..., t:t + 1], state)
        norms.append(state.memory.norm(dim=(-2, -1)))
    norms = torch.stack(norms, -1)
    assert lyapunov_stable_ratio(norms, bound[..., None]) == 1
    assert (norms[1, :, -1] >= 0.99 * bound[1]).all()
    # a memory that starts above the bound violates it until it has decayed: the ratio counts exactly those steps
    start = 3 * bound[..., None, None] * torch.eye(4, 3, dtype=F64) / math.sqrt(3)
    state, norms = start, []
    for t in range(n):
        _, state = hebbian_scan_chunked(k[:, :, t:t + 1] * 0, k[:, :, t:t + 1], v[:, :, t:t + 1],
                                        torch.full_like(ld[..., t:t + 1], -delta * gamma_min), 1.0, state)
        norms.append(state.memory.norm(dim=(-2, -1)))
    norms = torch.stack(norms, -1)
    steps_above = math.ceil(math.log(3) / (delta * gamma_min)) - 1  # 3 exp(-delta gamma_min t) > 1
    assert lyapunov_stable_ratio(norms, bound[..., None]) == pytest.approx(1 - steps_above / n, abs=1.5 / n)
    mask = torch.zeros_like(norms, dtype=torch.bool)
    mask[..., -1] = True
    assert lyapunov_stable_ratio(norms, bound[..., None], mask) == 1


def test_diagnostics_are_detached_scalars():
    m = _module()
    assert m.diagnostics() == {}
    m(torch.randn(2, 40, 12, dtype=F64))
    d = m.diagnostics()
    assert set(d) == {"gamma_mean", "gamma_std", "gamma_min", "gamma_max", "snr_mean", "snr_low_ratio",
                      "resonant_modes", "resonance_energy", "stability_ratio", "fast_weight_energy"}
    assert all(t.dim() == 0 and not t.requires_grad and torch.isfinite(t) for t in d.values())
    assert d["stability_ratio"] == 1 and d["gamma_min"] > 0.01 and 0 < d["snr_low_ratio"] < 1
    gamma = m.gamma(torch.randn(2, 5, 12, dtype=F64))
    assert gamma.shape == (2, 5, 3) and (gamma > m.base_decay).all()
