"""Checkpoints: atomic writes, and exact resume after the process is killed mid-epoch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from callbacks.checkpointing import AtomicCheckpointIO
from datamodules.resumable import EpochSeededSampler, ResumableDataLoader
from tests.cli_helpers import run_cli

REPO = Path(__file__).resolve().parents[1]


def run_cli_process(cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    """The robust config, shrunk: 16x16 images, 5 batches of 256 per epoch, 2 epochs, a checkpoint every 3 steps."""
    cmd = [sys.executable, str(REPO / "cli.py"), "fit", "--config", str(REPO / "configs/vit_lora_digits_robust.yaml"),
           "--model.img_size", "16", "--data.image_size", "16", "--data.batch_size", "256",
           "--checkpoint.every_n_train_steps", "3", "--trainer.limit_val_batches", "1",
           "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
           "--trainer.deterministic", "true", "--trainer.callbacks+=tests.recovery_helpers.FaultInjector", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """The final weights of the shrunk robust run, uninterrupted (shared by the kill and SIGTERM tests)."""
    a = tmp_path_factory.mktemp("uninterrupted")
    res = run_cli_process(a)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(a / "final.pt", weights_only=False)


def assert_same_final_weights(full: dict, resumed: dict) -> None:
    assert full["global_step"] == resumed["global_step"] == 10
    assert full["weights"].keys() == resumed["weights"].keys()
    for name, w in full["weights"].items():
        assert torch.equal(w, resumed["weights"][name]), name


@pytest.mark.slow
def test_killed_mid_epoch_then_resumed_equals_uninterrupted_run(tmp_path, uninterrupted):
    (b := tmp_path / "killed").mkdir()
    res = run_cli_process(b, "--trainer.callbacks.kill_at_step", "7")  # mid epoch 1; last checkpoint at step 6
    assert res.returncode == 17, res.stderr[-3000:]
    ckpt_dir = b / "runs/vit_lora_digits_robust/version_0/checkpoints"
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["global_step"] == 6
    assert not list(ckpt_dir.glob(".*tmp*")), "no temporary files left behind"
    res = run_cli_process(b, "--ckpt_path", "last")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "not resumable" not in res.stderr  # Lightning's warning for plain DataLoaders
    assert not (b / "runs/vit_lora_digits_robust/version_1").exists()  # resumed in place
    full, resumed = uninterrupted, torch.load(b / "final.pt", weights_only=False)
    assert_same_final_weights(full, resumed)
    # the callbacks' own state came back from the checkpoint: 10 good batches in all, not 4
    assert resumed["callbacks"]["StabilityMonitor"]["good_batches"] == 10
    assert resumed["callbacks"]["StabilityMonitor"]["history"] == full["callbacks"]["StabilityMonitor"]["history"]


def test_sigterm_saves_a_resumable_checkpoint_and_exits_nonzero(tmp_path, uninterrupted):
    """SIGTERM while step 4 runs (mid epoch 0; the last periodic checkpoint is at step 3): the run saves last.ckpt
    after that step, exits 143, and resuming it ends with exactly the uninterrupted run's weights."""
    res = run_cli_process(tmp_path, "--trainer.callbacks.sigterm_at_step", "4")
    assert res.returncode == 143, res.stderr[-3000:]
    assert "stopped by SIGTERM" in res.stderr and "--ckpt_path last" in res.stderr
    ckpt_dir = tmp_path / "runs/vit_lora_digits_robust/version_0/checkpoints"
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)["global_step"] == 5  # not the periodic step 3
    assert not (tmp_path / "final.pt").exists()  # fit did not end
    res = run_cli_process(tmp_path, "--ckpt_path", "last")
    assert res.returncode == 0, res.stderr[-3000:]
    assert not (tmp_path / "runs/vit_lora_digits_robust/version_1").exists()  # resumed in place
    assert (tmp_path / "runs/vit_lora_digits_robust/version_0/config.resume-1.yaml").is_file()  # original kept
    assert_same_final_weights(uninterrupted, torch.load(tmp_path / "final.pt", weights_only=False))


def test_atomic_save_never_leaves_a_corrupt_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def crash(obj, f, *a, **k):  # a crash half-way through writing
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    monkeypatch.undo()
    io.save_checkpoint({"step": 2}, path)
    assert io.load_checkpoint(path)["step"] == 2


def test_resumable_loader_skips_consumed_batches_in_the_same_order():
    data = list(range(10))
    loader = ResumableDataLoader(data, batch_size=3, sampler=EpochSeededSampler(10, seed=5))
    loader.sampler.set_epoch(2)
    full = [b.tolist() for b in loader]
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"batches_yielded": 2}
    fresh = ResumableDataLoader(data, batch_size=3, sampler=EpochSeededSampler(10, seed=5))
    fresh.sampler.set_epoch(2)
    fresh.load_state_dict(state)
    assert [b.tolist() for b in fresh] == full[2:]
    assert [b.tolist() for b in fresh] == full  # only the first pass after loading skips
    fresh.load_state_dict({"batches_yielded": 4})  # saved on the last batch: next epoch starts at 0
    assert len([b for b in fresh]) == 4
    loader.sampler.set_epoch(3)
    assert [b.tolist() for b in loader] != full and sorted(sum((b.tolist() for b in loader), [])) == data


def test_robust_config_smoke(in_tmp):
    """configs/vit_lora_digits_robust.yaml: a few steps in-process, callbacks wired from YAML."""
    app = run_cli(["fit", "--config", str(REPO / "configs/vit_lora_digits_robust.yaml"), "--trainer.max_steps", "3",
                        "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"])
    names = {type(cb).__name__ for cb in app.trainer.callbacks}
    assert {"OOMRecovery", "StabilityMonitor"} <= names
    assert type(app.trainer.strategy.checkpoint_io).__name__ == "AtomicCheckpointIO"
    assert app.trainer.global_step == 3
    assert (in_tmp / "runs/vit_lora_digits_robust/version_0/checkpoints/last.ckpt").is_file()
