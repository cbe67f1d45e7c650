"""The command line: help, print_config, and a short fit of the quick-start config."""

import subprocess
import sys

import pytest

from tests.cli_helpers import REPO, run_cli


def test_fit_help_lists_subclass_options(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(["fit", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--model" in out and "--data" in out and "--checkpoint.save_last" in out


def test_print_config_resolves_short_class_names(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(["fit", "--config", str(REPO / "configs/vit_lora_digits.yaml"), "--model", "ImageClassifier",
              "--model.lora_r", "3", "--print_config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "lightning_modules.image_classifier.ImageClassifier" in out and "lora_r: 3" in out


def test_unknown_key_is_named(capsys, in_tmp):
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(REPO / "configs/vit_lora_digits.yaml"), "--model.lora_rank", "3"])
    assert "lora_rank" in capsys.readouterr().err
    assert not (in_tmp / "runs").exists()


def test_demo_config_trains_and_writes_events_and_last_ckpt(in_tmp):
    """`python -m cli fit` as a user runs it (a subprocess from another directory)."""
    cmd = [sys.executable, str(REPO / "cli.py"), "fit", "--config", str(REPO / "configs/vit_lora_digits.yaml"),
           "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]
    res = subprocess.run(cmd, cwd=in_tmp, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = in_tmp / "runs" / "vit_lora_digits" / "version_0"
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "config.yaml").is_file()
