"""The Phase 1 memory model (models/lm/phase1/presets.py) against measurements: the saved activations it
counts per token (autograd's saved tensors, exact and deterministic), and the peak memory of whole training
steps over several sizes (CPU RSS in a subprocess; the same check runs on CUDA with max_memory_allocated)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from models.lm.phase1 import Phase1Config, create_phase1_model, estimate_memory, fit_to_budget, get_preset_config
from models.lm.phase1.presets import BUDGET_FRACTION, activation_floats_per_token, count_parameters
from tests.cli_helpers import REPO


def saved_floats(fn) -> float:
    """float32 numbers autograd saves for the backward while ``fn`` runs (each storage counted once)."""
    seen, total = set(), [0]

    def pack(t):
        st = t.untyped_storage()
        if (st.data_ptr(), st.nbytes()) not in seen:
            seen.add((st.data_ptr(), st.nbytes()))
            total[0] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0] / 4


@pytest.mark.parametrize("kw", [dict(d_model=64, ar_ssm_max_rank=8), dict(d_model=128),
                                dict(d_model=96, mlp_class="LLaMAMLP", bk_enabled=False),
                                dict(d_model=64, ar_ssm_enabled=False, intermediate_size=128)])
def test_saved_activations_per_token_match_the_formula(kw):
    torch.manual_seed(0)
    config = Phase1Config(n_layers=1, htt_enabled=False, use_gradient_checkpointing=False, ar_ssm_min_rank=2, **kw)
    block = create_phase1_model(config).blocks[0]
    tokens = 2 * 512
    x = torch.randn(2, 512, config.d_model, requires_grad=True)
    measured = saved_floats(lambda: block(x)) / tokens
    predicted = activation_floats_per_token(config)["layer"]
    assert abs(measured / predicted - 1) < 0.15, (measured, predicted)


def test_parameter_count_is_exact():
    for kw in [dict(), dict(htt_enabled=False, tie_embeddings=False), dict(mlp_class="LLaMAMLP", norm_class="RMSNorm",
                                                                           bias=False, d_model=96)]:
        config = Phase1Config(**kw)
        assert count_parameters(config) == create_phase1_model(config).num_parameters()


SCRIPT = r"""
import json, sys, torch
import torch.nn.functional as F
from models.lm.phase1 import Phase1Config, create_phase1_model, estimate_memory
from models.utils.memory import measure_peak_memory, pin_malloc
pin_malloc()
torch.manual_seed(0)
out = []
def make_step(config, batch):
    model = create_phase1_model(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, config.vocab_size, (batch, config.n_seq + 1))
    def step():
        logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()) + model.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step
make_step(Phase1Config(d_model=16, n_layers=1, n_seq=16, ar_ssm_max_rank=16), 1)()  # warm-up: one-time allocations
for kw in json.loads(sys.argv[1]):
    batch = kw.pop("batch")
    config = Phase1Config(**kw)
    peak = measure_peak_memory(make_step(config, batch))
    est = estimate_memory(config, batch_size=batch)
    out.append([peak, (est["total_bytes"] - est["weights"]) / 2**20])  # weights exist before the step
print(json.dumps(out))
"""

#: measured peak / estimate stays within this factor (measured 0.71-1.01 on the sizes below over three runs on a
#: busy 2-core VM, 2026-11-23; the allocator's reuse of freed blocks makes the low end vary)
FACTOR = 1.6


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_estimate_tracks_measured_training_peaks_over_sizes(tmp_path):
    sizes = [dict(d_model=128, n_layers=2, n_seq=512, batch=8),
             dict(d_model=128, n_layers=4, n_seq=512, batch=8, use_gradient_checkpointing=False),
             dict(d_model=256, n_layers=2, n_seq=256, batch=8),
             dict(d_model=192, n_layers=3, n_seq=256, batch=8, mlp_class="LLaMAMLP", use_gradient_checkpointing=False)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(sizes)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    pairs = json.loads(res.stdout.strip().splitlines()[-1])
    ratios = [peak / est for peak, est in pairs]
    assert all(1 / FACTOR < r < FACTOR for r in ratios), pairs
    peaks = [p for p, _ in pairs]
    assert peaks[1] > peaks[0]  # checkpointing off and twice the depth: the measured peak grows as predicted


def test_presets_fit_their_budget_and_grow_with_it():
    sizes, ranks = {}, {}
    for name, gb in (("8gb", 8), ("10gb", 10), ("24gb", 24)):
        c = get_preset_config(name)
        total = estimate_memory(c)["total_gb"]
        assert total <= BUDGET_FRACTION * gb
        assert c.bk_enabled and c.ar_ssm_enabled and c.htt_enabled and c.use_gradient_checkpointing
        assert c.target_vram_gb == gb  # exactly, not 24.000000000000004
        sizes[name] = estimate_memory(c)["parameters"]
        ranks[name] = (c.ar_ssm_max_rank, c.htt_rank, c.ar_ssm_l1_regularization)
    assert sizes["8gb"] < sizes["10gb"] < sizes["24gb"]
    assert ranks["8gb"][:2] < ranks["10gb"][:2] < ranks["24gb"][:2]  # the features vary too, not only the size
    assert ranks["8gb"][2] > ranks["24gb"][2]
    custom = Phase1Config.from_nested({"preset": "custom", "memory": {"target_vram_gb": 4.0}})
    assert custom == fit_to_budget(Phase1Config(target_vram_gb=4.0))
    assert estimate_memory(custom)["total_gb"] <= BUDGET_FRACTION * 4.0
    with pytest.raises(ValueError, match="too small"):
        fit_to_budget(Phase1Config(target_vram_gb=0.001))
