"""Runs of one config at once: an early failure removes exactly the files its own process created (recorded,
never by difference with a snapshot), each run reserves its own ``version_N``, and a run folder is locked while
a process trains in it (two ``--ckpt_path last`` resumes: the second is refused in one line; the lock goes with
the process, SIGKILL included)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from models.utils.run_folder import LOCK_NAME, RunFolder, RunFolderBusy
from tests.cli_helpers import REPO, run_cli

DIGITS = str(REPO / "configs/vit_lora_digits.yaml")
TINY = ["--model.img_size", "16", "--data.image_size", "16", "--data.batch_size", "32",
        "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.max_epochs", "20"]  # (a run stopped by max_steps is saved as at its epoch's end)
RUN = "runs/vit_lora_digits"


def snapshot(folder: Path, skip_events: bool = False) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not (skip_events and p.name.startswith("events.out.tfevents"))}


def fails(capsys, args) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


class OtherRunWritesThenFail(L.Callback):
    """Before the first batch, another run of the same config writes its files (as a concurrent process would),
    then this run fails."""

    def on_train_start(self, trainer, pl_module):
        other = Path(RUN) / "version_7"
        (other / "checkpoints").mkdir(parents=True, exist_ok=True)
        (other / "checkpoints" / "last.ckpt").write_bytes(b"the other run's checkpoint")
        (other / "config.yaml").write_text("the other run's config")
        earlier = Path(RUN) / "version_5"  # made before this run started, or not
        (earlier / "checkpoints").mkdir(parents=True, exist_ok=True)
        (earlier / "checkpoints" / "epoch=1.ckpt").write_bytes(b"an earlier run, still training")
        raise RuntimeError("injected failure before the first batch")


class PauseAtFirstBatch(L.Callback):
    """Writes ``started`` after the first training batch and waits (up to 5 minutes) until ``go`` exists."""

    def __init__(self, started: str = "started", go: str = "go") -> None:
        self.started, self.go = Path(started), Path(go)

    def on_train_batch_end(self, trainer, *args):
        if not self.started.exists():
            self.started.write_text(str(os.getpid()))
            deadline = time.monotonic() + 300
            while not self.go.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError("test timed out waiting for the go file")
                time.sleep(0.05)


class RaiseAtStep(L.Callback):
    def __init__(self, step: int = 2, sigterm: bool = False) -> None:
        self.step, self.sigterm = step, sigterm

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            if self.sigterm:
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler: stops at this batch end (exit 143)
            else:
                raise RuntimeError("injected failure after the first batch")


def start_cli_process(cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process ended with {proc.returncode}: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "the other process never started training"
        time.sleep(0.1)


@pytest.mark.parametrize("root_exists", [False, True], ids=["new runs folder", "existing runs folder"])
def test_early_failure_keeps_files_another_run_wrote_meanwhile(in_tmp, capsys, root_exists):
    if root_exists:
        (in_tmp / RUN / "version_5").mkdir(parents=True)
        (in_tmp / RUN / "version_5" / "config.yaml").write_text("an earlier run")
    err = fails(capsys, ["fit", "--config", DIGITS, *TINY, "--trainer.max_steps", "1",
                         "--trainer.callbacks+=tests.test_run_folders.OtherRunWritesThenFail"])
    assert "injected failure before the first batch" in err
    expected = {"version_7/checkpoints/last.ckpt": b"the other run's checkpoint",
                "version_7/config.yaml": b"the other run's config",
                "version_5/checkpoints/epoch=1.ckpt": b"an earlier run, still training"}
    if root_exists:
        expected["version_5/config.yaml"] = b"an earlier run"
    assert snapshot(in_tmp / RUN) == expected  # this run's own folder is gone, nothing else
    mine = "version_6" if root_exists else "version_0"
    assert sorted(p.name for p in (in_tmp / RUN).iterdir()) == sorted({"version_5", "version_7"} - {mine})


def test_a_resume_failing_early_removes_only_what_it_wrote_into_the_run(in_tmp, capsys):
    """The resumed run's folder is not this process's: only its config copy and event file go."""
    run_cli(["fit", "--config", DIGITS, *TINY, "--trainer.max_steps", "1"])
    before = snapshot(in_tmp / "runs")
    err = fails(capsys, ["fit", "--config", DIGITS, *TINY, "--trainer.max_steps", "2", "--ckpt_path", "last",
                         "--trainer.callbacks+=tests.test_hardening.RaiseAtFitStart"])
    assert "injected failure before the first batch" in err
    after = snapshot(in_tmp / "runs")
    assert after.keys() == before.keys()  # config.resume-1.yaml, the new event file and the lock are gone
    assert after == before


def test_two_runs_of_one_config_at_once_one_failing_early(in_tmp, capsys):
    """A trains (paused after its first batch) while B, on the same config, fails before its first batch."""
    a = start_cli_process(in_tmp, "fit", "--config", DIGITS, *TINY, "--trainer.max_steps", "3",
                          "--trainer.callbacks+=tests.test_run_folders.PauseAtFirstBatch")
    try:
        wait_for(in_tmp / "started", a)
        a_files = snapshot(in_tmp / RUN / "version_0", skip_events=True)
        assert "config.yaml" in a_files
        err = fails(capsys, ["fit", "--config", DIGITS, *TINY, "--trainer.max_steps", "1",
                             "--trainer.callbacks+=tests.test_hardening.RaiseAtFitStart"])
        assert "injected failure before the first batch" in err
        assert snapshot(in_tmp / RUN / "version_0", skip_events=True) == a_files
        assert sorted(p.name for p in (in_tmp / RUN).iterdir()) == ["version_0"]  # B's version_1 is gone
        (in_tmp / "go").touch()
        assert a.wait(timeout=300) == 0, a.stderr.read()[-3000:]
    finally:
        a.kill()
        a.wait()
    run = in_tmp / RUN / "version_0"
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 3
    assert (run / "config.yaml").read_bytes() == a_files["config.yaml"]
    assert list(run.glob("events.out.tfevents.*")) and not (run / LOCK_NAME).exists()


def test_two_resumes_of_one_run_the_second_is_refused_and_a_killed_runs_lock_does_not_block(in_tmp, capsys):
    run_cli(["fit", "--config", DIGITS, *TINY, "--trainer.max_steps", "2"])
    a = start_cli_process(in_tmp, "fit", "--config", DIGITS, *TINY, "--trainer.max_steps", "4", "--ckpt_path", "last",
                          "--trainer.callbacks+=tests.test_run_folders.PauseAtFirstBatch")
    lock = in_tmp / RUN / "version_0" / LOCK_NAME
    try:
        wait_for(in_tmp / "started", a)
        assert lock.read_text() == str(a.pid)
        before = snapshot(in_tmp / "runs", skip_events=True)
        err = fails(capsys, ["fit", "--config", DIGITS, *TINY, "--trainer.max_steps", "4", "--ckpt_path", "last"])
        assert f"run folder '{RUN}/version_0' is in use by another process (pid {a.pid})" in err, err
        assert snapshot(in_tmp / "runs", skip_events=True) == before
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    assert lock.exists()  # stale: its holder is dead, the kernel released the lock
    app = run_cli(["fit", "--config", DIGITS, *TINY, "--trainer.max_steps", "4", "--ckpt_path", "last"])
    assert app.trainer.global_step == 4 and not lock.exists()


def test_the_lock_is_released_on_every_exit_path(in_tmp):
    """In one process (a leaked lock would refuse the next resume: flock locks belong to an open file)."""
    args = ["fit", "--config", DIGITS, *TINY, "--trainer.max_steps", "6", "--checkpoint.every_n_train_steps", "2",
            "--trainer.callbacks+=tests.test_run_folders.RaiseAtStep"]
    with pytest.raises(RuntimeError, match="injected failure after the first batch"):
        run_cli([*args, "--trainer.callbacks.step", "3"])  # after the checkpoint of step 2
    assert not (in_tmp / RUN / "version_0" / LOCK_NAME).exists()
    with pytest.raises(SystemExit) as e:
        run_cli([*args, "--trainer.callbacks.step", "4", "--trainer.callbacks.sigterm", "true", "--ckpt_path", "last"])
    assert e.value.code == 143 and not (in_tmp / RUN / "version_0" / LOCK_NAME).exists()
    app = run_cli(["fit", "--config", DIGITS, *TINY, "--trainer.max_steps", "6", "--ckpt_path", "last"])
    assert app.trainer.global_step == 6


def test_version_folders_are_reserved_atomically(tmp_path):
    a, b = RunFolder(), RunFolder()
    assert a.reserve_version(tmp_path / "runs/x") == 0 and b.reserve_version(tmp_path / "runs/x") == 1
    a.lock(tmp_path / "runs/x/version_0")
    with pytest.raises(RunFolderBusy, match=f"in use by another process \\(pid {os.getpid()}\\)"):
        b.lock(tmp_path / "runs/x/version_0")
    b.remove_created()  # b created only version_1; runs/ and runs/x are a's
    assert sorted(p.name for p in (tmp_path / "runs/x").iterdir()) == ["version_0"]
    a.release()
    a.remove_created()
    assert not (tmp_path / "runs").exists()


def test_a_ddp_run_through_the_cli_uses_rank_0s_folder(tmp_path):
    """Two processes (gloo, CPU): the rank DDP launches reuses rank 0's reserved version_N (it does not take a
    folder of its own) and the collectives of the config callback stay in step (a rank-0-only log_dir query
    hung here once)."""
    from tests.cli_helpers import run_ddp

    run_ddp([str(REPO / "cli.py"), "fit", "--config", DIGITS, *TINY, "--trainer.max_steps", "2",
             "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"], cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / RUN).iterdir()) == ["version_0"]
    run = tmp_path / RUN / "version_0"
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 2
    assert (run / "config.yaml").is_file() and not (run / LOCK_NAME).exists()
