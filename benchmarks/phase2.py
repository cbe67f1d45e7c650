"""Phase 2 language-model benchmarks, one section per component (``--section NAME``).

scan: the dissipative Hebbian fast-weight memory (models/layers/fast_weights.py). Forward time of the
sequential reference vs the chunked form at ``--ref-len`` tokens (target: chunked >= 10x faster), then time vs
sequence length next to causal softmax attention (``F.scaled_dot_product_attention(is_causal=True)``) with the
same batch, heads and head size. "chunked+rule" is the chunked form with the layer's boundary rule (SNR filter
at every chunk, resonant-mode damping). Variants run interleaved, one call each per round, after one warm-up
call; tables show the median. Runs on CUDA when available (``--device``). Prints markdown tables.

    python benchmarks/phase2.py --section scan            # CPU, 1 thread: about 2-3 minutes
    python benchmarks/phase2.py --section scan --quick    # lengths 1024-4096, fewer rounds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.layers.fast_weights import (  # noqa: E402
    MemoryBoundaryRule,
    fixed_orthonormal_basis,
    hebbian_scan_chunked,
    hebbian_scan_sequential,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, float]:
    """Median milliseconds per variant; each round calls every variant once (machine noise hits all alike)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _inputs(args: argparse.Namespace, n: int, device: torch.device, grad: bool = False):
    g = torch.Generator().manual_seed(n)
    shape = (args.batch, args.heads, n, args.head_dim)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))
    k = F.normalize(k, dim=-1)
    gamma = torch.empty(args.batch, args.heads, n).uniform_(1 / 1024, 1 / 16, generator=g)  # the layer's init range
    dtype = getattr(torch, args.dtype)
    out = [t.to(device, dtype) for t in (q, k, v)] + [(-gamma).to(device)]
    return [t.requires_grad_(grad) for t in out]


def _rule(args: argparse.Namespace, device: torch.device) -> MemoryBoundaryRule:
    return MemoryBoundaryRule(fixed_orthonormal_basis(args.head_dim, 0).to(device), 2.0, resonance_damping=0.1)


def _fwd_bwd(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        out = fn()
        torch.autograd.grad(out.float().square().mean(), leaves)
    return run


def _length_row(args: argparse.Namespace, device: torch.device, n: int) -> str:
    c = args.chunk_size
    q, k, v, ld = _inputs(args, n, device)
    fns = {
        "chunked": lambda: hebbian_scan_chunked(q, k, v, ld, 1.0, chunk_size=c),
        "rule": lambda: hebbian_scan_chunked(q, k, v, ld, 1.0, chunk_size=c, boundary=_rule(args, device)),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    if n <= args.seq_max:
        fns["seq"] = lambda: hebbian_scan_sequential(q, k, v, ld, 1.0)
    with torch.no_grad():
        fwd = time_interleaved(fns, args.rounds, device)
    leaves = _inputs(args, n, device, grad=True)
    qg, kg, vg, ldg = leaves
    bwd = time_interleaved({
        "chunked": _fwd_bwd(lambda: hebbian_scan_chunked(qg, kg, vg, ldg, 1.0, chunk_size=c)[0], leaves),
        "rule": _fwd_bwd(lambda: hebbian_scan_chunked(qg, kg, vg, ldg, 1.0, chunk_size=c,
                                                      boundary=_rule(args, device))[0], leaves),
        "sdpa": _fwd_bwd(lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True), leaves[:3]),
    }, args.rounds, device)
    seq = f"{fwd['seq']:.1f}" if "seq" in fwd else f"skipped (> {args.seq_max})"
    return (f"| {n} | {seq} | {fwd['chunked']:.1f} | {fwd['rule']:.1f} | {fwd['sdpa']:.1f} | "
            f"{fwd['chunked'] / fwd['sdpa']:.2f} | {bwd['chunked']:.1f} | {bwd['rule']:.1f} | {bwd['sdpa']:.1f} | "
            f"{bwd['chunked'] / bwd['sdpa']:.2f} |")


def scan_section(args: argparse.Namespace, device: torch.device) -> list[str]:
    c = args.chunk_size
    lines = [(f"### Fast-weight memory scan ({device.type}, {args.dtype}, batch {args.batch}, {args.heads} heads x "
              f"{args.head_dim}, chunk {c}, threads {torch.get_num_threads()}, median of {args.rounds} rounds)"), ""]
    q, k, v, ld = _inputs(args, args.ref_len, device)
    with torch.no_grad():
        ref_plain, _ = hebbian_scan_sequential(q, k, v, ld, 1.0)
        ref_rule, _ = hebbian_scan_sequential(q, k, v, ld, 1.0, boundary=_rule(args, device), period=c)
        out_plain, _ = hebbian_scan_chunked(q, k, v, ld, 1.0, chunk_size=c)
        out_rule, _ = hebbian_scan_chunked(q, k, v, ld, 1.0, chunk_size=c, boundary=_rule(args, device))
        t = time_interleaved({
            "seq": lambda: hebbian_scan_sequential(q, k, v, ld, 1.0),
            "chunked": lambda: hebbian_scan_chunked(q, k, v, ld, 1.0, chunk_size=c),
            "seq+rule": lambda: hebbian_scan_sequential(q, k, v, ld, 1.0, boundary=_rule(args, device), period=c),
            "chunked+rule": lambda: hebbian_scan_chunked(q, k, v, ld, 1.0, chunk_size=c, boundary=_rule(args, device)),
        }, args.rounds, device)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    lines += [f"Forward at {args.ref_len} tokens (target: chunked >= 10x faster than sequential):", "",
              "| memory | sequential ms | chunked ms | speedup | rel. difference |", "|---|---|---|---|---|",
              (f"| plain | {t['seq']:.1f} | {t['chunked']:.1f} | {t['seq'] / t['chunked']:.1f}x | "
               f"{rel(out_plain, ref_plain):.1e} |"),
              (f"| with boundary rule | {t['seq+rule']:.1f} | {t['chunked+rule']:.1f} | "
               f"{t['seq+rule'] / t['chunked+rule']:.1f}x | {rel(out_rule, ref_rule):.1e} |"), ""]
    lines += ["Time vs length (ms); SDPA = causal softmax attention, same batch / heads / head size:", "",
              ("| tokens | sequential fwd | chunked fwd | chunked+rule fwd | SDPA fwd | chunked / SDPA fwd "
               "| chunked fwd+bwd | chunked+rule fwd+bwd | SDPA fwd+bwd | chunked / SDPA fwd+bwd |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for n in args.lengths:
        lines.append(_length_row(args, device, n))
        print(lines[-1], flush=True)
    return lines


SECTIONS: dict[str, Callable[[argparse.Namespace, torch.device], list[str]]] = {"scan": scan_section}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--section", choices=sorted(SECTIONS), action="append",
                        help="section(s) to run (repeatable); default: all")
    parser.add_argument("--quick", action="store_true", help="lengths 1024-4096 and 2 rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--ref-len", type=int, default=4096)
    parser.add_argument("--seq-max", type=int, default=4096, help="longest length timed with the sequential loop")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per variant (default 3, quick 2)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    args = parser.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.lengths = args.lengths or ([1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384])
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for name in args.section or sorted(SECTIONS):
        t0 = time.perf_counter()
        lines = SECTIONS[name](args, device)
        print("\n" + "\n".join(lines) + f"\n\n({name}: {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
