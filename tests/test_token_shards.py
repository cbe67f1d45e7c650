"""Token shards: prepared once, read without loading the corpus, the same windows as the in-memory text data,
exact mid-epoch resume, a rank's share under DDP, and damaged or half-written folders refused."""

import json

import numpy as np
import pytest
import torch
import yaml

from datamodules.text import TextDataModule
from datamodules.token_shards import ShardWindows, TokenShardDataModule, _ShardWriter, main, prepare_shards, token_dtype
from tests.cli_helpers import REPO, run_cli


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one thread is fastest and fair to the other jobs on the machine."""


def _corpus(folder, n=12):
    folder.mkdir()
    for i in range(n):
        (folder / f"f{i:02d}.py").write_text(f"# file {i}\n" + "".join(f"x{j} = {i * j}\n" for j in range(5 + i)))
    (folder / "docs.jsonl").write_text("".join(json.dumps({"text": f"doc {k} " * (k + 2)}) + "\n" for k in range(6)))
    return folder


def _text_dm(corpus, **kw):
    return TextDataModule(source="files", paths=[str(corpus)], val_fraction=0.2, test_fraction=0.2, seq_len=16,
                          batch_size=4, **kw)


@pytest.mark.parametrize("max_windows, split_by", [(None, "file"), (5, "file"), (None, "position")])
def test_shards_give_the_windows_of_the_in_memory_data(tmp_path, max_windows, split_by):
    corpus = _corpus(tmp_path / "corpus")
    text = _text_dm(corpus, max_windows=max_windows, split_by=split_by)
    prepare_shards(text, tmp_path / "shards", shard_tokens=37)  # tiny shards: windows span shard boundaries
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["dtype"] == "uint16" and len(index["splits"]["train"]) > 3
    shards = TokenShardDataModule(str(tmp_path / "shards"), seq_len=16, batch_size=4, max_windows=max_windows)
    for split in ("train", "val", "test"):
        a, b = text.load_split(split), shards.load_split(split)
        assert len(a) == len(b) > 0
        assert sum(s["tokens"] for s in index["splits"][split]) == len(a.tokens)
        for i in range(len(a)):
            x, y = a[i], b[i]
            assert x["index"] == y["index"] and torch.equal(x["input_ids"], y["input_ids"])
            assert torch.equal(x["labels"], y["labels"])


def test_bpe_shards_equal_the_tokenized_stream(tmp_path):
    pytest.importorskip("tokenizers")
    from datamodules.tokenization import train_bpe

    corpus = _corpus(tmp_path / "corpus")
    tok = train_bpe([p.read_text() for p in corpus.iterdir()], 300, tmp_path / "tok.json", min_frequency=1)
    text = _text_dm(corpus, tokenizer=str(tok))
    prepare_shards(text, tmp_path / "shards", shard_tokens=50)
    shards = TokenShardDataModule(str(tmp_path / "shards"), seq_len=16)
    assert shards.vocab_size == text.vocab_size and (tmp_path / "shards" / "tokenizer.json").is_file()
    ds = shards.load_split("train")
    assert torch.equal(torch.from_numpy(ds.read(0, ds.offsets[-1]).astype(np.int64)),
                       text.load_split("train").tokens.long())


def test_uint32_shards_hold_large_ids(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    writer = _ShardWriter(tmp_path, "train", token_dtype(100_000), 3)
    values = np.array([0, 65535, 65536, 99_999, 7, 8, 9])
    writer.write(values[:4])
    writer.write(values[4:])
    writer.close()
    assert [s["tokens"] for s in writer.shards] == [3, 3, 1]
    ds = ShardWindows(tmp_path, writer.shards, "uint32", seq_len=4, stride=1)
    assert ds.read(0, 7).tolist() == values.tolist() and ds[2]["input_ids"].tolist() == [65536, 99_999, 7, 8]
    assert np.memmap(tmp_path / "train_00000.bin", dtype="<u4", mode="r").tolist() == [0, 65535, 65536]


def test_training_order_resumes_exactly_and_ranks_read_disjoint_shares(tmp_path):
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    prepare_shards(_text_dm(_corpus(tmp_path / "corpus")), tmp_path / "shards", shard_tokens=64)
    dm = TokenShardDataModule(str(tmp_path / "shards"), seq_len=8, batch_size=2)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(3)
    full = [b["index"].tolist() for b in loader]
    it = iter(loader)
    seen = [next(it)["index"].tolist() for _ in range(3)]
    state = loader.state_dict()
    resumed = TokenShardDataModule(str(tmp_path / "shards"), seq_len=8, batch_size=2).train_dataloader()
    resumed.sampler.set_epoch(3)
    resumed.load_state_dict(state)
    assert seen + [b["index"].tolist() for b in resumed] == full
    loader.sampler.set_epoch(4)
    assert [b["index"].tolist() for b in loader] != full  # a new order each epoch
    from datamodules.resumable import EpochSeededSampler

    reference = EpochSeededSampler(10_000, seed=7)  # the compact sampler keeps the resumable sampler's order
    compact = type(loader.sampler)(10_000, seed=7)
    reference.set_epoch(2)
    compact.set_epoch(2)
    assert list(compact) == list(reference)
    n = len(dm.load_split("train"))
    shares = [list(DistributedSamplerWrapper(dm.train_dataloader().sampler, num_replicas=2, rank=r, shuffle=False))
              for r in (0, 1)]
    assert set(shares[0]) | set(shares[1]) == set(range(n))  # every window, each on one rank (DistributedSampler
    assert len(set(shares[0]) & set(shares[1])) == len(shares[0]) + len(shares[1]) - n  # pads with n % 2 repeats)


def test_damaged_or_existing_folders_are_refused(tmp_path, capsys):
    corpus = _corpus(tmp_path / "corpus")
    prepare_shards(_text_dm(corpus), tmp_path / "shards", shard_tokens=64)
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        prepare_shards(_text_dm(corpus), tmp_path / "shards")
    (corpus / "zz_nul.py").write_bytes(b"text\x00more")
    with pytest.raises(ValueError, match="zz_nul.py' contains NUL bytes"):
        prepare_shards(_text_dm(corpus), tmp_path / "other")
    (corpus / "zz_nul.py").unlink()
    first = tmp_path / "shards" / "train_00000.bin"
    first.write_bytes(first.read_bytes()[:-2])
    with pytest.raises(ValueError, match="truncated or changed"):
        TokenShardDataModule(str(tmp_path / "shards"))
    with pytest.raises(FileNotFoundError, match="prepare it first"):
        TokenShardDataModule(str(tmp_path / "corpus"))
    (corpus / "zz_bad.py").write_bytes(b"\xff\xfe not utf-8")  # fails midway: nothing is left behind
    with pytest.raises(ValueError, match="not valid UTF-8"):
        prepare_shards(_text_dm(corpus), tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "shards"]


def test_prepare_command_then_fit_and_predict_from_shards(in_tmp, capsys):
    corpus = _corpus(in_tmp / "corpus", n=30)
    cfg = {"data": {"class_path": "datamodules.text.TextDataModule",
                    "init_args": {"source": "files", "paths": [str(corpus)], "seq_len": 16, "batch_size": 4}}}
    (in_tmp / "prep.yaml").write_text(yaml.safe_dump(cfg))
    main(["--config", "prep.yaml", "--out", "shards", "--shard_tokens", "500"])
    assert "wrote shards: train" in capsys.readouterr().out
    gpt = yaml.safe_load((REPO / "configs/gpt_pretrain.yaml").read_text())
    gpt["data"] = {"class_path": "datamodules.token_shards.TokenShardDataModule",
                   "init_args": {"path": "shards", "seq_len": 16, "batch_size": 4, "predict_split": "val"}}
    gpt["checkpoint"]["dirpath"] = "runs/shards/checkpoints"
    (in_tmp / "shards.yaml").write_text(yaml.safe_dump(gpt))
    tiny = ["--model.config.n_layer", "1", "--model.config.n_embd", "16", "--model.config.n_head", "2",
            "--model.sample_tokens", "0", "--trainer.enable_progress_bar", "false"]
    fit = run_cli(["fit", "--config", "shards.yaml", "--trainer.max_steps", "3", *tiny])
    assert fit.trainer.global_step == 3
    run_cli(["predict", "--config", "shards.yaml", "--ckpt_path", fit.trainer.checkpoint_callback.last_model_path,
             "--model.generation.max_new_tokens", "4", *tiny])
    scores = json.loads(next((in_tmp / "runs").rglob("predictions.json")).read_text())["scores"]
    val = TokenShardDataModule("shards", seq_len=16).load_split("val")
    assert scores["windows"] == len(val) and scores["tokens"] == 16 * len(val)


def test_fit_from_shards_resumes_mid_epoch_exactly(in_tmp):
    """Resumed from the checkpoint written after step 3 of an 8-step epoch (what a run killed there leaves),
    the run ends with the weights of the uninterrupted run: the seeded order skips the batches already used."""
    prepare_shards(_text_dm(_corpus(in_tmp / "corpus", n=30)), in_tmp / "shards", shard_tokens=300)
    gpt = yaml.safe_load((REPO / "configs/gpt_pretrain.yaml").read_text())
    gpt["data"] = {"class_path": "datamodules.token_shards.TokenShardDataModule",
                   "init_args": {"path": "shards", "seq_len": 16, "batch_size": 4, "max_windows": 32}}
    gpt["trainer"]["max_epochs"] = 2
    gpt["checkpoint"].update(dirpath="runs/full/checkpoints", every_n_train_steps=3, save_top_k=-1)
    (in_tmp / "shards.yaml").write_text(yaml.safe_dump(gpt))
    tiny = ["--model.config.n_layer", "1", "--model.config.n_embd", "16", "--model.config.n_head", "2",
            "--model.sample_tokens", "0", "--trainer.enable_progress_bar", "false", "--model.warmup_steps", "0",
            "--trainer.max_steps", "11"]
    full = run_cli(["fit", "--config", "shards.yaml", *tiny])
    assert full.trainer.global_step == 11 and len(full.trainer.train_dataloader) == 8
    step3 = in_tmp / "runs/full/checkpoints/epoch=0-step=3.ckpt"
    assert torch.load(step3, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"batches_yielded": 3}]
    resumed = run_cli(["fit", "--config", "shards.yaml", "--checkpoint.dirpath", "runs/resumed/checkpoints",
                       "--ckpt_path", str(step3), *tiny])
    assert resumed.trainer.global_step == 11
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


DDP_SCRIPT = r'''
import json, sys
import lightning as L
from datamodules import token_shards
from lightning_modules.gpt import GPTLanguageModel
from models.lm.gpt import Config

reads = []
_read = token_shards.ShardWindows.read
def counting_read(self, start, count):
    reads.append(start)
    return _read(self, start, count)
token_shards.ShardWindows.read = counting_read

class Record(L.Callback):
    def __init__(self):
        self.seen = []
    def on_train_epoch_start(self, trainer, module):
        self.seen.append([])
        reads.clear()
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen[-1] += batch["index"].tolist()
    def on_train_epoch_end(self, trainer, module):
        self.seen[-1] = {"seen": self.seen[-1], "reads": len(reads)}

L.seed_everything(0)
dm = token_shards.TokenShardDataModule(sys.argv[1], seq_len=16, batch_size=4, max_windows=24)
model = GPTLanguageModel(Config(n_layer=1, n_head=2, n_embd=16, block_size=16), sample_tokens=0)
rec = Record()
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=0, num_sanity_val_steps=0, callbacks=[rec])
trainer.fit(model, dm)
with open(f"{sys.argv[2]}.rank{trainer.global_rank}.json", "w") as f:
    json.dump(rec.seen, f)
'''


@pytest.mark.slow
def test_ddp_ranks_read_disjoint_shares_of_the_shards(tmp_path):
    from tests.cli_helpers import run_ddp

    prepare_shards(_text_dm(_corpus(tmp_path / "corpus", n=30)), tmp_path / "shards", shard_tokens=300)
    (tmp_path / "ddp_shards.py").write_text(DDP_SCRIPT)
    run_ddp([str(tmp_path / "ddp_shards.py"), str(tmp_path / "shards"), str(tmp_path / "out")], cwd=tmp_path)
    ranks = [json.loads((tmp_path / f"out.rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in (0, 1):
        a, b = (set(r[epoch]["seen"]) for r in ranks)
        assert len(a) == len(b) == 12 and not a & b and a | b == set(range(24))
        assert all(r[epoch]["reads"] == 12 for r in ranks)  # each rank read its own 12 windows, no more
    assert ranks[0][0]["seen"] != ranks[0][1]["seen"]  # reshuffled per epoch
