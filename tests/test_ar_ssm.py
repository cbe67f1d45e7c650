"""AR-SSM layer: decayed scan (chunked vs sequential, gradients, boundedness), causality, streaming, rank
pruning, curriculum, gate loss and diagnostics."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.layers import ar_ssm
from models.layers.ar_ssm import ARSSM, curriculum_rank, decayed_scan, decayed_scan_reference

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


def _reference_forward(m: ARSSM, x: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """The documented equations with explicit loops; ranks in ``off`` get gate 0."""
    k, n = m.conv_kernel, x.shape[1]
    xp = F.pad(x, (0, 0, k - 1, 0))
    w = m.conv.weight[:, 0, :]  # (D, K)
    xc = F.silu(torch.stack([(xp[:, t : t + k] * w.T).sum(1) + m.conv.bias for t in range(n)], 1))
    g = torch.sigmoid(F.relu(xc @ m.gate_in.weight.T + m.gate_in.bias) @ m.gate_out.weight.T + m.gate_out.bias)
    g = g * (~off).to(g.dtype)
    u, v = (xc @ m.U.weight.T) * g, (xc @ m.V.weight.T) * g
    lam = torch.exp(m.log_decay())
    h, ys = torch.zeros_like(v[:, 0]), []
    for t in range(n):
        h = lam * h + v[:, t]
        ys.append((u[:, t] * h) @ m.W_o.weight.T)
    return torch.stack(ys, 1)


def _model(d: int = 8, max_rank: int = 6, **kw) -> ARSSM:
    torch.manual_seed(0)
    return ARSSM(d, max_rank=max_rank, min_rank=2, gate_hidden=5, **kw).to(F64)


# ------------------------------------------------------------------------------------------------ scan
@pytest.mark.parametrize("n", [1, 3, 4, 5, 17, 64, 65, 130])
@pytest.mark.parametrize("chunk", [4, 64])
@pytest.mark.parametrize("with_h0", [False, True])
def test_chunked_scan_equals_sequential(n, chunk, with_h0):
    torch.manual_seed(n)
    x = torch.randn(2, n, 5, dtype=F64)
    decay = torch.tensor([1.0, 0.99, 0.5, 1e-3, 1e-30], dtype=F64)  # decay^chunk underflows for the last two
    h0 = torch.randn(2, 5, dtype=F64) if with_h0 else None
    h, last = decayed_scan(x, decay, h0, chunk_size=chunk)
    h_ref, last_ref = decayed_scan_reference(x, decay, h0)
    torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, last_ref, rtol=1e-12, atol=1e-12)


def test_decay_one_is_plain_cumsum():
    x = torch.randn(3, 50, 4, dtype=F64)
    h0 = torch.randn(3, 4, dtype=F64)
    h, _ = decayed_scan(x, torch.ones(4, dtype=F64), h0, chunk_size=8)
    torch.testing.assert_close(h, x.cumsum(1) + h0[:, None], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,chunk", [(8, 3), (10, 2), (1, 4)])  # (10, 2): three levels of chunk-end scans
def test_decayed_scan_gradcheck(n, chunk):
    torch.manual_seed(0)
    x = torch.randn(2, n, 3, dtype=F64, requires_grad=True)
    decay = torch.tensor([0.3, 0.8, 1.0], dtype=F64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: decayed_scan(a, b, c, chunk_size=chunk), (x, decay, h0))


def test_state_bounded_on_long_constant_input():
    """With decay < 1 the state never exceeds max|x| / (1 - decay); the undecayed sum grows linearly."""
    n, c = 20000, 3.0
    decay = torch.tensor([0.5, 0.9, 0.99])
    h, _ = decayed_scan(torch.full((1, n, 3), c), decay)
    bound = c / (1 - decay)
    assert torch.all(h.abs() <= bound * (1 + 1e-5))
    torch.testing.assert_close(h[0, -1], bound, rtol=1e-4, atol=0)  # converges to the bound, no drift
    h1, _ = decayed_scan(torch.full((1, n, 1), c), torch.ones(1))
    assert h1[0, -1, 0] == c * n  # what the bound rules out


def test_module_decay_stays_below_one_and_state_bounded(monkeypatch):
    m = ARSSM(8, max_rank=4, min_rank=1, gate_hidden=4)
    with torch.no_grad():
        m.decay_logit[0] = -100.0  # exp(-softplus(-100)) alone would round to exactly 1.0 in float32
    assert torch.all(torch.exp(m.log_decay()) < 1)
    calls = []
    real = ar_ssm.decayed_scan
    monkeypatch.setattr(ar_ssm, "decayed_scan", lambda v, d, h0: calls.append((v, d, real(v, d, h0))) or calls[-1][2])
    with torch.no_grad():
        m(torch.full((1, 3000, 8), 2.0))
    v, d, (h, _) = calls[0]
    assert torch.all(h.abs() <= v.abs().amax(dim=(0, 1)) / (1 - d) * (1 + 1e-5))


# -------------------------------------------------------------------------------------------- module
@pytest.mark.parametrize("decay", [None, 1.0, 0.7])
def test_forward_matches_loop_reference(decay):
    m = _model(decay=decay)
    x = torch.randn(2, 23, 8, dtype=F64)
    off = torch.zeros(6, dtype=torch.bool)
    torch.testing.assert_close(m(x), _reference_forward(m, x, off), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("t0", [0, 1, 5, 37])
def test_causal_future_tokens_do_not_change_earlier_outputs(training, t0):
    torch.manual_seed(1)
    m = ARSSM(8, max_rank=6, min_rank=2, conv_kernel=4).train(training)
    x = torch.randn(2, 40, 8)
    with torch.no_grad():
        y = m(x)
        x_next = x.clone()
        x_next[:, t0] += 1.0  # only token t0: a two-sided convolution would change output t0 - 1
        x_all = x.clone()
        x_all[:, t0:] = torch.randn_like(x_all[:, t0:]) * 5
        y_next, y_all = m(x_next), m(x_all)
    assert torch.equal(y_next[:, :t0], y[:, :t0]) and torch.equal(y_all[:, :t0], y[:, :t0])
    assert not torch.equal(y_next[:, t0], y[:, t0])  # the perturbation is visible where it may be


@pytest.mark.parametrize("conv_kernel", [1, 4])
@pytest.mark.parametrize("pieces", [[1] * 19, [2, 1, 7, 9], [19]])
@pytest.mark.parametrize("training", [True, False])
def test_streaming_equals_full_forward(conv_kernel, pieces, training):
    m = _model(conv_kernel=conv_kernel).train(training)
    with torch.no_grad():
        m.gate_running_max[[1, 4]] = 0.0  # in eval these ranks are off, also while streaming
    m.set_active_rank(5)
    x = torch.randn(3, sum(pieces), 8, dtype=F64)
    y_full = m(x)
    state, outs, start = None, [], 0
    for p in pieces:
        y, state = m(x[:, start : start + p], state, return_state=True)
        outs.append(y)
        start += p
    torch.testing.assert_close(torch.cat(outs, 1), y_full, rtol=1e-10, atol=1e-12)
    _, full_state = m(x, return_state=True)
    torch.testing.assert_close(state.scan, full_state.scan, rtol=1e-10, atol=1e-12)
    assert torch.equal(state.conv, full_state.conv) and state.conv.shape == (3, conv_kernel - 1, 8)


def test_inference_pruning_equals_zero_gates_and_uses_smaller_tensors(monkeypatch):
    m = _model(max_rank=8).eval()
    x = torch.randn(2, 30, 8, dtype=F64)
    with torch.no_grad():
        m.gate_running_max[[1, 5]] = 1e-3  # below prune_threshold: off
    m.set_active_rank(7)  # rank 7 off as well
    off = ~m.inference_rank_mask()
    assert off.nonzero().flatten().tolist() == [1, 5, 7]

    linear_rows, scan_ranks = [], []
    real_linear, real_scan = F.linear, ar_ssm.decayed_scan
    monkeypatch.setattr(F, "linear", lambda a, w, b=None: linear_rows.append(tuple(w.shape)) or real_linear(a, w, b))
    monkeypatch.setattr(ar_ssm, "decayed_scan", lambda v, d, h0: scan_ranks.append(v.shape[-1]) or real_scan(v, d, h0))
    y_pruned = m(x)
    assert scan_ranks == [5] and m._last_gate.shape == (2, 30, 5)
    # gate_in (5, 8) is shared; gate_out, U, V have 5 rows; W_o has 5 columns
    assert sorted(linear_rows) == sorted([(5, 8), (5, 5), (5, 8), (5, 8), (8, 5)])

    m.prune_inference = False  # every rank computed, off gates multiplied by 0
    y_masked = m(x)
    assert scan_ranks[-1] == 8
    torch.testing.assert_close(y_pruned, y_masked, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(y_pruned, _reference_forward(m, x, off), rtol=1e-10, atol=1e-12)


def test_prefix_pruning_slices_weights(monkeypatch):
    m = _model(max_rank=8).eval()
    m.set_active_rank(3)
    seen = []
    real_linear = F.linear
    monkeypatch.setattr(F, "linear", lambda a, w, b=None: seen.append(w) or real_linear(a, w, b))
    m(torch.randn(1, 4, 8, dtype=F64))
    assert seen[2].data_ptr() == m.U.weight.data_ptr() and seen[2].shape == (3, 8)  # a view, no copy


def test_training_masks_ranks_beyond_active_rank():
    m = _model()
    m.set_active_rank(3)
    x = torch.randn(2, 10, 8, dtype=F64)
    y = m(x)
    y.square().sum().backward()
    assert m._last_gate.shape == (2, 10, 3)
    assert torch.all(m.U.weight.grad[3:] == 0) and torch.all(m.U.weight.grad[:3] != 0)
    off = torch.arange(6) >= 3
    torch.testing.assert_close(y, _reference_forward(m, x, off), rtol=1e-10, atol=1e-12)


def test_set_active_rank_validates():
    m = _model()
    for bad in (1, 7):
        with pytest.raises(ValueError, match=f"active rank {bad}"):
            m.set_active_rank(bad)
    m.set_active_rank(2)
    m2 = _model()
    m2.load_state_dict(m.state_dict())
    assert m2.active_rank == 2


def test_gate_running_max_drives_inference_mask():
    m = _model()
    with torch.no_grad():
        m.gate_out.bias[3:] = -40.0  # gates ~ 4e-18: off
    assert m.inference_rank_mask().all()  # no statistics yet: nothing pruned
    m.train()(torch.randn(2, 9, 8, dtype=F64))  # the first update copies the batch max
    assert m.inference_rank_mask().tolist() == [True] * 3 + [False] * 3
    assert torch.all(m.gate_updates == 1)


def test_gate_l1_loss_and_effective_rank():
    m = _model(l1_regularization=0.5)
    with pytest.raises(RuntimeError):
        m.gate_l1_loss()
    with torch.no_grad():
        m.gate_out.weight.zero_()
        m.gate_out.bias.copy_(torch.tensor([40.0, 40.0, 40.0, -40.0, -40.0, 0.0]))  # 3 on, 2 off, one at 0.5
    m(torch.randn(2, 7, 8, dtype=F64))
    assert m.effective_rank().item() == 3 and m.effective_rank(0.4).item() == 4
    assert not m.effective_rank().requires_grad
    loss = m.gate_l1_loss()
    torch.testing.assert_close(loss, torch.tensor(0.5 * 3.5 / 6, dtype=F64))
    m.zero_grad()
    loss.backward()
    assert m.gate_out.bias.grad[5] > 0 and m.gate_in.weight.grad is not None  # trains the gate
    m.set_active_rank(2)  # masked ranks count as zero in the mean
    m(torch.randn(2, 7, 8, dtype=F64))
    torch.testing.assert_close(m.gate_l1_loss(), torch.tensor(0.5 * 2 / 6, dtype=F64))


def test_module_gradcheck_input():
    m = _model(d=4, max_rank=3)
    x = torch.randn(1, 6, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,))


def test_curriculum_rank():
    ranks = [curriculum_rank(s, 100, 4, 8) for s in range(130)]
    assert ranks[0] == 4 and ranks[100] == 8 and ranks[-1] == 8
    assert all(a <= b for a, b in itertools.pairwise(ranks))
    assert [ranks.count(r) for r in (4, 5, 6, 7)] == [20, 20, 20, 20]  # equal share per rank
    assert curriculum_rank(5, 0, 4, 8) == 8
    with pytest.raises(ValueError):
        curriculum_rank(0, 10, 9, 8)


def test_fused_scan_is_torch_on_cpu(monkeypatch):
    monkeypatch.setattr(ar_ssm, "decayed_scan_triton", lambda *a: pytest.fail("Triton path used on CPU"))
    m = _model(use_fused_scan=True)
    m(torch.randn(1, 5, 8, dtype=F64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_scan_on_cuda_matches_torch_path():
    pytest.importorskip("triton")
    m = _model(d=16, max_rank=8).float().cuda()
    x = torch.randn(2, 300, 16, device="cuda", requires_grad=True)
    y_fused = m(x)
    (g_fused,) = torch.autograd.grad(y_fused.square().sum(), [m.decay_logit])
    m.use_fused_scan = False
    y_torch = m(x)
    (g_torch,) = torch.autograd.grad(y_torch.square().sum(), [m.decay_logit])
    torch.testing.assert_close(y_fused, y_torch, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_fused, g_torch, rtol=1e-3, atol=1e-4)


def test_imports_and_runs_without_triton():
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import json, torch\n"
        "from models.layers import ar_ssm, ar_ssm_triton\n"
        "y = ar_ssm.ARSSM(8, max_rank=4, min_rank=2)(torch.randn(1, 5, 8))\n"
        "try:\n"
        "    ar_ssm_triton.decayed_scan_triton(torch.randn(1, 5, 4), torch.rand(4))\n"
        "    raised = False\n"
        "except RuntimeError:\n"
        "    raised = True\n"
        "print(json.dumps({'has': ar_ssm_triton.HAS_TRITON, 'shape': list(y.shape), 'raised': raised}))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"has": False, "shape": [1, 5, 8], "raised": True}


def test_fused_path_convolution_equals_the_shifted_form():
    """The GPU path's single conv1d == the CPU path's shifted multiply-adds (with and without carried inputs)."""
    torch.manual_seed(0)
    cpu = ARSSM(6, 4, 2, conv_kernel=4, backend="torch").double()
    gpu = ARSSM(6, 4, 2, conv_kernel=4, backend="triton").double()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    for past in (None, torch.randn(2, 3, 6, dtype=torch.float64)):
        outs = []
        for m in (cpu, gpu):
            y = m._causal_conv(x, past)
            outs.append((y, *torch.autograd.grad(y.square().sum(), [x, m.conv.weight, m.conv.bias])))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    one_cpu = ARSSM(6, 4, 2, conv_kernel=1, backend="torch").double()
    one_gpu = ARSSM(6, 4, 2, conv_kernel=1, backend="triton").double()
    one_gpu.load_state_dict(one_cpu.state_dict())
    torch.testing.assert_close(one_gpu._causal_conv(x, None), one_cpu._causal_conv(x, None), rtol=1e-12, atol=1e-12)
