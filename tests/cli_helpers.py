"""Driving the command line from tests."""

import os
import subprocess
import sys
from pathlib import Path

import cli

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str]):
    """Run ``python -m cli ARGS`` in-process (pytest's own argv hidden from LightningCLI); returns the CLI."""
    saved, sys.argv = sys.argv, ["cli"]
    try:
        return cli.main(args)
    finally:
        sys.argv = saved


def run_ddp(argv: list[str], cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    """Run a script that starts a 2-process (gloo, CPU) DDP fit; asserts it exits 0.

    Gloo on a shared CPU occasionally kills a rank natively (no Python traceback, observed once in ~10 suite
    runs); such a run is retried once. A Python exception in the script fails at once. Every result check
    stays with the caller."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    for attempt in (1, 2):
        res = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=timeout)
        if res.returncode == 0 or "Traceback" in res.stderr:
            break
    assert res.returncode == 0, f"exit code {res.returncode} (attempt {attempt}):\n{res.stderr[-3000:]}"
    return res
