"""A checkpoint or history write that fails (disk full, read-only folder) ends the run with one line naming the
reason and the last good checkpoint; the earlier files stay intact. Faults are the real ones: the kernel's
ENOSPC from ``/dev/full``, and torch's zip writer turning a failed write into a ``RuntimeError``."""

import errno
import io
import os
from pathlib import Path

import pytest
import torch
import yaml

import callbacks.checkpointing as checkpointing
import callbacks.phase2_diagnostics as phase2_diagnostics
from callbacks.checkpointing import AtomicCheckpointIO, CheckpointSaveError
from tests.cli_helpers import REPO, run_cli


class FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails every write with ENOSPC (as a full disk does)."""

    def __init__(self, room: int = 4096) -> None:
        self.room = room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return len(data)


def test_torch_reports_a_full_disk_as_runtime_error():
    """The premise: torch's zip writer does not raise OSError when a write fails mid-checkpoint."""
    with pytest.raises(RuntimeError):
        torch.save({"w": torch.zeros(10_000)}, FullDisk())


def _saved(tmp_path: Path) -> tuple[AtomicCheckpointIO, Path]:
    io_ = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io_.save_checkpoint({"step": 1, "w": torch.zeros(3)}, path)
    return io_, path


def test_kernel_enospc_during_a_save(tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    io_, path = _saved(tmp_path)
    # the temporary file atomic_path writes is /dev/full: every write gets the kernel's ENOSPC
    (tmp_path / f".last.ckpt.tmp-{os.getpid()}").symlink_to("/dev/full")
    with pytest.raises(CheckpointSaveError) as e:
        io_.save_checkpoint({"step": 2, "w": torch.zeros(10_000)}, path)
    assert "the disk is full" in str(e.value) and f"the last good checkpoint is {str(path)!r}" in str(e.value)
    assert "\n" not in str(e.value) and io_.load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_disk_full_inside_torchs_writer(tmp_path, monkeypatch):
    io_, path = _saved(tmp_path)
    real_open = open
    monkeypatch.setattr(checkpointing, "open", lambda p, mode: FullDisk() if "w" in mode else real_open(p, mode),
                        raising=False)
    with pytest.raises(CheckpointSaveError) as e:
        io_.save_checkpoint({"step": 2, "w": torch.zeros(10_000)}, path)
    assert isinstance(e.value.__cause__, RuntimeError)  # what torch raised
    assert "the disk is full" in str(e.value) and f"the last good checkpoint is {str(path)!r}" in str(e.value)
    assert io_.load_checkpoint(path)["step"] == 1


@pytest.mark.parametrize("message", ["[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598",
                                     "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing "
                                     "file data/0: file write failed"])
def test_torch_writer_message_alone(tmp_path, monkeypatch, message):
    io_, path = _saved(tmp_path)

    def writer_fails(obj, f, *args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(torch, "save", writer_fails)
    with pytest.raises(CheckpointSaveError) as e:
        io_.save_checkpoint({"step": 2}, path)
    assert "most often because the disk is full" in str(e.value) and "enforce fail" not in str(e.value)
    assert f"the last good checkpoint is {str(path)!r}" in str(e.value) and "\n" not in str(e.value)


def test_cli_run_whose_checkpoint_cannot_be_saved_ends_in_one_line(in_tmp, capsys, monkeypatch):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # checkpoints go to a full disk; everything else is written
        return real_save(obj, FullDisk() if isinstance(obj, dict) and "state_dict" in obj else f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as e:
        run_cli(["fit", "--config", str(REPO / "configs/vit_lora_digits.yaml"), "--model.img_size", "16",
                 "--data.image_size", "16", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
                 "--trainer.enable_progress_bar", "false", "--trainer.num_sanity_val_steps", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "could not save checkpoint" in lines[0] and "the disk is full" in lines[0], err
    assert "no checkpoint was saved before" in lines[0]


def test_phase2_history_write_failure_ends_in_one_line(in_tmp, capsys, monkeypatch, one_thread):
    callbacks = {"trainer": {"callbacks": [{"class_path": "Phase2Diagnostics",
                                            "init_args": {"log_every_n_batches": 1, "checkpoint_every_n_epochs": 0}}]}}
    (in_tmp / "phase2_test.yaml").write_text(yaml.safe_dump(callbacks))
    real = phase2_diagnostics.atomic_path
    calls = []

    def second_write_fails(path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path)

    monkeypatch.setattr(phase2_diagnostics, "atomic_path", second_write_fails)
    with pytest.raises(SystemExit) as e:
        run_cli(["fit", "--config", str(REPO / "configs/phase2_small.yaml"), "--config", "phase2_test.yaml",
                 "--model.config.d_model", "16", "--model.config.n_heads", "2", "--model.config.head_dim", "8",
                 "--model.config.n_layers", "1", "--model.config.chunk_size", "8", "--model.config.bk_chunk_size", "8",
                 "--data.seq_len", "24", "--data.batch_size", "2", "--data.max_windows", "6",
                 "--model.sample_tokens", "4", "--trainer.enable_progress_bar", "false",
                 "--trainer.limit_val_batches", "1", "--trainer.limit_train_batches", "1",
                 "--trainer.max_epochs", "3"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "could not write the training history" in lines[0], err[-2000:]
    assert "the disk is full" in lines[0] and "the last good checkpoint is" in lines[0] and "last.ckpt" in lines[0]
    history = next(in_tmp.glob("runs/phase2_test/version_0/training_history.json"))
    assert len(yaml.safe_load(history.read_text())["epoch"]) == 1  # the first epoch's file, intact
