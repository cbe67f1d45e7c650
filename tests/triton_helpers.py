"""Run a test script with the Triton kernels interpreted on the CPU (``TRITON_INTERPRET=1``).

The variable must be set before triton decorates a kernel, and other test modules may already have imported
triton in this process, so each script runs in a subprocess (the variable never reaches other tests) and
prints one line ``RESULT<json>``, which is returned parsed.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_interpreted(script: str, timeout: int = 300) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", script], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])
