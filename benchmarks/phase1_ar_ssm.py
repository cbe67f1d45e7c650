"""AR-SSM inference benchmark: what adaptive rank saves.

One ``ARSSM(d_model=256, max_rank=32)`` forward on batch 4 x 4096 tokens in eval mode, three ways:

* ``all 32 active``: every gate on, all ranks computed (the baseline);
* ``8 active, pruned``: ranks 8..31 have their gates off (gate bias -30, then one training-mode calibration
  forward records it in ``gate_running_max``), so inference computes only 8 ranks;
* ``8 active, unpruned``: the same model and gates with ``prune_inference=False``: all 32 ranks computed and
  the off gates multiplied by 0 (same output as the pruned path, no savings).

Time: median over repeats under ``torch.inference_mode``. Peak memory: on CUDA the peak allocated bytes above
what was allocated before the forward; on CPU the peak RSS increase of this process during the forward
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``; Linux/glibc only; the mmap threshold is fixed
first so that large tensors are mmapped and RSS follows the live tensors). The scan is the Triton kernel on
CUDA (when triton imports), the chunked torch scan on CPU.

    OMP_NUM_THREADS=1 python benchmarks/phase1_ar_ssm.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from models.layers.ar_ssm import ARSSM  # noqa: E402
from models.utils.memory import measure_peak_memory, pin_malloc  # noqa: E402

D_MODEL, MAX_RANK, ACTIVE, BATCH, SEQ = 256, 32, 8, 4, 4096
MB = 2**20


def _peak_forward_mb(model: ARSSM, x: torch.Tensor) -> float:
    """Extra memory at the peak of one forward (see the module docstring for how)."""
    pin_malloc(128 * 1024)  # mmap every allocation >= 128 KiB so the RSS follows the live tensors
    return measure_peak_memory(lambda: model(x), x.device)


def _time_forward_ms(model: ARSSM, x: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])


def _models(device: torch.device) -> dict[str, ARSSM]:
    torch.manual_seed(0)
    full = ARSSM(D_MODEL, max_rank=MAX_RANK, min_rank=4).to(device)
    sparse = ARSSM(D_MODEL, max_rank=MAX_RANK, min_rank=4).to(device)
    sparse.load_state_dict(full.state_dict())
    with torch.no_grad():
        full.gate_out.bias.fill_(3.0)  # every gate on
        sparse.gate_out.bias[:ACTIVE] = 3.0
        sparse.gate_out.bias[ACTIVE:] = -30.0  # gates ~1e-13: off
        calib = torch.randn(2, 256, D_MODEL, device=device)
        for m in (full, sparse):
            m.train()(calib)  # records each rank's gate in gate_running_max
            m.eval()
    unpruned = ARSSM(D_MODEL, max_rank=MAX_RANK, min_rank=4, prune_inference=False).to(device)
    unpruned.load_state_dict(sparse.state_dict())
    unpruned.eval()
    return {f"all {MAX_RANK} active": full, f"{ACTIVE} active, pruned": sparse,
            f"{ACTIVE} active, unpruned": unpruned}


def bench_ar_ssm(device: str | torch.device, quick: bool = False) -> list[dict]:
    """Rows ``{variant, ranks_computed, time_ms, peak_mb, time_vs_all, mem_vs_all}`` for the three variants."""
    device = torch.device(device)
    models = _models(device)
    x = torch.randn(BATCH, SEQ, D_MODEL, device=device)
    rows = []
    with torch.inference_mode():
        outputs = {}
        for name, m in models.items():
            peak = _peak_forward_mb(m, x)
            ms = _time_forward_ms(m, x, 3 if quick else 10)
            outputs[name] = m(x)
            rows.append({"variant": name, "ranks_computed": m._last_gate.shape[-1], "time_ms": ms, "peak_mb": peak})
        pruned, unpruned = outputs[f"{ACTIVE} active, pruned"], outputs[f"{ACTIVE} active, unpruned"]
        max_diff = (pruned - unpruned).abs().max().item()
    for r in rows:
        r["time_vs_all"] = r["time_ms"] / rows[0]["time_ms"]
        r["mem_vs_all"] = r["peak_mb"] / rows[0]["peak_mb"]
        r["pruned_vs_unpruned_max_abs_diff"] = max_diff
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| variant | ranks computed | forward ms | peak MB | time / all | memory / all |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['ranks_computed']} | {r['time_ms']:.1f} | {r['peak_mb']:.1f} | "
              f"{r['time_vs_all']:.2f} | {r['mem_vs_all']:.2f} |" for r in rows]
    pruned, unpruned = rows[1], rows[2]
    lines.append(f"\npruned vs unpruned (same gates): time x{unpruned['time_ms'] / pruned['time_ms']:.2f} faster, "
                 f"memory x{unpruned['peak_mb'] / pruned['peak_mb']:.2f} smaller; "
                 f"max |output difference| {rows[0]['pruned_vs_unpruned_max_abs_diff']:.1e}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="3 timed repeats instead of 10")
    args = parser.parse_args()
    print(f"ARSSM d_model={D_MODEL} max_rank={MAX_RANK} batch={BATCH} N={SEQ} on {args.device} "
          f"({torch.get_num_threads()} threads), eval, float32")
    print(format_table(bench_ar_ssm(args.device, args.quick)))


if __name__ == "__main__":
    main()
