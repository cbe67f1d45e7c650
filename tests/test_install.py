"""adaptlab outside its checkout: the ``adaptlab`` command from a folder with its own ``models/`` package, the
guard that names a shadowing package, configs addressed by name, and a plain (non-editable) ``pip install``."""

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_helpers import REPO, run_cli

QUICK = ["--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]


def user_project(root: Path) -> Path:
    """A folder as most ML projects have it: its own ``models`` and ``callbacks`` packages."""
    for pkg in ("models", "callbacks"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("MINE = True\n")
    return root


def env_without_pythonpath(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def test_python_m_cli_names_the_shadowing_package(tmp_path):
    proj = user_project(tmp_path / "proj")
    res = subprocess.run([sys.executable, "-m", "cli", "fit", "--config", "vit_lora_digits"], cwd=proj,
                         capture_output=True, text=True, timeout=120, env=env_without_pythonpath(PYTHONPATH=str(REPO)))
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: the name 'models' is taken by ")
    assert str(proj / "models") in res.stderr and "adaptlab` command" in res.stderr
    assert not (proj / "runs").exists()


def test_console_command_works_beside_own_models_package(tmp_path):
    """The console script's folder, not the current one, leads the import path: the user's packages do not
    shadow adaptlab's, and a shipped config is named without a path."""
    proj = user_project(tmp_path / "proj")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "adaptlab").write_text("import sys\nfrom cli import console\nsys.exit(console())\n")
    res = subprocess.run([sys.executable, str(bindir / "adaptlab"), "fit", "--config", "vit_lora_digits", *QUICK],
                         cwd=proj, capture_output=True, text=True, timeout=300,
                         env=env_without_pythonpath(PYTHONPATH=str(REPO)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert (proj / "runs" / "vit_lora_digits" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert (proj / "models" / "__init__.py").read_text() == "MINE = True\n"


def test_config_by_name_and_did_you_mean(in_tmp, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(["fit", "--config", "vit_lora_digts", *QUICK])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "did you mean 'vit_lora_digits'" in err
    cli = run_cli(["fit", "--config", "vit_lora_digits.yaml", *QUICK])
    assert Path(cli.trainer.log_dir) == Path("runs") / "vit_lora_digits" / "version_0"


def test_configs_list_show_copy(in_tmp, capsys):
    run_cli(["configs", "list"])
    listed = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in listed]
    assert names == sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert any(line.startswith("sema_nested ") and "main job" in line for line in listed)
    run_cli(["configs", "show", "sema_nested"])
    assert capsys.readouterr().out == (REPO / "configs" / "sema_nested.yaml").read_text()
    run_cli(["configs", "copy", "sema_nested", "."])
    copied = in_tmp / "sema_nested.yaml"
    assert copied.read_text() == (REPO / "configs" / "sema_nested.yaml").read_text()
    copied.write_text("# mine\n")
    with pytest.raises(SystemExit):  # never overwrites the user's file
        run_cli(["configs", "copy", "sema_nested", "."])
    assert "already exists" in capsys.readouterr().err and copied.read_text() == "# mine\n"
    run_cli(["configs", "copy", "vit_lora_digits", "my.yaml"])
    assert (in_tmp / "my.yaml").is_file()
    with pytest.raises(SystemExit):
        run_cli(["configs", "copy", "nope"])
    assert capsys.readouterr().err.startswith("error: no shipped config named 'nope'")


@pytest.mark.slow
def test_non_editable_install_runs_the_quick_start_elsewhere(tmp_path):
    """``pip install .`` (not editable) into a fresh venv, then ``adaptlab fit --config vit_lora_digits`` for a step
    from a folder with its own ``models/``: code and configs come from the install, not the checkout."""
    src = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info into the source tree
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", "runs", "data", "__pycache__", "*.egg-info",
                                                              "build", ".pytest_cache", ".ruff_cache", "tests"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], check=True,
                             capture_output=True, text=True).stdout.strip()
    # this interpreter's packages (torch, lightning, ...) as plain path entries: none of their .pth files (an
    # editable adaptlab's finder among them) runs, so only the fresh install provides adaptlab
    (Path(purelib) / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                          "--no-build-isolation", "--no-cache-dir", "-q", str(src)],
                         capture_output=True, text=True, timeout=300, env=env_without_pythonpath())
    assert res.returncode == 0, res.stderr[-3000:]
    shutil.rmtree(src)  # nothing may come from the source tree any more
    proj = user_project(tmp_path / "proj")
    where = subprocess.run([venv / "bin" / "adaptlab", "configs", "list"], cwd=proj, capture_output=True, text=True,
                           timeout=120, env=env_without_pythonpath())
    assert where.returncode == 0 and "sema_nested" in where.stdout, where.stderr[-2000:]
    res = subprocess.run([venv / "bin" / "adaptlab", "fit", "--config", "vit_lora_digits", *QUICK], cwd=proj,
                         capture_output=True, text=True, timeout=300, env=env_without_pythonpath())
    assert res.returncode == 0, res.stderr[-3000:]
    assert (proj / "runs" / "vit_lora_digits" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    cli_file = subprocess.run([py, "-c", "import cli; print(cli.__file__)"], cwd=tmp_path, capture_output=True,
                              text=True, env=env_without_pythonpath()).stdout.strip()
    assert cli_file.startswith(purelib)
