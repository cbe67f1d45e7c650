"""Phase 1 LM under 2-process DDP (gloo, CPU), gradient checkpointing on: parameters and buffers (AR-SSM's running
gate maxima, max-reduced over ranks) stay identical on both replicas."""

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
from lightning_modules.phase1_lm import Phase1LanguageModel
from models.lm.phase1 import Phase1Config

devices, out = int(sys.argv[1]), sys.argv[2]
L.seed_everything(0)
dm = TextDataModule(include=["json/**"], seq_len=16, batch_size=8 // devices, max_windows=16)
cfg = Phase1Config(d_model=16, n_layers=2, n_seq=16, ar_ssm_max_rank=4, ar_ssm_min_rank=2, htt_rank=4,
                   intermediate_size=32, bk_chunk_size=8, use_gradient_checkpointing=True)
model = Phase1LanguageModel(cfg, lr=1e-2, sample_tokens=0)
trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=3,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    limit_val_batches=1, use_distributed_sampler=devices > 1)
trainer.fit(model, dm)
state = {k: v.tolist() for k, v in model.model.state_dict().items()
         if isinstance(v, torch.Tensor) and v.is_floating_point()}
with open(f"{out}.rank{trainer.global_rank}.json", "w") as f:
    json.dump({"state": state, "val_loss": float(trainer.callback_metrics["val/loss"])}, f)
'''


@pytest.mark.slow
def test_ddp_two_processes_keeps_replicas_identical(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    out = tmp_path / "ddp"
    run_ddp([str(script), "2", str(out)], cwd=tmp_path)
    ranks = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["state"] == ranks[1]["state"]  # gradients all-reduced, buffers broadcast
    assert torch.isfinite(torch.tensor(ranks[0]["val_loss"]))
    assert any(torch.tensor(v).abs().sum() > 0 for k, v in ranks[0]["state"].items() if "bk.out_proj" in k)
