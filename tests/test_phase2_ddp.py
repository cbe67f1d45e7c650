"""Phase 2 LM under 2-process DDP (gloo, CPU): replicas stay in sync, the ranks train on disjoint windows,
the epoch diagnostics are reduced over both ranks and one history file and epoch checkpoint are written."""

import json

import pytest
import torch

from callbacks.phase2_diagnostics import with_script_keys
from tests.cli_helpers import run_ddp

SCRIPT = r'''
import json, sys
import lightning as L
import torch
from callbacks.phase2_diagnostics import Phase2Diagnostics
from datamodules.text import TextDataModule
from lightning_modules.phase2_lm import Phase2LanguageModel
from models.lm.phase2 import Phase2Config

class Record(L.Callback):
    def __init__(self):
        self.seen = []
    def on_train_epoch_start(self, trainer, module):
        self.seen.append([])
    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen[-1] += batch["index"].tolist()

out = sys.argv[1]
L.seed_everything(0)
dm = TextDataModule(include=["json/**"], seq_len=24, batch_size=2, max_windows=8)
cfg = Phase2Config(d_model=16, n_layers=1, n_heads=2, head_dim=8, chunk_size=8, bk_chunk_size=8)
model = Phase2LanguageModel(cfg, lr=1e-2, sample_tokens=0)
diag, rec = Phase2Diagnostics(log_every_n_batches=1, checkpoint_every_n_epochs=2), Record()
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False, default_root_dir=out,
                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    gradient_clip_val=1.0, limit_val_batches=2, callbacks=[diag, rec])
trainer.fit(model, dm)
state = {k: v.tolist() for k, v in model.model.state_dict().items()}
with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
    json.dump({"seen": rec.seen, "state": state, "history": diag.history}, f)
'''


@pytest.mark.slow
def test_ddp_two_processes_phase2(tmp_path):
    script = tmp_path / "ddp_phase2.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    run_ddp([str(script), str(out)], cwd=tmp_path)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for epoch in (0, 1):  # DistributedSampler: per epoch the ranks' windows are disjoint and cover the split
        a, b = set(ranks[0]["seen"][epoch]), set(ranks[1]["seen"][epoch])
        assert not a & b and a | b == set(range(8))
    for key, value in ranks[0]["state"].items():  # DDP kept the replicas identical
        assert torch.equal(torch.tensor(value), torch.tensor(ranks[1]["state"][key])), key
    assert ranks[0]["history"] == ranks[1]["history"]  # epoch means reduced over both ranks
    history = json.loads((out / "training_history.json").read_text())
    assert history == with_script_keys(ranks[0]["history"]) and history["epoch"] == [1, 2]
    assert (out / "checkpoints" / "checkpoint_epoch2.ckpt").is_file()
    assert not list(out.glob("**/.*.tmp-*"))  # atomic writes left no temporary file
