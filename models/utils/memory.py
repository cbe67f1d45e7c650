"""Process and device memory measurement (and the CPU model) shared by diagnostics and benchmarks.

On the CPU the peak is the process's peak RSS (``VmHWM`` from ``/proc/self/status``, reset through
``/proc/self/clear_refs``); :func:`pin_malloc` first makes glibc return large frees to the OS so the RSS follows
the live tensors. On CUDA it is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Callable

import torch

MIB = 2**20


def proc_status_kib(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...). Linux only."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (writes ``5`` to ``/proc/self/clear_refs``); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def pin_malloc(threshold: int = 1 << 20) -> bool:
    """Fix glibc's mmap threshold (``M_MMAP_THRESHOLD``) so large tensors are mmapped and freed memory leaves the
    process: the RSS then follows the live tensors. Linux/glibc only; False elsewhere."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, threshold))
    except (OSError, AttributeError):
        return False


def measure_peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Peak memory (MiB) that ``fn()`` adds above what is allocated when it starts; nan where unmeasurable."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / MIB
    if not reset_peak_rss():
        fn()
        return float("nan")
    base = proc_status_kib("VmRSS")
    fn()
    return (proc_status_kib("VmHWM") - base) / 1024


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``unknown`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"
