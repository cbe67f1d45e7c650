"""Phase 1 language-model benchmarks, one function per section.

``mixer``: time (forward + backward, and forward only under ``no_grad``) and peak memory of forward + backward
of the causal resolvent mixer ``BKMixer`` against causal softmax attention (``F.scaled_dot_product_attention``
with ``is_causal=True``, fused QKV and output projections) of the same width, batch 1, side by side over
sequence lengths, then the ratio table. Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA and the
process's peak RSS (``VmHWM`` after resetting it through ``/proc/self/clear_refs``) on the CPU, with glibc's
dynamic mmap threshold pinned so freed tensors go back to the OS between measurements.

    OMP_NUM_THREADS=2 python benchmarks/phase1.py --section mixer --quick
    python benchmarks/phase1.py --section mixer --device cuda
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from models.layers.bk_mixer import BKMixer  # noqa: E402

MIB = 2**20


class CausalSelfAttention(nn.Module):
    """Plain causal multi-head softmax attention: fused QKV projection, SDPA, output projection."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, c // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, n, c))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _pin_malloc() -> bool:
    """Fix glibc's mmap threshold (M_MMAP_THRESHOLD = -3) so large frees return memory and RSS peaks are per run."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20))
    except (OSError, AttributeError):
        return False


def _peak_memory_mib(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / MIB
    try:
        Path("/proc/self/clear_refs").write_text("5")
        base = _rss_kib("VmRSS")
        fn()
        return (_rss_kib("VmHWM") - base) / 1024
    except OSError:
        return float("nan")


def _time_ms(fn: Callable[[], None], device: torch.device, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_mixer(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if device.type == "cpu":
        _pin_malloc()
    torch.manual_seed(0)
    models = {
        "bk": BKMixer(args.d_model, chunk_size=args.chunk_size).to(device),
        "sdpa": CausalSelfAttention(args.d_model, args.heads).to(device),
    }
    reps, warmup = (1, 0) if args.quick else (args.reps, 1)
    print(
        f"device {device}, threads {torch.get_num_threads()}, d_model {args.d_model}, heads {args.heads}, "
        f"batch 1, BK chunk {args.chunk_size}, {'quick: 1 run' if args.quick else f'median of {reps}'}"
    )
    results: dict[tuple[str, int], dict[str, float]] = {}
    for name, model in models.items():  # one untimed step so first-call costs are not charged to the first N
        x = torch.randn(1, min(args.lengths), args.d_model, device=device, requires_grad=True)
        model(x).square().mean().backward()
    for n in args.lengths:
        x = torch.randn(1, n, args.d_model, device=device, requires_grad=True)
        for name, model in models.items():

            def step(model: nn.Module = model) -> None:
                model(x).square().mean().backward()

            def forward(model: nn.Module = model) -> None:
                with torch.no_grad():
                    model(x)

            results[name, n] = {
                "train_ms": _time_ms(step, device, reps, warmup),
                "fwd_ms": _time_ms(forward, device, reps, warmup),
                "peak_mib": _peak_memory_mib(step, device),
            }
            model.zero_grad(set_to_none=True)
            x.grad = None
            print(
                f"  N={n:>6} {name:>4}: fwd+bwd {results[name, n]['train_ms']:9.1f} ms  "
                f"fwd {results[name, n]['fwd_ms']:9.1f} ms  peak {results[name, n]['peak_mib']:8.1f} MiB",
                flush=True,
            )
    print(
        "\n| N | BK fwd+bwd ms | SDPA fwd+bwd ms | BK/SDPA | BK fwd ms | SDPA fwd ms | BK/SDPA | BK peak MiB "
        "| SDPA peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in args.lengths:
        bk, at = results["bk", n], results["sdpa", n]
        print(
            f"| {n} | {bk['train_ms']:.1f} | {at['train_ms']:.1f} | {bk['train_ms'] / at['train_ms']:.2f} "
            f"| {bk['fwd_ms']:.1f} | {at['fwd_ms']:.1f} | {bk['fwd_ms'] / at['fwd_ms']:.2f} "
            f"| {bk['peak_mib']:.1f} | {at['peak_mib']:.1f} |"
        )
    if {4096, 16384} <= set(args.lengths):
        print("\ntime(16384) / time(4096):")
        for name in models:
            train = results[name, 16384]["train_ms"] / results[name, 4096]["train_ms"]
            fwd = results[name, 16384]["fwd_ms"] / results[name, 4096]["fwd_ms"]
            print(f"  {name:>4}: fwd+bwd {train:.2f}  fwd {fwd:.2f}")
        bk_scaling = results["bk", 16384]["train_ms"] / results["bk", 4096]["train_ms"]
        faster = all(results["bk", n]["train_ms"] < results["sdpa", n]["train_ms"] for n in args.lengths if n >= 4096)
        print(
            f"targets: BK fwd+bwd scaling {bk_scaling:.2f} <= 4.5: {bk_scaling <= 4.5}; "
            f"BK faster than SDPA (fwd+bwd) for every N >= 4096: {faster}"
        )


SECTIONS: dict[str, Callable[[argparse.Namespace], None]] = {"mixer": bench_mixer}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--section", choices=sorted(SECTIONS), action="append", help="section(s) to run (repeatable); default: all"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one timed run per point, no per-point warm-up")
    parser.add_argument("--reps", type=int, default=3, help="timed runs per point (median reported)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    args = parser.parse_args(argv)
    for section in args.section or sorted(SECTIONS):
        print(f"== {section} ==")
        SECTIONS[section](args)


if __name__ == "__main__":
    main()
