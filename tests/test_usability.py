"""Usability of the command line: the module's own optimizers, typos, names."""

import pytest

from tests.cli_helpers import REPO, run_cli


@pytest.mark.parametrize("option", [["--optimizer", "SGD"], ["--lr_scheduler", "StepLR"],
                                    ["--optimizer.class_path", "torch.optim.SGD"]])
def test_cli_level_optimizer_is_refused(option, in_tmp, capsys):
    """A CLI-level optimizer would silently replace the module's own (Nested LoRA's fast/slow pair)."""
    with pytest.raises(SystemExit) as e:
        run_cli(["fit", "--config", str(REPO / "configs/sema_nested.yaml"), *option])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.lower().startswith("error: unrecognized arguments: --")
    assert "each model configures its own optimizers" in err
    assert not (in_tmp / "runs").exists()


def test_fit_help_has_no_optimizer_group(capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--optimizer " not in out and "--lr_scheduler" not in out


def test_option_prefix_is_not_taken_and_the_full_name_is_suggested(in_tmp, capsys):
    """``--trainer.max_epoch 1`` was silently taken as ``max_epochs`` by argparse's prefix matching."""
    with pytest.raises(SystemExit) as e:
        run_cli(["fit", "--config", str(REPO / "configs/vit_lora_digits.yaml"), "--trainer.max_epoch", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments: --trainer.max_epoch" in err.lower()
    assert "did you mean --trainer.max_epochs" in err
    assert not (in_tmp / "runs").exists()


@pytest.mark.parametrize("key,typo,right", [("--model", "ImageClasifier", "ImageClassifier"),
                                            ("--data", "DigitDataModule", "DigitsDataModule")])
def test_class_name_typo_gets_did_you_mean(key, typo, right, in_tmp, capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(REPO / "configs/vit_lora_digits.yaml"), key, typo])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no class '{typo}'; did you mean {right}" in err


def test_timm_name_typo_suggests_names(in_tmp, capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", str(REPO / "configs/vit_lora_digits.yaml"), "--model.backbone",
                 "vit_tinny_patch16_224"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean: vit_tiny_patch16_224" in err
