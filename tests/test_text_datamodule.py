"""TextDataModule: stdlib domains, disjoint and stable splits, stable sample indices, byte windows, errors."""

import pytest
import torch

from datamodules.text import (
    DOC_SEPARATOR,
    ByteTokenizer,
    TextDataModule,
    glob_to_regex,
    list_stdlib_files,
    split_of,
    stdlib_root,
)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'é→'\n"
    ids = tok.encode(text)
    assert tok.vocab_size == 256 and ids.dtype == torch.long and int(ids.max()) < 256
    assert len(ids) == len(text.encode("utf-8")) and tok.decode(ids) == text


@pytest.mark.parametrize("pattern,path,hit", [
    ("email/**", "email/mime/text.py", True),
    ("email/**", "emails.py", False),
    ("*.py", "os.py", True),
    ("*.py", "json/decoder.py", False),
    ("json/*", "json/decoder.py", True),
    ("**/tests/**", "a/b/tests/c.py", True),
    ("**/tests/**", "tests/c.py", True),
    ("?s.py", "os.py", True),
])
def test_glob_semantics(pattern, path, hit):
    assert bool(glob_to_regex(pattern).match(path)) is hit


def test_stdlib_domains_and_default_excludes():
    root, rels = list_stdlib_files(["**/*.py"], ["site-packages/**", "test/**", "**/tests/**"])
    assert root == stdlib_root() and rels == sorted(rels) and "os.py" in rels
    assert not any(r.startswith(("site-packages/", "test/")) for r in rels)
    dm = TextDataModule(include=["email/**"], seq_len=16)
    files = [p for split in dm.split_files.values() for p in split]
    assert files and all(p.relative_to(root).as_posix().startswith("email/") for p in files)


def test_splits_disjoint_stable_and_independent_of_selection():
    a = TextDataModule(include=["*.py"], seq_len=16)
    b = TextDataModule(include=["*.py"], seq_len=16)
    sets = {k: set(v) for k, v in a.split_files.items()}
    assert all(sets.values())
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert a.split_files == b.split_files
    # A file's split depends only on its path and the seed, not on which other files are selected.
    wide = TextDataModule(include=["*.py", "json/**"], seq_len=16)
    for split in ("train", "val", "test"):
        assert set(a.split_files[split]) <= set(wide.split_files[split])
    other = TextDataModule(include=["*.py"], seq_len=16, split_seed=1)
    assert other.split_files != a.split_files
    assert split_of("os.py", 0.1, 0.1, 0) == split_of("os.py", 0.1, 0.1, 0)


def test_windows_indices_and_limits():
    dm = TextDataModule(include=["json/**"], seq_len=32, max_windows=20, max_files=2, val_fraction=0.3,
                        test_fraction=0.2, split_seed=3, batch_size=8)
    assert all(len(v) <= 2 for v in dm.split_files.values())
    dm.setup("fit")
    train = dm.datasets["train"]
    assert 0 < len(train) <= 20
    s = train[5]
    assert s["index"] == 5 and s["input_ids"].shape == (32,) and s["labels"].shape == (32,)
    assert torch.equal(s["input_ids"][1:], s["labels"][:-1])
    assert torch.equal(train[5]["input_ids"], s["input_ids"])  # stable across calls
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (dm.hparams.batch_size, 32) and batch["index"].dtype == torch.long


def test_files_source_joins_documents(tmp_path):
    for i in range(12):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i} " * 8, encoding="utf-8")
    dm = TextDataModule(source="files", paths=[str(tmp_path / "*.txt")], seq_len=8, stride=4,
                        val_fraction=0.25, test_fraction=0.25, split_seed=0)
    dm.setup()
    train = dm.datasets["train"]
    expected = DOC_SEPARATOR.join(p.read_bytes() for p in dm.split_files["train"])
    assert len(train) == (len(expected) - 1 - 8) // 4 + 1
    assert bytes(train[1]["input_ids"].tolist()) == expected[4:12]
    names = {p.name for split in dm.split_files.values() for p in split}
    assert len(names) == 12


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no text files found"):
        TextDataModule(include=["no_such_package/**"])
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        TextDataModule(source="files", paths=[str(tmp_path / "missing_dir" / "*.txt")])
    with pytest.raises(ValueError, match="`paths` must list"):
        TextDataModule(source="files")
    with pytest.raises(ValueError, match="seq_len"):
        TextDataModule(seq_len=0)
    with pytest.raises(ValueError, match="val_fraction"):
        TextDataModule(val_fraction=0.6, test_fraction=0.5)
    single = TextDataModule(include=["json/decoder.py"])  # predict reads every file; fit needs a val split
    with pytest.raises(ValueError, match="split is empty"):
        single.setup("fit")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1") * 50)
    (tmp_path / "ok.txt").write_text("hello " * 50, encoding="utf-8")
    dm = TextDataModule(source="files", paths=[str(bad), str(tmp_path / "ok.txt")], val_fraction=0, test_fraction=0,
                        seq_len=8)
    with pytest.raises(ValueError, match="latin1.txt.*not valid UTF-8"):
        dm.setup("fit")
