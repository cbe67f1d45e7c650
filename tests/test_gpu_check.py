"""``bash benchmarks/gpu/check.sh --dry-run``: the GPU readiness check on the CPU, so it cannot rot between GPU loans.

Every step runs (tiny sizes, CPU); CUDA-only results are reported as skipped; the summary files are written.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))

from presets import PRESETS  # noqa: E402


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}


def test_dry_run_selects_everything_and_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "check.sh"), "--dry-run", str(out)],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert {p.name for p in out.iterdir()} == {"summary.json", "summary.md", "check.log"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and summary["verdict"] == "dry run (CUDA results skipped)"
    steps = {s["name"]: s["status"] for s in summary["steps"]}
    assert steps == {"install": "ok", "env": "ok", "gpu_tests": "ok", "presets (all, dry run)": "ok", "bench": "ok",
                     "main_job": "ok"}
    assert summary["install"]["installed"] == []  # a dry run installs nothing
    # every test marked gpu was selected, and each skipped without CUDA
    ids = [t["id"] for t in summary["tests"]]
    assert any("test_gpu_kernels" in i for i in ids) and any("test_gpu_training" in i for i in ids)
    assert len(ids) >= 40 and all(t["outcome"] == "skipped" for t in summary["tests"])
    assert summary["gpu_tests"] == {"passed": 0, "failed": 0, "error": 0, "skipped": len(ids)}
    sections = {f["section"] for f in summary["figures"]}
    assert {f"preset {name}" for name in PRESETS} | {"bench mixer", "bench phase2", "bench qlora", "main job",
                                                       "gpu tests", "check"} == sections
    assert all(f["verdict"].startswith("skipped") for f in summary["figures"])
    rates = [f for f in summary["figures"] if f["name"] == "steps per second"]
    assert len(rates) == len(PRESETS) and all(f["value"] > 0 for f in rates)  # each preset really took steps
    text = (out / "summary.md").read_text()
    assert "(dry run)" in text and all(name in text for name in PRESETS)
    assert "===== main_job: ok" in (out / "check.log").read_text()


def test_no_output_folder_is_one_error_line(tmp_path):
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "check.sh"), "--dry-run"], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith("error: no output folder")
    assert not any(tmp_path.iterdir())


def _fake_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel holding ``<name>/__init__.py`` (``VALUE = 42``)."""
    import zipfile

    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {f"{module}/__init__.py": "VALUE = 42\n",
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for file, text in files.items():
            z.writestr(file, text)
    return path


def test_install_takes_only_missing_packages_from_the_wheel_folder(tmp_path):
    from check import Check

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheel(wheels, "adaptlab-fake-pkg", "0.1")
    listing = tmp_path / "wheels.txt"
    listing.write_text("# comment\ntorch==0.0.1 torch\nadaptlab-fake-pkg==0.1 adaptlab_fake_pkg\n"
                       "adaptlab-absent-pkg==1.0 adaptlab_absent_pkg\n")
    (tmp_path / "out").mkdir()
    check = Check(tmp_path / "out", dry_run=False, started=0.0, deadline_s=1e12)
    check.install(listing, wheels)
    info = check.info["install"]
    assert "torch" in info["present"]  # already there (any version): left alone
    assert info["missing"] == ["adaptlab-fake-pkg==0.1", "adaptlab-absent-pkg==1.0"]
    assert info["installed"] == ["adaptlab-fake-pkg==0.1"]
    assert len(info["problems"]) == 1 and "adaptlab-absent-pkg==1.0: no wheel" in info["problems"][0]
    assert check.steps[-1]["status"] == "failed"
    res = subprocess.run([sys.executable, "-c", "import adaptlab_fake_pkg; print(adaptlab_fake_pkg.VALUE)"],
                         env={**os.environ, "PYTHONPATH": check.env["PYTHONPATH"]}, capture_output=True, text=True)
    assert res.stdout.strip() == "42"  # every later step sees the installed package


def test_a_hanging_step_is_killed_at_its_limit_and_later_steps_get_the_rest(tmp_path):
    from check import Check

    (tmp_path / "out").mkdir()
    check = Check(tmp_path / "out", dry_run=True, started=time.time(), deadline_s=3.0 + 6.0)
    hang = check.run("hang", ["bash", "-c", "sleep 60 & sleep 60"], limit=3.0)  # a child process too
    assert hang["status"] == "timeout" and hang["seconds"] < 20
    late = check.run("late", [sys.executable, "-c", "print('never')"], limit=60.0)
    assert late["status"] == "skipped" or late["timeout_s"] <= 6.0  # capped by what is left of the whole check
    assert "===== hang: timeout" in (tmp_path / "out" / "check.log").read_text()


def test_out_of_time_skips_steps_and_still_writes_the_summary(tmp_path):
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu" / "check.sh"), "--dry-run", "--deadline", "1",
                          str(tmp_path / "out")], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["verdict"] == "dry run failed"
    assert all(s["status"] == "skipped" for s in summary["steps"] if s["name"] != "install")
    assert {s["name"] for s in summary["steps"]} >= {"env", "gpu_tests", "bench", "main_job"}
