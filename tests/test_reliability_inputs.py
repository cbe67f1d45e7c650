"""Issue 18, item 7: inputs that used to train silently wrong or end in a traceback, each refused in one
``error:`` line before anything is written (or handled sensibly), through the in-process CLI."""

import pytest

from tests.cli_helpers import REPO, run_cli

DIGITS = str(REPO / "configs/vit_lora_digits.yaml")
PHASE2 = str(REPO / "configs/phase2_small.yaml")


def fails(in_tmp, capsys, args) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert not (in_tmp / "runs").exists()
    return lines[0]


def test_phase2_without_any_length_is_refused(in_tmp, capsys):
    """max_epochs -1 (no limit) and no max_steps: the cosine schedule has no length (it overflowed)."""
    err = fails(in_tmp, capsys, ["fit", "--config", PHASE2, "--trainer.max_epochs=-1"])
    assert "trainer.max_epochs=-1 (no limit) leaves Phase 2's cosine learning-rate schedule without a length" in err


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_evaluating_untrained_weights_is_refused_like_predict(in_tmp, capsys, subcommand):
    err = fails(in_tmp, capsys, [subcommand, "--config", DIGITS])
    assert f"{subcommand} needs trained weights: pass --ckpt_path" in err


def test_tilde_in_ckpt_path_is_the_home_folder(in_tmp, capsys, monkeypatch):
    import torch

    monkeypatch.setenv("HOME", str(in_tmp / "home"))
    (in_tmp / "home").mkdir()
    torch.save({"weight": torch.zeros(2)}, in_tmp / "home" / "weights.ckpt")
    err = fails(in_tmp, capsys, ["fit", "--config", DIGITS, "--ckpt_path", "~/weights.ckpt"])
    assert f"ckpt_path '{in_tmp / 'home' / 'weights.ckpt'}' is not a Lightning checkpoint" in err


def test_a_partial_continual_sequence_is_announced_up_front():
    """sema_nested with --trainer.max_epochs 3 trains task 0 only (3 epochs per task): said before training. SEMA
    layer by layer has one extra phase per later task (2 expandable layers), counted in the sequence."""
    from types import SimpleNamespace

    from datamodules.continual import ClassIncrementalDataModule
    from lightning_modules.continual_vit import ContinualClassifier

    dm = ClassIncrementalDataModule("glyphs", glyph_classes=10, glyph_images_per_class=4, init_cls=2, increment=2,
                                    epochs_per_task=3)
    tiny = dict(img_size=16, patch_size=8, backbone_kwargs=dict(depth=2, embed_dim=16, num_heads=2))
    module = ContinualClassifier(**tiny)
    trainer = SimpleNamespace(fit_loop=SimpleNamespace(max_epochs=3), max_steps=-1)
    with pytest.warns(UserWarning, match=r"max_epochs=3 stops the sequence part-way, in task 0 of 5 \(the sequence "
                                         r"is 5 tasks x 3 data.epochs_per_task = 15 epochs\)"):
        assert module.check_trainer(trainer, dm) is False
    trainer.fit_loop.max_epochs = 15
    assert module.check_trainer(trainer, dm) is False
    trainer.fit_loop.max_epochs = -1
    assert module.check_trainer(trainer, dm) is True
    sema = ContinualClassifier(adapter_type="sema", expansion_layers=[0, 1], expansion_order="layerwise",
                               sema_descriptor_hidden=8, **tiny)
    trainer.fit_loop.max_epochs = 15
    with pytest.warns(UserWarning, match=r"max_epochs=15 stops the sequence part-way, in task 2 of 5 \(the sequence "
                                         r"is 5 tasks x 3 data.epochs_per_task \+ 4 extra phases of sema x 3 = 27 "
                                         r"epochs\)"):
        assert sema.check_trainer(trainer, dm) is False
    trainer.fit_loop.max_epochs = 28
    with pytest.raises(ValueError, match=r"trainer.max_epochs=28 exceeds it"):
        sema.check_trainer(trainer, dm)
    trainer.fit_loop.max_epochs = 27
    assert sema.check_trainer(trainer, dm) is False and dm.num_epochs == 27


def test_a_killed_writers_temporary_file_is_cleaned_even_when_its_pid_is_reused(tmp_path):
    """The writer of ``.last.ckpt.tmp-<pid>`` is judged by the lock it holds while writing, not by its pid: a
    process killed during its very first checkpoint write may be followed by one with the same pid (containers
    start from the same pids), which used to keep the file forever."""
    import os

    from models.utils.atomic import atomic_path, clean_stale_temporaries

    stale = tmp_path / f".last.ckpt.tmp-{os.getpid()}"  # as left by a killed process that had this pid
    stale.write_bytes(b"half a checkpoint")
    assert clean_stale_temporaries(tmp_path) == [stale] and not stale.exists()
    with atomic_path(tmp_path / "last.ckpt") as tmp:  # a live writer's file is kept
        tmp.write_bytes(b"being written")
        assert clean_stale_temporaries(tmp_path) == [] and tmp.exists()
    assert (tmp_path / "last.ckpt").read_bytes() == b"being written"


def test_runs_without_a_logger_get_their_own_config_folder(in_tmp):
    """--trainer.logger false used to put every config's checkpoints (and config.yaml) in runs/checkpoints."""
    tiny = ["--config", DIGITS, "--model.img_size", "16", "--data.image_size", "16", "--data.batch_size", "64",
            "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0", "--trainer.max_epochs", "5",
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false"]
    run_cli(["fit", *tiny, "--trainer.max_steps", "1"])
    run = in_tmp / "runs/vit_lora_digits/version_0"
    assert (run / "checkpoints/last.ckpt").is_file() and (run / "config.yaml").is_file()
    assert sorted(p.name for p in (in_tmp / "runs").iterdir()) == ["vit_lora_digits"]
    app = run_cli(["fit", *tiny, "--trainer.max_steps", "2", "--ckpt_path", "last"])  # resumed in its folder
    assert app.trainer.global_step == 2 and (run / "config.resume-1.yaml").is_file()
    assert sorted(p.name for p in (in_tmp / "runs/vit_lora_digits").iterdir()) == ["version_0"]


@pytest.mark.parametrize("module, kwargs", [
    ("phase1_lm", {"phase1": {"preset": "8gb"}}),
    ("phase2_lm", {"config": {"d_model": 1024, "n_layers": 12, "n_heads": 16, "head_dim": 64}}),
])
def test_a_gpu_sized_model_on_a_cpu_is_announced_before_it_is_built(monkeypatch, module, kwargs):
    import importlib

    import torch

    lm = importlib.import_module(f"lightning_modules.{module}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    built = lm.Phase1LM if module == "phase1_lm" else lm.Phase2LM

    def not_built(config):  # the warning must come before the minutes of building
        raise RuntimeError(f"stopped before building {built.__name__}")

    monkeypatch.setattr(lm, built.__name__, not_built)
    if module == "phase2_lm":
        kwargs = {"config": lm.Phase2Config(**kwargs["config"])}
    cls = lm.Phase1LanguageModel if module == "phase1_lm" else lm.Phase2LanguageModel
    with pytest.warns(UserWarning, match=r"a GPU-sized preset, and this machine has no GPU"):
        with pytest.raises(RuntimeError, match="stopped before building"):
            cls(**kwargs)
