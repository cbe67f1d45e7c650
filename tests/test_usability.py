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
    assert err.count("\n") == 1 and err.startswith("error: unrecognized arguments: --")
    assert "each model configures its own optimizers" in err
    assert not (in_tmp / "runs").exists()


def test_fit_help_has_no_optimizer_group(capsys):
    with pytest.raises(SystemExit):
        run_cli(["fit", "--help"])
    out = capsys.readouterr().out
    assert "--optimizer " not in out and "--lr_scheduler" not in out
