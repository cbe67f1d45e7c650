"""Generation for every language model (sampling options, carried state, streaming) and ``predict`` from the
checkpoint each family's ``fit`` wrote (perplexity of a user's file, continuations written to the run folder)."""

import json

import pytest
import torch

from datamodules.text import ByteTokenizer
from lightning_modules.lm_predict import TextStream, read_prompts
from models.lm.gpt import GPT, Config
from models.lm.phase1 import Phase1Config
from models.lm.phase1.model import Phase1LM
from models.lm.phase2 import Phase2Config, Phase2LM
from models.lm.sampling import GenerationConfig, generate, sample_next_token
from tests.cli_helpers import REPO, run_cli


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is fastest and fair to the other jobs on the machine."""


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next_token(logits, 1.0, None, g, top_p=0.75)) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3: tokens 0 and 1 only
    seen = {int(sample_next_token(logits, 1.0, None, g, top_p=0.81)) for _ in range(300)}
    assert seen == {0, 1, 2}
    assert {int(sample_next_token(logits, 1.0, None, g, top_p=1e-6)) for _ in range(50)} == {0}  # top-1 kept
    shuffled = logits[:, [2, 0, 3, 1]]  # the filter follows probability, not position
    assert {int(sample_next_token(shuffled, 1.0, None, g, top_p=0.75)) for _ in range(300)} == {1, 3}
    assert {int(sample_next_token(logits, 1.0, 1, g, top_p=0.99)) for _ in range(50)} == {0}  # with top_k


@pytest.mark.parametrize("bad", [dict(max_new_tokens=-1), dict(temperature=-0.1), dict(top_k=0), dict(top_p=0.0),
                                 dict(top_p=1.5), dict(temperature=float("nan"))])
def test_generation_config_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="generation."):
        GenerationConfig(**bad)


def _phase1():
    torch.manual_seed(0)
    return Phase1LM(Phase1Config(vocab_size=64, d_model=32, n_layers=2, n_seq=32, intermediate_size=64,
                                 htt_enabled=True, htt_rank=4, ar_ssm_max_rank=4, ar_ssm_min_rank=2,
                                 bk_chunk_size=8)).eval()


def _phase2():
    torch.manual_seed(0)
    return Phase2LM(Phase2Config(vocab_size=64, d_model=16, n_heads=2, head_dim=8, n_layers=2, chunk_size=8,
                                 bk_chunk_size=8)).eval()


@pytest.mark.parametrize("make", [_phase1, _phase2], ids=["phase1", "phase2"])
def test_carried_state_generation_reads_the_prompt_once_and_equals_the_full_forward(make):
    """The prompt is read in one call, then every call is one token (no prefix recomputation); the logits each
    step sampled from equal the full forward's at that position, for greedy and for top-p sampling."""
    model = make()
    lengths, step_logits = [], []
    original = model.forward

    def recording(idx, *args, **kwargs):
        out = original(idx, *args, **kwargs)
        lengths.append(idx.shape[1])
        step_logits.append(out[0][:, -1])
        return out

    model.forward = recording
    prompt = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    for kwargs in (dict(temperature=0), dict(temperature=0.9, top_p=0.8, generator=torch.Generator().manual_seed(2))):
        lengths.clear()
        step_logits.clear()
        out = model.generate(prompt, 12, **kwargs)
        assert out.shape == (2, 21) and torch.equal(out[:, :9], prompt)
        assert lengths == [9] + [1] * 11
        model.forward = original
        full = model(out)[:, 8:-1]
        model.forward = recording
        torch.testing.assert_close(torch.stack(step_logits, 1), full, rtol=0, atol=2e-5)
        if kwargs["temperature"] == 0:
            assert torch.equal(full.argmax(-1), out[:, 9:])


def test_gpt_generation_re_reads_a_sliding_window_and_streams_each_token():
    torch.manual_seed(0)
    model = GPT(Config(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=64)).eval()
    prompt = torch.randint(0, 64, (1, 6))
    streamed = []
    out = model.generate(prompt, 5, temperature=0, on_token=streamed.append)
    assert torch.equal(torch.cat(streamed, 1), out[:, 6:])
    ids = prompt
    for _ in range(5):  # the reference: re-read the last block_size tokens each step
        ids = torch.cat([ids, model(ids[:, -8:])[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)
    a = generate(model, prompt, 6, 1.0, 10, torch.Generator().manual_seed(5), top_p=0.9, block_size=8)
    b = generate(model, prompt, 6, 1.0, 10, torch.Generator().manual_seed(5), top_p=0.9, block_size=8)
    assert torch.equal(a, b)  # the seed makes sampling repeatable


def test_text_stream_holds_back_a_split_utf8_character():
    written = []
    stream = TextStream(ByteTokenizer(), written.append)
    for b in "é!".encode():  # é is two bytes
        stream(torch.tensor([[b]]))
    assert written == ["é", "!"] and stream.finish() == "é!"


def test_prompts_from_the_command_line_and_files(tmp_path):
    assert read_prompts(None, None, "def ") == ["def "]
    (tmp_path / "p.txt").write_text("import os\n\nclass A:\n")
    assert read_prompts(["x"], str(tmp_path / "p.txt"), "def ") == ["x", "import os", "class A:"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "def f():\\n    "}\n{"text": "y"}\n')
    assert read_prompts(None, str(tmp_path / "p.jsonl"), "") == ["def f():\n    ", "y"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": 3}\n')
    with pytest.raises(ValueError, match="line 1 has no string"):
        read_prompts(None, str(tmp_path / "bad.jsonl"), "")
    with pytest.raises(ValueError, match="model.prompt_file 'missing.txt'"):
        read_prompts(None, "missing.txt", "")


GPT_TINY = ["--model.config.n_layer", "1", "--model.config.n_head", "2", "--model.config.n_embd", "16",
            "--model.config.block_size", "32", "--data.seq_len", "32"]
PHASE1_TINY = ["--model.config.d_model", "16", "--model.config.n_layers", "1", "--model.config.intermediate_size",
               "32", "--data.seq_len", "32"]
PHASE2_TINY = ["--model.config.d_model", "16", "--model.config.n_heads", "2", "--model.config.head_dim", "8",
               "--model.config.n_layers", "1", "--model.config.chunk_size", "8", "--model.config.bk_chunk_size", "8",
               "--data.seq_len", "24"]
COMMON = ["--data.batch_size", "4", "--data.max_windows", "8", "--model.sample_tokens", "0",
          "--trainer.enable_progress_bar", "false", "--trainer.limit_val_batches", "1"]
FAMILIES = {"gpt": ("gpt_pretrain.yaml", GPT_TINY), "phase1": ("phase1_lm.yaml", PHASE1_TINY),
            "phase2": ("phase2_small.yaml", PHASE2_TINY)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_predict_from_the_fit_checkpoint_scores_a_file_and_writes_continuations(in_tmp, family, capsys):
    config, tiny = FAMILIES[family]
    config = str(REPO / "configs" / config)
    fit = run_cli(["fit", "--config", config, "--trainer.max_steps", "2", "--trainer.max_epochs", "1",
                   *tiny, *COMMON])
    ckpt = fit.trainer.checkpoint_callback.last_model_path
    assert ckpt
    user_file = in_tmp / "mine.txt"
    user_file.write_text("def add(a, b):\n    return a + b\n" * 8)
    (in_tmp / "prompts.txt").write_text("import os\n")
    capsys.readouterr()
    pred = run_cli(["predict", "--config", config, "--ckpt_path", ckpt, *tiny, *COMMON,
                    "--data.source", "files", "--data.paths", f"[{user_file}]", "--model.prompts", '["def f(x):"]',
                    "--model.prompt_file", "prompts.txt", "--model.generation.max_new_tokens", "7",
                    "--model.generation.top_p", "0.9", "--model.generation.seed", "3"])
    printed = capsys.readouterr().out
    folder = next(p for p in (in_tmp / "runs").rglob("predictions.json"))
    assert f"predictions written to {folder.parent / 'predictions.txt'}" in printed
    result = json.loads(folder.read_text())
    seq = int(tiny[tiny.index("--data.seq_len") + 1])
    windows = min(8, (len(user_file.read_bytes()) - 1 - seq) // seq + 1)
    assert result["scores"]["windows"] == windows and result["scores"]["tokens"] == windows * seq
    assert result["scores"]["perplexity"] > 1
    assert result["generation"]["top_p"] == 0.9 and result["generation"]["seed"] == 3
    assert [s["prompt"] for s in result["samples"]] == ["def f(x):", "import os"]
    model = pred.model.to("cpu")
    for sample in result["samples"]:
        assert len(sample["continuation"].encode()) <= 7 * 4  # 7 byte tokens (replacement chars are 3 bytes)
        assert f"{sample['prompt']}{sample['continuation']}" in printed  # streamed to the console
        assert model.generate_text(sample["prompt"]) == sample["continuation"]  # the seed makes it repeatable
    text = (folder.parent / "predictions.txt").read_text()
    assert "perplexity" in text and "def f(x):" in text


@pytest.mark.parametrize("make", [_phase1, _phase2], ids=["phase1", "phase2"])
def test_generation_samples_only_ids_the_tokenizer_has(make):
    """A model whose vocabulary is larger than its tokenizer's never emits an id the tokenizer cannot decode."""
    out = generate(make(), torch.zeros(4, 3, dtype=torch.long), 30, 2.0, None, torch.Generator().manual_seed(0),
                   vocab_limit=10)
    assert out[:, 3:].max() < 10 and len(out[:, 3:].unique()) > 1
