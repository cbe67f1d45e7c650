"""Tokenizers of the text data: `.jsonl` documents, a BPE tokenizer trained offline on the training split,
``data.tokenizer: <tokenizer.json>`` end to end, and the vocabulary checked against every LM before training."""

import json

import pytest
import yaml

from datamodules.text import TextDataModule
from tests.cli_helpers import REPO, run_cli

DOCS = {"a.py": "def add(a, b):\n    return a + b\n" * 6, "b.py": "class Point:\n    x = 0\n    y = 0\n" * 6,
        "c.py": "import os\nprint(os.getcwd())\n" * 6, "d.py": "for i in range(10):\n    print(i)\n" * 6}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is fastest and fair to the other jobs on the machine."""


def _corpus(folder):
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    return folder


def test_jsonl_lines_are_documents_separated_like_files(tmp_path):
    rows = [{"text": "first doc"}, {"text": "second\ndoc", "meta": 1}, {"body": "x", "text": "third"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    dm = TextDataModule(source="files", paths=[str(tmp_path / "d.jsonl")], split_by="position", val_fraction=0.0,
                        test_fraction=0.0, seq_len=4)
    ds = dm.load_split("train")
    assert bytes(ds.tokens.tolist()) == b"first doc\x00second\ndoc\x00third"
    assert list(dm.iter_documents("train")) == ["first doc", "second\ndoc", "third"]
    body = TextDataModule(source="files", paths=[str(tmp_path / "d.jsonl")], split_by="position", val_fraction=0.0,
                          test_fraction=0.0, seq_len=4, text_field="body")
    with pytest.raises(ValueError, match=r"d.jsonl' line 1 has no string field 'body' \(set data.text_field\)"):
        body.load_split("train")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    bad = TextDataModule(source="files", paths=[str(tmp_path / "bad.jsonl")], split_by="position", val_fraction=0.0,
                         test_fraction=0.0, seq_len=1)
    with pytest.raises(ValueError, match="bad.jsonl' line 2 is not JSON"):
        bad.load_split("train")


def test_position_split_of_jsonl_cuts_between_documents(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10)))
    dm = TextDataModule(source="files", paths=[str(tmp_path / "d.jsonl")], split_by="position", val_fraction=0.2,
                        test_fraction=0.1, seq_len=2)
    parts = {s: list(dm.iter_documents(s)) for s in ("train", "val", "test")}
    assert parts == {"train": [f"doc {i}" for i in range(7)], "val": ["doc 7", "doc 8"], "test": ["doc 9"]}


def test_bpe_trained_on_the_training_split_only_then_used_by_the_data(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from datamodules.tokenization import HFTokenizer, main

    corpus = _corpus(tmp_path / "corpus")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "v.py").write_text("zqzqzq zqzqzq zqzqzq\n" * 20)  # merges only a val-trained BPE learns
    cfg = {"data": {"class_path": "datamodules.text.TextDataModule",
                    "init_args": {"source": "files", "paths": [str(corpus)], "val_paths": [str(tmp_path / "val")],
                                  "test_fraction": 0.0, "seq_len": 8}}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "tok.json"
    main(["--config", str(tmp_path / "cfg.yaml"), "--vocab_size", "300", "--out", str(out), "--min_frequency", "1"])
    assert f"wrote {out}" in capsys.readouterr().out
    tok = HFTokenizer(out)
    assert 257 < tok.vocab_size <= 300 and tok.separator == 0
    assert len(tok.encode("zqzqzq")) >= 3  # never saw the validation text
    assert len(tok.encode("def add(a, b):")) < len("def add(a, b):".encode())  # learned the training text
    with pytest.raises(SystemExit):
        main(["--config", str(tmp_path / "cfg.yaml"), "--vocab_size", "300", "--out", str(out)])
    assert "exists" in capsys.readouterr().err
    dm = TextDataModule(source="files", paths=[str(corpus)], split_by="position", val_fraction=0.0, test_fraction=0.0,
                        seq_len=8, tokenizer=str(out))
    expected = []
    for i, name in enumerate(sorted(DOCS)):
        expected += ([tok.separator] if i else []) + tok.encode(DOCS[name]).tolist()
    assert dm.load_split("train").tokens.tolist() == expected and dm.vocab_size == tok.vocab_size
    assert tok.decode(expected).split("<|endoftext|>") == [DOCS[n] for n in sorted(DOCS)]


@pytest.mark.parametrize("config", ["gpt_pretrain.yaml", "phase1_lm.yaml", "phase2_small.yaml"])
def test_vocabulary_is_checked_against_the_model_before_anything_is_written(in_tmp, capsys, config):
    pytest.importorskip("tokenizers")
    from datamodules.tokenization import train_bpe

    corpus = _corpus(in_tmp / "corpus")
    tok = train_bpe(DOCS.values(), 400, in_tmp / "tok.json", min_frequency=1)
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(REPO / "configs" / config), "--data.source", "files", "--data.paths",
                 f"[{corpus}]", "--data.tokenizer", str(tok), "--data.seq_len", "16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "has 3" in err[0] and "vocab_size is 256" in err[0]
    assert not (in_tmp / "runs").exists()


def test_gpt_trains_and_predicts_with_a_bpe_tokenizer(in_tmp, capsys):
    pytest.importorskip("tokenizers")
    from datamodules.tokenization import HFTokenizer, train_bpe

    corpus = _corpus(in_tmp / "corpus")
    tok = train_bpe(DOCS.values(), 300, in_tmp / "tok.json", min_frequency=1)
    args = ["--config", str(REPO / "configs/gpt_pretrain.yaml"), "--data.source", "files", "--data.paths",
            f"[{corpus}]", "--data.tokenizer", str(tok), "--data.seq_len", "8", "--data.batch_size", "2",
            "--model.config.vocab_size", "300", "--model.config.n_layer", "1", "--model.config.n_embd", "16",
            "--model.config.n_head", "2", "--model.config.block_size", "8", "--model.sample_tokens", "0",
            "--trainer.enable_progress_bar", "false", "--data.split_by", "position"]
    fit = run_cli(["fit", *args, "--trainer.max_steps", "2"])
    capsys.readouterr()
    run_cli(["predict", *args, "--ckpt_path", fit.trainer.checkpoint_callback.last_model_path,
             "--model.prompts", '["def add"]', "--model.generation.max_new_tokens", "5"])
    out = json.loads(next((in_tmp / "runs").rglob("predictions.json")).read_text())
    continuation = out["samples"][0]["continuation"]
    assert out["scores"]["perplexity"] > 1 and continuation
    ids = out["samples"][0]["tokens"]
    assert len(ids) == 5 and max(ids) < 300 and HFTokenizer(tok).decode(ids) == continuation
