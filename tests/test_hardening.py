"""Issue 13: resume/predict safety, in-place resume for every config, cleanup after early failures, save
failures, and the text splits. Tiny runs (a few steps) through the in-process CLI."""

import errno
import os
import shutil

import lightning as L
import pytest
import torch

from callbacks.checkpointing import AtomicCheckpointIO, CheckpointSaveError
from datamodules.text import TextDataModule
from tests.cli_helpers import REPO, run_cli

DIGITS = str(REPO / "configs/vit_lora_digits.yaml")
GPT = str(REPO / "configs/gpt_pretrain.yaml")
TINY_DIGITS = ["--model.img_size", "16", "--data.image_size", "16", "--data.batch_size", "256",
               "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
               "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
TINY_GPT = ["--data.max_windows", "16", "--data.batch_size", "8", "--data.seq_len", "32",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--model.sample_tokens", "4",
            "--trainer.log_every_n_steps", "1"]


def snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def fails(capsys, args) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len([ln for ln in err.splitlines() if ln.startswith("error:")]) == 1 and "Traceback" not in err, err
    return err


class RaiseAtFitStart(L.Callback):
    """Fails after the run folder exists (the logger made it), before the first batch."""

    def on_train_start(self, trainer, pl_module):
        raise RuntimeError("injected failure before the first batch")


def test_resume_with_other_settings_is_refused_and_the_run_is_untouched(in_tmp, capsys):
    run_cli(["fit", "--config", DIGITS, *TINY_DIGITS, "--trainer.max_steps", "2"])
    run = in_tmp / "runs/vit_lora_digits/version_0"
    ckpt_dir = run / "checkpoints"
    stale = ckpt_dir / ".last.ckpt.tmp-4194999"  # left by a save that was killed (no such pid)
    stale.write_bytes(b"partial")
    before = snapshot(in_tmp / "runs")
    err = fails(capsys, ["fit", "--config", DIGITS, *TINY_DIGITS, "--trainer.max_steps", "4", "--ckpt_path", "last",
                         "--model.lora_r", "4", "--data.val_fraction", "0.2"])
    assert "model.lora_r: 8 -> 4" in err and "data.val_fraction: 0.15 -> 0.2" in err, err
    assert snapshot(in_tmp / "runs") == before  # config.yaml, logs, checkpoints, even the stale temp file
    # Opting in: accepted, the config's value is used, resumed in place; config.yaml is kept, the temp file goes.
    app = run_cli(["fit", "--config", DIGITS, *TINY_DIGITS, "--trainer.max_steps", "4", "--ckpt_path", "last",
                   "--model.weight_decay", "0.01", "--allow_config_change", "true"])
    assert app.trainer.global_step == 4 and app.model.hparams.weight_decay == 0.01
    assert not (in_tmp / "runs/vit_lora_digits/version_1").exists()
    assert (run / "config.yaml").read_bytes() == before["vit_lora_digits/version_0/config.yaml"]
    assert (run / "config.resume-1.yaml").is_file() and not stale.exists()


def test_error_before_the_first_batch_removes_the_new_run_folder(in_tmp, capsys):
    (in_tmp / "runs/vit_lora_digits/version_0").mkdir(parents=True)
    (in_tmp / "runs/vit_lora_digits/version_0/keep.txt").write_text("an earlier run")
    before = snapshot(in_tmp / "runs")
    err = fails(capsys, ["fit", "--config", DIGITS, *TINY_DIGITS, "--trainer.max_steps", "1",
                         "--trainer.callbacks+=tests.test_hardening.RaiseAtFitStart"])
    assert "RuntimeError: injected failure before the first batch" in err
    assert snapshot(in_tmp / "runs") == before and not (in_tmp / "runs/vit_lora_digits/version_1").exists()


def test_predict_refuses_untrained_weights(in_tmp, capsys):
    err = fails(capsys, ["predict", "--config", DIGITS, *TINY_DIGITS])
    assert "predict needs trained weights: pass --ckpt_path" in err
    assert not (in_tmp / "runs").exists()


def test_gpt_pretrain_resumes_in_place_and_predict_scores_text(in_tmp, capsys):
    run_cli(["fit", "--config", GPT, *TINY_GPT, "--trainer.max_steps", "2"])
    ckpt_dir = in_tmp / "runs/gpt_pretrain/checkpoints"
    # A second fresh run would write last-v1.ckpt beside the first one's last.ckpt: refused, nothing written.
    before = snapshot(in_tmp / "runs")
    err = fails(capsys, ["fit", "--config", GPT, *TINY_GPT, "--trainer.max_steps", "2"])
    assert "already holds checkpoints of an earlier run" in err and "--ckpt_path last" in err
    assert snapshot(in_tmp / "runs") == before
    app = run_cli(["fit", "--config", GPT, *TINY_GPT, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert app.trainer.global_step == 4
    assert sorted(p.name for p in ckpt_dir.glob("last*.ckpt")) == ["last.ckpt"]
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 4
    assert sorted(p.name for p in (in_tmp / "runs/gpt_pretrain").glob("version_*")) == ["version_0"]  # in place
    # predict: the loss of given text under the checkpoint, and a generated sample
    (in_tmp / "mine.txt").write_text("def hello(name):\n    return 'hello ' + name\n" * 20)
    capsys.readouterr()
    run_cli(["predict", "--config", GPT, *TINY_GPT, "--data.source", "files", "--data.paths", "[mine.txt]",
             "--ckpt_path", str(ckpt_dir / "last.ckpt")])
    out = capsys.readouterr().out
    assert "predict: 16 windows" in out and "nats/token" in out and "--- prompt: 'def '\ndef " in out, out
    assert list((in_tmp / "runs/gpt_pretrain").glob("version_*/predictions.txt"))


def test_failed_save_names_the_reason_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def disk_full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointSaveError) as e:
        io.save_checkpoint({"step": 2}, path)
    assert "the disk is full" in str(e.value) and f"the last good checkpoint is {str(path)!r}" in str(e.value)
    assert "\n" not in str(e.value) and io.load_checkpoint(path)["step"] == 1


def _corpus(root, n=20):
    for i in range(n):
        (root / "pkg" / f"m{i:02d}.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / "pkg" / f"m{i:02d}.txt").write_text(f"module {i}\n" * 30)


def test_text_splits_hash_the_path_relative_to_the_data_root(tmp_path):
    """Moving the data folder keeps every file in its split (the absolute path used to decide it)."""
    _corpus(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere/b")
    for entry in ("{}/pkg", "{}/pkg/*.txt", "{}/**/*.txt"):
        one = TextDataModule(source="files", paths=[entry.format(tmp_path / "a")], val_fraction=0.3, seq_len=8)
        two = TextDataModule(source="files", paths=[entry.format(tmp_path / "elsewhere/b")], val_fraction=0.3,
                             seq_len=8)
        names = [{s: [p.name for p in v] for s, v in dm.split_files.items()} for dm in (one, two)]
        assert names[0] == names[1] and names[0]["val"] and names[0]["train"], entry


def test_single_file_gets_validation_by_position_or_val_paths(tmp_path):
    text = "".join(f"line {i}\n" for i in range(400))
    (tmp_path / "one.txt").write_text(text)
    dm = TextDataModule(source="files", paths=[str(tmp_path / "one.txt")], split_by="position", val_fraction=0.2,
                        test_fraction=0.1, seq_len=8)
    dm.setup()
    data = text.encode()
    n = len(data)
    lengths = {s: len(dm.datasets[s].tokens) for s in ("train", "val", "test")}
    assert lengths == {"train": round(0.7 * n), "val": round(0.9 * n) - round(0.7 * n), "test": n - round(0.9 * n)}
    assert bytes(dm.datasets["val"].tokens.tolist()) == data[round(0.7 * n):round(0.9 * n)]  # disjoint, in order
    (tmp_path / "held_out.txt").write_text("other text\n" * 40)
    dm = TextDataModule(source="files", paths=[str(tmp_path / "one.txt")], val_paths=[str(tmp_path / "held_out.txt")],
                        test_fraction=0, seq_len=8)
    assert [p.name for p in dm.split_files["train"]] == ["one.txt"]
    assert [p.name for p in dm.split_files["val"]] == ["held_out.txt"]
    with pytest.raises(ValueError, match="share 1 file"):
        TextDataModule(source="files", paths=[str(tmp_path)], val_paths=[str(tmp_path / "held_out.txt")], seq_len=8)


def test_files_source_ignores_the_stdlib_include_with_a_warning(tmp_path):
    _corpus(tmp_path)
    with pytest.warns(UserWarning, match="`include`.*only used with `source: python_stdlib`"):
        dm = TextDataModule(source="files", include=["*.py"], paths=[str(tmp_path / "pkg")], seq_len=8)
    assert sum(len(v) for v in dm.split_files.values()) == 20


def test_sigkill_leftover_temporaries_are_removed_but_live_ones_kept(tmp_path):
    from models.utils.atomic import clean_stale_temporaries

    dead, live = tmp_path / ".last.ckpt.tmp-4194999", tmp_path / f".last.ckpt.tmp-{os.getppid()}"
    for p in (dead, live, tmp_path / "last.ckpt"):
        p.write_bytes(b"x")
    assert clean_stale_temporaries(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "last.ckpt"])
