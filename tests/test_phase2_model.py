"""Phase 2 LM (models/lm/phase2.py): contract tests (forward, backward, state dict, causality, carried state,
document resets) and one test per defect of the public code it replaces."""

import pytest
import torch

from models.lm.phase2 import PRESETS, Phase2Config, Phase2LM, bk_mix

F64 = torch.float64
BK = [False, True]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is fastest and fair to the other jobs on the machine."""


def tiny(bk: bool = True, seed: int = 0, dtype=F64, **kw) -> Phase2LM:
    cfg = dict(d_model=16, n_layers=2, n_heads=2, head_dim=8, chunk_size=8, bk_chunk_size=8, bk_enabled=bk)
    torch.manual_seed(seed)
    return Phase2LM(Phase2Config(**{**cfg, **kw})).to(dtype)


def tokens(b=2, n=40, seed=0) -> torch.Tensor:
    """Random bytes without the document separator 0."""
    return torch.randint(1, 256, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bk", BK)
def test_forward_backward_every_parameter_gets_a_finite_gradient(bk):
    model = tiny(bk, dtype=torch.float32)
    idx = tokens()
    logits = model(idx)
    assert logits.shape == (2, 40, 256) and logits.dtype == torch.float32
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens(seed=1).flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("bk", BK)
def test_state_dict_round_trip_gives_identical_logits(bk, tmp_path):
    model = tiny(bk, seed=0)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    other = tiny(bk, seed=1)
    idx = tokens()
    assert not torch.equal(model(idx), other(idx))
    other.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))
    assert torch.equal(model(idx), other(idx))


@pytest.mark.parametrize("bk", BK)
@pytest.mark.parametrize("cut", [1, 8, 13, 31])
def test_causal_future_tokens_leave_earlier_logits_bit_identical(bk, cut):
    model = tiny(bk, dtype=torch.float32)
    idx = tokens()
    idx[1, 5] = 0  # a document boundary in one row
    changed = idx.clone()
    changed[:, cut:] = tokens(seed=7)[:, cut:]
    a, b = model(idx), model(changed)
    assert torch.equal(a[:, :cut], b[:, :cut])
    assert not torch.equal(a[:, cut:], b[:, cut:])


@pytest.mark.parametrize("bk", BK)
def test_carried_state_token_by_token_equals_full_forward(bk):
    model = tiny(bk)
    idx = tokens(n=37)
    idx[0, 20] = 0  # a document starts mid-stream in row 0
    full = model(idx)
    state, steps = None, []
    for t in range(idx.shape[1]):
        logits, state = model(idx[:, t:t + 1], state, return_state=True)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-9)
    # pieces of uneven length (crossing chunk boundaries) give the same logits too
    a, state = model(idx[:, :11], return_state=True)
    b = model(idx[:, 11:], state)
    torch.testing.assert_close(torch.cat([a, b], 1), full, rtol=0, atol=1e-9)


@pytest.mark.parametrize("bk", BK)
def test_generation_with_carried_state_equals_full_forward(bk):
    model = tiny(bk)
    prompt = tokens(n=9)
    out = model.generate(prompt, 20, temperature=0)
    assert out.shape == (2, 29) and torch.equal(out[:, :9], prompt)
    full = model(out)
    assert torch.equal(full[:, 8:-1].argmax(-1), out[:, 9:])  # every greedy token is the full forward's argmax
    g = torch.Generator().manual_seed(3)
    sampled = model.generate(prompt, 5, temperature=0.8, top_k=5, generator=g)
    assert sampled.shape == (2, 14)


@pytest.mark.parametrize("bk", BK)
def test_memory_resets_at_document_boundaries(bk):
    """A document after a NUL separator gets the logits it gets alone: nothing of the previous one leaks in."""
    model = tiny(bk)
    doc = tokens(b=1, n=25, seed=4)
    doc[0, 0] = 0  # the separator starts the document
    for prefix_len in (3, 8, 19):
        packed = torch.cat([tokens(b=1, n=prefix_len, seed=prefix_len), doc], 1)
        torch.testing.assert_close(model(packed)[:, prefix_len:], model(doc), rtol=0, atol=1e-10)
    # without document marks the prefix does reach the document (the test above can fail)
    marked = tiny(bk, reset_token=None)
    packed = torch.cat([tokens(b=1, n=8, seed=8), doc], 1)
    assert (marked(packed)[:, 8:] - marked(doc)).abs().max() > 1e-4


def _influence(model: Phase2LM, n: int = 48) -> torch.Tensor:
    """|logits change| at each position when only token 0 changes, (n,)."""
    idx = tokens(b=1, n=n, seed=5)
    other = idx.clone()
    other[0, 0] = 1 + (idx[0, 0] % 255)
    return (model(idx) - model(other)).abs().amax(-1)[0]


@pytest.mark.parametrize("bk", BK)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_raising_base_decay_shortens_the_memory(bk, seed):
    """Same weights, three base_decay values: the influence of the first token on logits far away shrinks."""
    far = []
    for base_decay in (0.0, 0.1, 1.0):
        model = tiny(bk, seed=seed, base_decay=base_decay, snr_threshold=None)
        far.append(_influence(model)[24:].max())
    assert far[0] > far[1] > far[2]
    assert far[2] < 1e-4 * far[0]


def test_gamma_enters_the_bk_operator():
    """Defect: Gamma computed but never used. With the memory's output zeroed, Gamma's projection still gets a
    gradient (through the BK potential only), and the BK output depends on Gamma."""
    model = tiny(True)
    for block in model.blocks:
        torch.nn.init.zeros_(block.memory.out_proj.weight)
    model(tokens()).square().mean().backward()
    for block in model.blocks:
        assert block.memory.gamma_proj.weight.grad.abs().sum() > 0
        assert block.memory.q_proj.weight.grad.abs().sum() == 0  # nothing flows through the memory itself
    block = model.blocks[0]
    h = torch.randn(2, 10, 16, dtype=F64)
    gamma = block.memory.gamma(h)
    y1, _ = bk_mix(block.bk, h, block.bk_decay(gamma), None, None)
    y2, _ = bk_mix(block.bk, h, block.bk_decay(2 * gamma), None, None)
    assert (y1 - y2).abs().max() > 1e-6


def test_bk_mix_without_resets_is_the_mixer_forward():
    block = tiny(True).blocks[0]
    h = torch.randn(2, 19, 16, dtype=F64)
    decay = block.bk_decay(block.memory.gamma(h))
    g0 = torch.randn(2, 16, dtype=torch.complex128) * 0.1
    expect = block.bk(h, g0, decay, return_state=True)
    got = bk_mix(block.bk, h, decay, g0, None)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])


def test_gamma_enters_the_memory_and_is_positive():
    model = tiny(False)
    model(tokens())
    diag = model.diagnostics()
    assert diag["gamma_min"] >= 0.01  # softplus + base_decay
    for block in model.blocks:
        torch.nn.init.zeros_(block.memory.gamma_proj.weight)
    base = model(tokens())
    for block in model.blocks:
        block.memory.gamma_proj.bias.data += 1.0
    assert (model(tokens()) - base).abs().max() > 1e-6


def test_hebbian_state_is_not_detached_through_time():
    """Defect: the fast-weight state detached at every step. The loss at the last position has a gradient with
    respect to the first token's embedding, and the memory (the only mixer here) is the only path."""
    model = tiny(False)
    idx = tokens(b=1, n=30)
    emb = model.wte(idx).detach().requires_grad_(True)
    x = emb
    for block in model.blocks:
        x, _ = block(x, None, None)
    model.ln_f(x)[0, -1].square().sum().backward()
    assert emb.grad[0, 0].abs().sum() > 1e-8


def test_snr_filter_is_a_real_decision_and_changes_outputs():
    """Defect: SNR bounded so the filter is always on and the adjusted Gamma never used. Here some boundaries
    are below the threshold and some above, and the filter changes the logits."""
    model = tiny(False, snr_threshold=2.0)
    idx = tokens(n=64)
    with_filter = model(idx)
    low = model.diagnostics()["snr_low_ratio"]
    assert 0 < low < 1
    off = tiny(False, snr_threshold=None)
    off.load_state_dict(model.state_dict())
    assert (off(idx) - with_filter).abs().max() > 1e-6


def test_eta_is_never_mutated_by_forward_or_training():
    model = tiny(False, dtype=torch.float32, hebbian_eta=0.7)
    before = {n: b.clone() for n, b in model.named_buffers()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(tokens(n=64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    for name, buf in model.named_buffers():
        assert torch.equal(buf, before[name]), name
    assert all(torch.equal(b.memory.eta, torch.full((2,), 0.7)) for b in model.blocks)


def test_resonance_basis_is_fixed_and_orthonormal():
    """Defect: a random, non-unitary basis per instance. Two models built under different seeds share it."""
    a, b = tiny(False, seed=0), tiny(False, seed=123)
    for block_a, block_b in zip(a.blocks, b.blocks):
        assert torch.equal(block_a.memory.basis, block_b.memory.basis)
        basis = block_a.memory.basis.double()
        torch.testing.assert_close(basis.mT @ basis, torch.eye(8, dtype=F64), rtol=0, atol=1e-12)
    assert not torch.equal(a.blocks[0].memory.basis, a.blocks[1].memory.basis)  # one seed per block


@pytest.mark.parametrize("bk", BK)
def test_no_state_leaks_across_batches_or_rows(bk):
    model = tiny(bk)
    first, second = tokens(seed=1), tokens(seed=2)
    alone = model(second)
    model(first)
    assert torch.equal(model(second), alone)  # nothing carried from the previous call
    torch.testing.assert_close(model(second[1:]), alone[1:], rtol=0, atol=1e-12)  # rows do not see each other


def test_diagnostics_are_detached_scalars_and_health_signals_are_finite():
    model = tiny(False, dtype=torch.float32)
    assert model.diagnostics() == {} and model.health_signals() == {}
    model(tokens(n=64))
    diag = model.diagnostics()
    assert set(diag) >= {"gamma_mean", "gamma_std", "gamma_min", "gamma_max", "snr_mean", "snr_low_ratio",
                         "resonant_modes", "resonance_energy", "stability_ratio", "fast_weight_energy"}
    assert all(v.dim() == 0 and not v.requires_grad for v in diag.values())
    assert diag["gamma_min"] <= diag["gamma_mean"] <= diag["gamma_max"]
    health = model.health_signals()
    assert set(health) == {"gamma_max", "memory_horizon", "memory_over_bound"}
    assert all(torch.isfinite(v) for v in health.values())
    assert 0 <= health["memory_over_bound"] <= 1


def test_presets_and_validation():
    for name, sizes in PRESETS.items():
        cfg = Phase2Config.from_preset(name, bk_enabled=False)
        assert cfg.d_model == sizes["d_model"] and cfg.n_heads * cfg.head_dim == cfg.n_heads * 64
    with pytest.raises(ValueError, match="unknown Phase 2 preset"):
        Phase2Config.from_preset("huge")
    bad = [({"d_model": 30, "n_heads": 4}, "d_model"), ({"base_decay": -1.0}, "base_decay"),
           ({"snr_threshold": 0.0}, "snr_threshold"), ({"gamma_bounds": (0.5, 2.0)}, "gamma_bounds"),
           ({"backend": "cuda"}, "backend"), ({"backend": "fla", "resonance_damping": 0.5}, "backend 'fla'"),
           ({"reset_token": 256}, "reset_token"),
           ({"resonance_damping": 1.0}, "resonance_damping"), ({"hebbian_eta": 0.0}, "hebbian_eta")]
    for kwargs, key in bad:
        with pytest.raises(ValueError, match=key):
            Phase2Config(**{"bk_enabled": False, **kwargs})


def test_bf16_autocast_runs_close_to_float32():
    """The GPU configs suggest bf16-mixed: the memory keeps a float32 state, the BK mixer computes in complex64."""
    model = tiny(True, dtype=torch.float32)
    idx = tokens()
    ref = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx)
    torch.nn.functional.cross_entropy(out.float().flatten(0, 1), idx.flatten()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
