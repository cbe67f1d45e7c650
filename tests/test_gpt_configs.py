"""Smoke tests of configs/gpt_pretrain.yaml, skip2lora_gpt.yaml and lora_gpt.yaml through the CLI."""

from pathlib import Path

import pytest
import torch

from models.lm.gpt import load_pretrained
from tests.cli_helpers import REPO, run_cli

FAST = ["--data.max_windows", "16", "--data.batch_size", "8", "--data.seq_len", "32",
        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.log_every_n_steps", "1",
        "--model.sample_tokens", "8"]



def pretrain(tmp: Path) -> Path:
    run_cli(["fit", "--config", str(REPO / "configs/gpt_pretrain.yaml"), "--trainer.max_steps", "3", *FAST])
    ckpt = tmp / "runs" / "gpt_pretrain" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


def test_pretrain_then_skip2lora_with_cache_then_lora(in_tmp):
    ckpt = pretrain(in_tmp)
    run = run_cli(["fit", "--config", str(REPO / "configs/skip2lora_gpt.yaml"), "--model.pretrained_path", str(ckpt),
                "--trainer.max_epochs", "2", *FAST])
    metrics = run.trainer.callback_metrics
    assert metrics["skip_cache/hit_rate"] == 1.0 and metrics["skip_cache/filled"] == 16
    model = run.model.model
    assert model.skip_indices == [0, 1, 2, 3]
    # The backbone is exactly the pre-trained one; only the branches moved.
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(model.blocks[2].mlp.fc.weight, state["model.blocks.2.mlp.fc.weight"])
    assert any(p.abs().sum() > 0 for n, p in model.skip2lora.named_parameters() if "lora_B" in n)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(in_tmp / "runs" / "skip2lora_gpt" / "version_0"))
    events.Reload()
    assert "samples/text_summary" in events.Tags()["tensors"]  # generated text to read in TensorBoard
    assert {"train/loss", "val/loss", "val/perplexity", "time/train_epoch_s", "skip_cache/hit_rate"} <= set(
        events.Tags()["scalars"]
    )

    lora = run_cli(["fit", "--config", str(REPO / "configs/lora_gpt.yaml"), "--model.pretrained_path", str(ckpt),
                 "--trainer.max_steps", "2", *FAST])
    trainable = sum(p.numel() for p in lora.model.parameters() if p.requires_grad)
    skip_trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad)
    assert trainable == skip_trainable == 8192  # the configs compare equal parameter budgets
    load_pretrained(lora.model.model, ckpt)  # still loadable after LoRA injection


def test_skip2lora_config_without_pretraining_says_what_to_run(in_tmp, capsys):
    with pytest.raises((SystemExit, FileNotFoundError, ValueError)) as e:  # jsonargparse wraps it
        run_cli(["fit", "--config", str(REPO / "configs/skip2lora_gpt.yaml"), *FAST])
    text = str(e.value) + capsys.readouterr().err
    assert "runs/gpt_pretrain/checkpoints/last.ckpt" in text
    assert "python -m cli fit --config configs/gpt_pretrain.yaml" in text
    assert not (in_tmp / "runs").exists()
