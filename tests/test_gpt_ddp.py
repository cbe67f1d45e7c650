"""Skip-Cache under 2-process DDP (gloo, CPU): ranks see different samples each epoch, results stay exact."""

import json
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import run_ddp

SCRIPT = r'''
import json, sys
import lightning as L
import torch
from datamodules.text import TextDataModule
from lightning_modules.gpt import GPTLanguageModel
from models.lm.gpt import Config

class Record(L.Callback):
    """Per-rank record of the sample indices seen and the cache's hit counts, per epoch."""
    def __init__(self):
        self.seen, self.stats = [], []
    def on_train_epoch_start(self, trainer, module):
        self.seen.append([])
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen[-1] += batch["index"].tolist()
    def on_train_epoch_end(self, trainer, module):
        c = module.cache
        self.stats.append(None if c is None else [c.hits, c.misses])

skip_cache, out = sys.argv[1] == "1", sys.argv[2]
L.seed_everything(0)
dm = TextDataModule(include=["json/**"], seq_len=16, batch_size=4, max_windows=24)
cfg = Config(n_layer=2, n_head=2, n_embd=16, block_size=16, skip2lora_enabled=True, skip2lora_r=4)
model = GPTLanguageModel(cfg, skip_cache=skip_cache, lr=1e-2)
rec = Record()
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=1, callbacks=[rec])
trainer.fit(model, dm)
state = {k: v.tolist() for k, v in model.model.skip2lora.state_dict().items()}
with open(f"{out}.rank{trainer.global_rank}.json", "w") as f:
    json.dump({"seen": rec.seen, "stats": rec.stats, "state": state,
               "val_loss": float(trainer.callback_metrics["val/loss"])}, f)
'''


def _run(tmp_path: Path, skip_cache: bool) -> list[dict]:
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    out = tmp_path / f"cache{int(skip_cache)}"
    run_ddp([str(script), str(int(skip_cache)), str(out)], cwd=tmp_path)
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_ddp_two_processes_cached_equals_uncached(tmp_path):
    cached = _run(tmp_path, True)
    plain = _run(tmp_path, False)
    for epoch in (0, 1):  # DistributedSampler: the ranks' samples are disjoint and cover the set
        a, b = set(cached[0]["seen"][epoch]), set(cached[1]["seen"][epoch])
        assert not a & b and a | b == set(range(24))
    assert any(set(r["seen"][0]) != set(r["seen"][1]) for r in cached)  # reshuffled between epochs
    for r in cached:
        hits0, misses0 = r["stats"][0]
        hits1, misses1 = r["stats"][1]
        assert hits0 == 0 and misses0 == 12
        assert hits1 == len(set(r["seen"][1]) & set(r["seen"][0])) and hits1 + misses1 == 12
    assert cached[0]["state"] == cached[1]["state"]  # DDP kept the replicas in sync
    for key, value in plain[0]["state"].items():
        torch.testing.assert_close(torch.tensor(cached[0]["state"][key]), torch.tensor(value), rtol=0, atol=1e-5)
    assert abs(cached[0]["val_loss"] - plain[0]["val_loss"]) < 1e-5
