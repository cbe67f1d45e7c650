"""What a crafted checkpoint can and cannot do with the project dataclasses ``safe_load`` admits: it can fill
an instance's fields with plain data; it cannot run a constructor, ``__post_init__`` or any other method."""

import pytest
import torch

from models.lm.gpt import Config
from models.lm.phase1.config import Phase1Config
from models.utils.checkpoint import CheckpointError, safe_load


@pytest.fixture
def post_inits(monkeypatch):
    calls = []
    real = Phase1Config.__post_init__
    monkeypatch.setattr(Phase1Config, "__post_init__", lambda self: (calls.append(self), real(self)))
    return calls


class CallsTheClass:
    def __init__(self, *args):
        self.args = args

    def __reduce__(self):  # pickle writes GLOBAL Phase1Config, the arguments, REDUCE: Phase1Config(*args)
        return Phase1Config, self.args


def test_a_saved_dataclass_loads_equal(tmp_path):
    torch.save({"hyper_parameters": {"config": Config(n_layer=3)}}, tmp_path / "ok.ckpt")
    assert safe_load(tmp_path / "ok.ckpt")["hyper_parameters"]["config"] == Config(n_layer=3)


def test_a_crafted_constructor_call_is_refused_and_runs_nothing(tmp_path, post_inits):
    torch.save({"h": CallsTheClass(-1)}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="Phase1Config called with constructor arguments"):
        safe_load(tmp_path / "evil.ckpt")
    assert post_inits == []


def test_a_crafted_call_without_arguments_gives_a_bare_instance(tmp_path, post_inits):
    torch.save({"h": CallsTheClass()}, tmp_path / "bare.ckpt")
    obj = safe_load(tmp_path / "bare.ckpt")["h"]
    assert type(obj) is Phase1Config and vars(obj) == {} and post_inits == []


def test_crafted_fields_are_data_only(tmp_path, post_inits):
    """The pickled instance's fields can be anything plain (here: values its __post_init__ would refuse); the
    module that receives them validates them itself (Phase1Config's users rebuild it from the fields)."""
    bad = object.__new__(Phase1Config)
    bad.__dict__.update({"vocab_size": -5, "htt_rank": "x"})
    torch.save({"h": bad}, tmp_path / "fields.ckpt")
    assert post_inits == []
    obj = safe_load(tmp_path / "fields.ckpt")["h"]
    assert type(obj) is Phase1Config and vars(obj) == {"vocab_size": -5, "htt_rank": "x"} and post_inits == []
