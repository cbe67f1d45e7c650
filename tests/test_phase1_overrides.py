"""Phase 1: the flat ``config`` and the nested ``phase1`` group are one source of truth: a key set both ways to
different values is refused (it used to be overridden silently by the nested group), also when the flat value is
its default but was given (``given``, what ``cli.py`` reads from the files and command line), a flat key the
nested group does not set is applied, and nested values are typed."""

import pytest

from lightning_modules.phase1_lm import Phase1LanguageModel
from models.lm.phase1 import Phase1Config

SMALL = dict(vocab_size=64, d_model=16, n_layers=1, n_seq=8, ar_ssm_max_rank=8, htt_rank=4)


def test_a_key_set_both_ways_is_refused():
    with pytest.raises(ValueError, match=r"config.htt_rank \(4\) and phase1.htt.rank \(8\) set the same option"):
        Phase1LanguageModel(Phase1Config(**SMALL), phase1={"htt": {"rank": 8}})


def test_flat_keys_the_group_does_not_set_are_applied():
    module = Phase1LanguageModel(Phase1Config(**{**SMALL, "ar_ssm_conv_kernel": 3}),
                                 phase1={"htt": {"rank": 4}, "bk": {"eta": 2.0}})
    assert module.config.ar_ssm_conv_kernel == 3 and module.config.htt_rank == 4 and module.config.bk_eta == 2.0
    assert module.model.config == module.config


@pytest.mark.parametrize("nested, message", [
    ({"htt": {"rank": "4"}}, "phase1.htt.rank must be an integer"),
    ({"bk": {"eta": float("nan")}}, "phase1.bk.eta must be a finite number"),
    ({"lns": {"enabled": 1}}, "phase1.lns.enabled must be true or false"),
    ({"ar_ssm": {"l1_regularization": -1.0}}, "ar_ssm_l1_regularization >= 0"),
    ({"model": {"norm_eps": 0.0}}, "config.norm_eps must be > 0"),
    ({"model": {"d_model": 16}, "ar_ssm": {"max_rank": 64}}, r"ar_ssm_max_rank \(64\) must not exceed the model width"),
])
def test_nested_values_are_checked(nested, message):
    with pytest.raises(ValueError, match=message):
        Phase1Config.from_nested(nested)


def test_a_preset_refuses_flat_values_it_would_ignore():
    with pytest.raises(ValueError, match=r"config.d_model \(64\) would be ignored: phase1.preset '8gb'"):
        Phase1Config.from_nested({"preset": "8gb"}, base=Phase1Config(d_model=64))
    assert Phase1Config.from_nested({"preset": "8gb"}, base=Phase1Config()).d_model == 1024


def test_a_given_flat_key_at_its_default_is_refused_beside_another_nested_value():
    base = Phase1Config(**SMALL)  # bk_chunk_size: the default 256
    nested = {"bk": {"chunk_size": 128}}
    assert Phase1Config.from_nested(nested, base=base).bk_chunk_size == 128  # not given: the group applies
    with pytest.raises(ValueError, match=r"config.bk_chunk_size \(256\) and phase1.bk.chunk_size \(128\)"):
        Phase1Config.from_nested(nested, base=base, given={"bk_chunk_size"})
    with pytest.raises(ValueError, match=r"config.bk_chunk_size \(256\) and phase1.bk.chunk_size \(128\)"):
        Phase1LanguageModel.check_given_arguments({"config": {"bk_chunk_size": 256}, "phase1": nested})
    # the same value both ways is one value, not a conflict
    Phase1LanguageModel.check_given_arguments({"config": {"bk_chunk_size": 128}, "phase1": nested})


def test_given_flat_values_a_preset_budget_or_switch_would_replace_are_refused():
    with pytest.raises(ValueError, match=r"config.d_model \(128\) would be ignored: phase1.preset '8gb'"):
        Phase1Config.from_nested({"preset": "8gb"}, base=Phase1Config(), given={"d_model"})
    with pytest.raises(ValueError, match=r"config.n_layers \(4\) would be ignored: phase1.memory.target_vram_gb"):
        Phase1Config.from_nested({"memory": {"target_vram_gb": 4.0}}, base=Phase1Config(), given={"n_layers"})
    with pytest.raises(ValueError, match=r"config.htt_enabled \(True\) and phase1.enabled \(False\)"):
        Phase1Config.from_nested({"enabled": False}, base=Phase1Config(), given={"htt_enabled"})
    # a given value the preset keeps is no conflict (vocab_size 256 is every preset's)
    assert Phase1Config.from_nested({"preset": "8gb"}, base=Phase1Config(), given={"vocab_size"}).d_model == 1024
