"""LNS linear benchmark: relative error against ``F.linear`` per LNS format for a 1024 x 1024 layer.

The layer has ``nn.Linear``'s default (Kaiming uniform) weights and no bias; activations are N(0, 1), 64
tokens (``--full``: 256). Per format: the relative Frobenius error of the decoded weights and activations,
of the layer output, the output error predicted from the log-domain rounding alone (each operand's
exponent is off by a uniform +-1/(2 gamma) octave, a relative RMS of ln 2 / (gamma sqrt 12) per operand, so
sqrt(2) times that per product when nothing underflows), and the eval time of the torch emulation (one
thread, best of a few runs after a warm-up; an emulation, not a fast kernel). A bf16 matmul is the reference row.

    python benchmarks/lns.py
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from models.quant.lns import LNS_FORMATS, LNSLinear, lns_decode, lns_encode, lns_scale_exponent  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _roundtrip(x: torch.Tensor, gamma: int, exp_bits: int) -> torch.Tensor:
    bias = lns_scale_exponent(x, gamma, dim=1)
    return lns_decode(*lns_encode(x, gamma, exp_bits, bias), gamma, exp_bits, bias)


def _best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def bench_lns(quick: bool = True) -> list[dict]:
    """One row per format (plus fp32 and bf16 reference rows) with errors against ``F.linear``."""
    torch.manual_seed(0)
    linear = nn.Linear(1024, 1024, bias=False)
    x = torch.randn(64 if quick else 256, 1024)
    repeats = 2 if quick else 3
    with torch.no_grad():
        ref = linear(x)
        fp32_ms = _best_ms(lambda: linear(x), 5)
        bf16 = (x.bfloat16() @ linear.weight.bfloat16().T).float()
        rows = [{"format": "fp32 F.linear", "bits": 32, "gamma": None, "octaves": None, "bound": 0.0,
                 "weight_err": 0.0, "act_err": 0.0, "out_err": 0.0, "predicted": 0.0, "ms": fp32_ms},
                {"format": "bf16 matmul", "bits": 16, "gamma": None, "octaves": None, "bound": 2.0**-9,
                 "weight_err": _rel(linear.weight.bfloat16(), linear.weight), "act_err": _rel(x.bfloat16(), x),
                 "out_err": _rel(bf16, ref), "predicted": float("nan"),
                 "ms": _best_ms(lambda: x.bfloat16() @ linear.weight.bfloat16().T, 3)}]
        for name, fmt in LNS_FORMATS.items():
            layer = LNSLinear.from_linear(linear, *fmt).eval()
            out = layer(x)
            rows.append({
                "format": name, "bits": fmt.bits, "gamma": fmt.gamma, "octaves": fmt.octaves,
                "bound": fmt.rel_error_bound, "weight_err": _rel(_roundtrip(linear.weight, *fmt), linear.weight),
                "act_err": _rel(_roundtrip(x, *fmt), x), "out_err": _rel(out, ref),
                "predicted": math.sqrt(2) * math.log(2) / (fmt.gamma * math.sqrt(12)),
                "ms": _best_ms(lambda layer=layer: layer(x), repeats),
            })
    for r in rows:
        r["tokens"], r["vs_fp32_ms"] = x.shape[0], r["ms"] / fp32_ms
    return rows


def _print(rows: list[dict]) -> None:
    print(f"1024 x 1024 linear (Kaiming uniform, no bias), {rows[0]['tokens']} N(0, 1) tokens, "
          f"{torch.get_num_threads()} thread(s); errors are relative Frobenius errors:\n")
    print("| format | bits | gamma | range (octaves) | per-value bound | weight err | activation err | output err "
          "| predicted | ms | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def fmt(v, spec):
            return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

        print(f"| {r['format']} | {r['bits']} | {fmt(r['gamma'], 'd')} | {fmt(r['octaves'], '.2f')} | "
              f"{fmt(r['bound'], '.4f')} | {r['weight_err']:.5f} | {r['act_err']:.5f} | {r['out_err']:.5f} | "
              f"{fmt(r['predicted'], '.5f')} | {r['ms']:.1f} | {r['vs_fp32_ms']:.3g}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="256 tokens instead of 64")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _print(bench_lns(quick=not args.full))


if __name__ == "__main__":
    main()
