"""Adapter-only checkpoints: a LoRA fit leaves adapter/ (trainable parameters + config), a fraction of the
Lightning checkpoint, and it loads onto a freshly built model with exactly the checkpoint's predictions."""

import pytest
import torch

from callbacks.adapter_checkpoint import load_adapter, save_adapter, trainable_state_dict
from lightning_modules.image_classifier import ImageClassifier
from tests.cli_helpers import REPO, run_cli
from tests.test_predict_images import read_predictions

CONFIG = str(REPO / "configs" / "vit_lora_digits.yaml")
QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
SMALL = dict(backbone="vit_tiny_patch16_224", img_size=16, patch_size=8,
             backbone_kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})


def test_lora_fit_writes_adapter_that_reproduces_the_checkpoint(in_tmp, one_thread, capsys):
    run_cli(["fit", "--config", CONFIG, *QUICK])
    run = in_tmp / "runs" / "vit_lora_digits" / "version_0"
    adapter = run / "adapter" / "adapter.safetensors"
    assert adapter.is_file() and (run / "adapter" / "config.yaml").is_file()
    ckpt = run / "checkpoints" / "last.ckpt"
    assert adapter.stat().st_size * 10 < ckpt.stat().st_size  # the frozen backbone is not copied
    capsys.readouterr()
    run_cli(["predict", "--config", CONFIG, "--ckpt_path", str(ckpt), "--trainer.enable_progress_bar", "false"])
    _, from_ckpt = read_predictions(capsys.readouterr().out)
    # a fresh model (the same random backbone: same seed) plus the adapter, no --ckpt_path
    run_cli(["predict", "--config", CONFIG, "--model.adapter_path", str(run / "adapter"),
             "--trainer.enable_progress_bar", "false"])
    _, from_adapter = read_predictions(capsys.readouterr().out)
    assert from_adapter == from_ckpt


def test_adapter_with_other_settings_is_refused_in_one_line(in_tmp, capsys):
    model = ImageClassifier(**SMALL, lora_r=4)
    save_adapter(model, in_tmp / "a")
    with pytest.raises(ValueError, match="other shapes"):
        ImageClassifier(**SMALL, lora_r=2, adapter_path=str(in_tmp / "a"))
    with pytest.raises(ValueError, match="has tensors the model lacks"):
        load_adapter(ImageClassifier(**SMALL, finetune="head"), in_tmp / "a")
    save_adapter(ImageClassifier(**SMALL, finetune="head"), in_tmp / "h")
    with pytest.raises(ValueError, match="lacks trainable parameters"):
        ImageClassifier(**SMALL, adapter_path=str(in_tmp / "h"))
    with pytest.raises(FileNotFoundError):
        ImageClassifier(**SMALL, adapter_path=str(in_tmp / "missing"))


def test_adapter_round_trip_is_exact(in_tmp):
    torch.manual_seed(0)
    trained = ImageClassifier(**SMALL)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    save_adapter(trained, in_tmp / "a")
    torch.manual_seed(0)  # the same (random) backbone, as a fresh build from the same local weights gives
    fresh = ImageClassifier(**SMALL, adapter_path=str(in_tmp / "a"))
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(fresh.eval()(x), trained.eval()(x))
    assert set(trainable_state_dict(fresh)) == {k for k, p in trained.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("config", ["sema_adapter", "sema_nested"])
def test_continual_adapter_reproduces_the_checkpoint(config, in_tmp, one_thread, capsys):
    """SEMA adds adapters during the sequence: the adapter file carries the layout and the sequence state."""
    from tests.continual_helpers import QUIET, TINY_DATA, TINY_MODEL

    extra = ["--model.expansion_layers", "[-1]"] if config == "sema_adapter" else []
    common = ["--config", config, *TINY_MODEL, *TINY_DATA, *extra]
    run_cli(["fit", *common, *QUIET])
    run = in_tmp / "runs" / config / "version_0"
    adapter, ckpt = run / "adapter" / "adapter.safetensors", run / "checkpoints" / "last.ckpt"
    assert adapter.is_file() and adapter.stat().st_size * 2 < ckpt.stat().st_size
    capsys.readouterr()
    run_cli(["predict", *common, "--ckpt_path", str(ckpt), "--trainer.enable_progress_bar", "false"])
    _, from_ckpt = read_predictions(capsys.readouterr().out)
    run_cli(["predict", *common, "--model.adapter_path", str(run / "adapter"), "--trainer.enable_progress_bar",
             "false"])
    _, from_adapter = read_predictions(capsys.readouterr().out)
    assert from_adapter == from_ckpt
