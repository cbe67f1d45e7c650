"""The guide's (seed 001) Phase 1 API as documented aliases and options (issue 21)."""

import pytest
import torch
import torch.nn.functional as F
import yaml

from models.layers.ar_ssm import ARSSM, AdaptiveRankSemiseparableLayer
from models.layers.bk_mixer import BKMixer
from models.layers.tt_embedding import HolographicTTEmbedding, TTEmbedding
from models.lm.phase1 import BKStabilityMonitor, Phase1Config, collect_phase1_diagnostics, create_phase1_model
from models.lm.phase1 import errors as phase1_errors
from models.lm.phase1.errors import NumericalInstabilityError, Phase1ErrorRecovery, VRAMExhaustedError
from models.quant.lns import LNSLinear


def _tiny(**kw):
    torch.manual_seed(0)
    cfg = Phase1Config(vocab_size=64, d_model=16, n_layers=2, n_seq=16, ar_ssm_max_rank=4, ar_ssm_min_rank=1,
                       htt_rank=4, bk_eta=0.5, use_gradient_checkpointing=False, **kw)
    return create_phase1_model(cfg)


def test_forward_with_diagnostics_and_epsilon(one_thread):
    model = _tiny()
    ids = torch.randint(0, 64, (2, 9))
    plain = model(ids)
    assert isinstance(plain, torch.Tensor) and plain.shape == (2, 9, 64)
    logits, diagnostics = model(ids, return_diagnostics=True)
    torch.testing.assert_close(logits, plain)
    assert {"bk_bound_ratio", "bk_transfer_log10_condition", "aux_loss", "ar_ssm_effective_rank"} <= set(diagnostics)
    assert 0 < diagnostics["bk_bound_ratio"] <= 1 and not diagnostics["aux_loss"].requires_grad
    logits2, states, diag2 = model(ids, return_state=True, return_diagnostics=True)
    assert len(states) == 2 and diag2.keys() == diagnostics.keys()
    assert model.epsilon == 0.5 and all(m.epsilon == 0.5 for m in model.bk_mixers())
    assert BKMixer(8, eta=0.25).epsilon == 0.25


def test_check_stability_defaults(one_thread):
    model = _tiny()
    model(torch.randint(0, 64, (2, 9)))
    verdict = BKStabilityMonitor().check_stability(model=model)
    assert verdict["is_stable"] and 0 < verdict["bound_ratio"] <= 1
    with pytest.raises(ValueError, match="needs G_ii"):
        BKStabilityMonitor().check_stability()
    # break a layer's recorded bound: the default call reports it
    model.bk_mixers()[0]._stats["max_abs_g"] = torch.tensor(10.0)
    assert not BKStabilityMonitor().check_stability(model=model)["is_stable"]


def test_diagnostics_sweep_has_the_guides_keys(one_thread):
    model = _tiny()
    batches = [(torch.randint(0, 64, (2, 9)), torch.randint(0, 64, (2, 9)))]
    d = collect_phase1_diagnostics(model, batches)
    assert d["peak_vram_mb"] == d["peak_memory_mb"]
    assert 0 < d["compression_ratio"] < 1 and d["compression_ratio"] * d["htt_compression_ratio"] == pytest.approx(1)


def test_yaml_floats_from_safe_load_are_numbers():
    text = "phase1:\n  ar_ssm: {l1_regularization: 1e-6}\n  stability: {threshold: 1e-4}\n  bk: {eta: 2e0}\n"
    nested = yaml.safe_load(text)
    assert nested["phase1"]["ar_ssm"]["l1_regularization"] == "1e-6"  # YAML 1.1: a string
    c = Phase1Config.from_nested(nested)
    assert (c.ar_ssm_l1_regularization, c.stability_threshold, c.bk_eta) == (1e-6, 1e-4, 2.0)
    with pytest.raises(ValueError, match="phase1.stability.threshold must be a number"):
        Phase1Config.from_nested({"stability": {"threshold": "tiny"}})


def test_class_name_aliases_and_lns_switch():
    assert AdaptiveRankSemiseparableLayer is ARSSM and HolographicTTEmbedding is TTEmbedding
    torch.manual_seed(0)
    x = torch.randn(5, 32)
    off = LNSLinear(32, 8, use_lns=False).eval()
    assert torch.equal(off(x), F.linear(x, off.weight, off.bias))
    on = LNSLinear(32, 8).eval()
    on.load_state_dict(off.state_dict())
    assert not torch.equal(on(x), off(x))  # the LNS emulation really runs when asked
    assert "use_lns=False" in repr(off)


def test_errors_module_guide_and_project_forms():
    e = VRAMExhaustedError(7800.0, 8192.0, ["halve the batch"])
    assert (e.current_mb, e.limit_mb, e.suggestions) == (7800.0, 8192.0, ["halve the batch"])
    assert isinstance(e, torch.OutOfMemoryError) and "7800.0 MiB of 8192.0 MiB" in str(e) and "halve" in str(e)
    assert str(VRAMExhaustedError("plain message")) == "plain message"
    n = NumericalInstabilityError("BKMixer", {"max_abs_g": 3.5, "has_nan": True})
    assert n.component == "BKMixer" and n.diagnostics["has_nan"] and "max_abs_g=3.5" in str(n)
    assert str(NumericalInstabilityError("step 3: bound broken")) == "step 3: bound broken"
    assert phase1_errors.VRAMExhaustedError is VRAMExhaustedError
    from models.lm.phase1.stability import NumericalInstabilityError as old_name

    assert old_name is NumericalInstabilityError  # the project's import path still works


def test_recovery_entry_point(one_thread):
    model = _tiny()
    recovery = Phase1ErrorRecovery(max_recovery_attempts=3)
    err = VRAMExhaustedError(1.0, 2.0)
    assert recovery.handle_vram_exhausted(err, model, model.config)
    assert model.config.use_gradient_checkpointing  # the cheapest remedy first
    assert recovery.handle_vram_exhausted(err, model, model.config)
    assert all(m.active_rank == 2 for m in model.ar_ssm_layers())  # then half the AR-SSM ranks (4 -> 2)
    assert recovery.handle_vram_exhausted(err, model, model.config)
    assert all(m.active_rank == 1 for m in model.ar_ssm_layers())
    assert not recovery.handle_vram_exhausted(err, model, model.config)  # attempts used up
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert recovery.handle_numerical_instability(NumericalInstabilityError("x"), opt, model.config, model)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert [a.action_type for a in recovery.actions] == ["enable_gradient_checkpointing", "reduce_ar_ssm_rank",
                                                         "reduce_ar_ssm_rank", "reduce_learning_rate"]
