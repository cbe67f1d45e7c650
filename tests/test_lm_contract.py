"""Contract tests run over every language model of the project (as timm runs its tests over every model):
forward shape, backward reaching every trainable parameter, state-dict round trip, causality, and generation
that only appends. Each family's own tests go further (carried state, conversion, memory defects)."""

from typing import Callable

import pytest
import torch
from torch import nn

from models.lm.gpt import GPT, Config
from models.lm.phase1 import Phase1Config, create_phase1_model
from models.lm.phase2 import Phase2Config, Phase2LM

VOCAB = 256  # byte-level, as the text DataModule

#: name -> factory of a tiny model; a new language model family adds one line here.
LANGUAGE_MODELS: dict[str, Callable[[], nn.Module]] = {
    "gpt": lambda: GPT(Config(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=VOCAB)),
    "gpt_llama": lambda: GPT(Config(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=VOCAB,
                                    norm_class="RMSNorm", mlp_class="LLaMAMLP", position="learned", bias=False)),
    "phase1": lambda: create_phase1_model(Phase1Config(
        vocab_size=VOCAB, d_model=16, n_layers=2, n_seq=32, ar_ssm_max_rank=8, ar_ssm_min_rank=2, htt_rank=4,
        bk_chunk_size=8, use_gradient_checkpointing=False)),
    "phase2": lambda: Phase2LM(Phase2Config(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, head_dim=8,
                                            chunk_size=8, bk_chunk_size=8)),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def _make(name: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return LANGUAGE_MODELS[name]().double()


def _tokens(n: int = 24, seed: int = 0) -> torch.Tensor:
    # no NUL bytes: they are document separators (state resets) for the recurrent families
    return torch.randint(1, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_forward_and_backward_reach_every_trainable_parameter(name):
    model = _make(name, 0)
    logits = model(_tokens())
    assert logits.shape == (2, 24, VOCAB) and torch.isfinite(logits).all()
    logits.logsumexp(-1).mean().backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_state_dict_round_trip_gives_identical_logits(name):
    model, other = _make(name, 0).eval(), _make(name, 1).eval()
    idx = _tokens()
    assert not torch.equal(model(idx), other(idx))
    other.load_state_dict(model.state_dict())
    assert torch.equal(model(idx), other(idx))


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_future_tokens_leave_earlier_logits_bit_identical(name):
    model = _make(name, 0).eval()
    idx = _tokens()
    changed = idx.clone()
    changed[:, 13:] = _tokens(seed=1)[:, 13:]
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :13], b[:, :13])
    assert not torch.equal(a[:, 13:], b[:, 13:])  # the perturbation is seen from its own position on


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_greedy_generation_appends_the_argmax_of_the_full_forward(name):
    model = _make(name, 0).eval()
    prompt = _tokens(n=6)
    out = model.generate(prompt, 5, temperature=0)
    assert out.shape == (2, 11) and torch.equal(out[:, :6], prompt)
    with torch.no_grad():
        logits = model(out[:, :-1])
    assert torch.equal(out[:, 6:], logits[:, 5:].argmax(-1))
