"""The digits quick start starts from adaptlab's offline pre-trained glyph backbone (tiny pre-training here)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cli_helpers import run_cli

TINY_PRETRAIN = ["--model.pretrain.classes", "4", "--model.pretrain.images_per_class", "4", "--model.pretrain.steps",
                 "2", "--model.pretrain.batch_size", "8"]
QUICK = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_pretrained_quick_start_loads_the_glyph_backbone(in_tmp, one_thread, capsys):
    config = "vit_lora_digits_pretrained"
    cli = run_cli(["fit", "--config", config, *TINY_PRETRAIN, *QUICK])
    built = list((in_tmp / "data" / "glyph_vit").glob("*/backbone.safetensors"))
    assert len(built) == 1 and Path(cli.model.backbone_file).resolve() == built[0]
    weights = load_file(str(built[0]))
    state = cli.model.backbone.state_dict()
    assert torch.equal(state["patch_embed.proj.weight"], weights["patch_embed.proj.weight"])  # frozen: unchanged
    qkv = [v for k, v in state.items() if k.startswith("blocks.0.attn.qkv") and k.endswith("weight")
           and v.shape == weights["blocks.0.attn.qkv.weight"].shape]
    assert qkv and torch.equal(qkv[0], weights["blocks.0.attn.qkv.weight"])
    # the second run reuses the cached backbone (no second build) and predict works from the checkpoint
    ckpt = in_tmp / "runs" / config / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    run_cli(["predict", "--config", config, *TINY_PRETRAIN, "--ckpt_path", str(ckpt),
             "--trainer.enable_progress_bar", "false"])
    out = capsys.readouterr().out
    assert "[glyph backbone] building" not in out
    assert f"predict: wrote {len(cli.datamodule.test_set)} class predictions" in out


def test_pretrain_and_pretrained_file_are_exclusive(in_tmp, capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", "vit_lora_digits_pretrained", "--model.pretrained_file", str(Path("x.pt")),
                 *QUICK])
    assert "exclusive" in capsys.readouterr().err and not (in_tmp / "runs").exists()
