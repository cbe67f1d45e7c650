"""Tensor-train embedding benchmark: parameters, lookup and tied-head time of a 50000 x 1024 table at TT ranks
8/16/32 (2 cores) against ``nn.Embedding``, then TT-SVD reconstruction error of three kinds of table.

The tables for the error are synthetic, not trained: a N(0, 0.02) table (what ``nn.Embedding`` starts from),
a random table with a power-law spectrum (singular values ~ i^-1/2, random singular vectors: the shape of a
trained embedding's spectrum without any TT structure) and a planted TT of rank 16 plus 1 % noise. Beside
each TT error is the error of a plain rank-r' matrix factorisation with the same parameter count
(``r' = TT params / (V + D)``). ``--quick`` (the default) measures the errors on a 5000 x 256 table, since
the TT-SVD of 50000 x 1024 needs the SVD of a 7168 x 7168 unfolding (minutes on one CPU thread);
``--full`` uses 50000 x 1024. Timings: best of several runs, one thread, ``torch.no_grad``.

    python benchmarks/phase1_tt.py            # quick
    python benchmarks/phase1_tt.py --full
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from models.layers.tt_embedding import TTEmbedding  # noqa: E402

V, D = 50000, 1024
RANKS = (8, 16, 32)


def _best_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * min(times)


def _size_rows(quick: bool) -> list[dict]:
    torch.manual_seed(0)
    ids = torch.randint(0, V, (4, 256) if quick else (8, 512))
    hidden = torch.randn(16 if quick else 64, D)
    repeats = 5 if quick else 10  # head; lookups are cheap and noisy on a shared CPU, so 10x as many
    dense = nn.Embedding(V, D)
    models = [TTEmbedding(V, D, rank=rank) for rank in RANKS] + [TTEmbedding(V, D, rank=16, num_cores=3)]
    rows = []
    with torch.no_grad():
        rows.append({"model": "nn.Embedding", "params": V * D, "lookup_ms": _best_ms(lambda: dense(ids), 10 * repeats),
                     "head_ms": _best_ms(lambda: hidden @ dense.weight.T, repeats)})
        for tt in models:
            shape = f"{'x'.join(map(str, tt.vocab_factors))}, {'x'.join(map(str, tt.dim_factors))}"
            rows.append({"model": f"TT rank {tt.ranks[1]}, {tt.num_cores} cores ({shape})",
                         "params": tt.num_parameters(), "lookup_ms": _best_ms(partial(tt, ids), 10 * repeats),
                         "head_ms": _best_ms(partial(tt.logits, hidden), repeats)})
    rows.append({"model": "matrix low rank 16 (V r + r D)", "params": 16 * (V + D),
                 "lookup_ms": float("nan"), "head_ms": float("nan")})
    for r in rows:
        r["ratio"] = V * D / r["params"]
        r["lookup_vs_dense"] = r["lookup_ms"] / rows[0]["lookup_ms"]
        r["head_vs_dense"] = r["head_ms"] / rows[0]["head_ms"]
        r["ids"], r["hidden_rows"] = ids.numel(), hidden.shape[0]
    return rows


def _tables(v: int, d: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    gaussian = torch.randn(v, d, generator=g) * 0.02
    u = torch.linalg.qr(torch.randn(v, d, generator=g)).Q
    w = torch.linalg.qr(torch.randn(d, d, generator=g)).Q
    spectrum = torch.arange(1, d + 1, dtype=torch.float32) ** -0.5
    power_law = (u * spectrum) @ w.T
    planted = TTEmbedding(v, d, rank=16, init_std=1.0).to_dense().detach()
    planted = planted + 0.01 * planted.std() * torch.randn(v, d, generator=g)
    return {"N(0, 0.02)": gaussian, "power-law spectrum": power_law / power_law.std() * 0.02,
            "planted TT rank 16 + 1% noise": planted}


def _error_rows(quick: bool) -> list[dict]:
    v, d = (5000, 256) if quick else (V, D)
    rows = []
    for name, table in _tables(v, d).items():
        sv = torch.linalg.svdvals(table)
        for rank in RANKS:
            t0 = time.perf_counter()
            tt, err = TTEmbedding.from_dense(table, rank)
            seconds = time.perf_counter() - t0
            params = tt.num_parameters()
            r_matrix = max(1, params // (v + d))
            lowrank_err = (sv[r_matrix:].pow(2).sum() / sv.pow(2).sum()).sqrt().item()
            rows.append({"table": name, "shape": f"{v} x {d}", "rank": rank, "params": params, "tt_error": err,
                         "lowrank_rank": r_matrix, "lowrank_error": lowrank_err, "tt_svd_s": seconds})
    return rows


def bench_tt(quick: bool = True) -> list[dict]:
    """Rows of the size/time table then of the error table (each row says which by its keys)."""
    return _size_rows(quick) + _error_rows(quick)


def _print(rows: list[dict]) -> None:
    size = [r for r in rows if "model" in r]
    print(f"Embedding {V} x {D}: lookup of {size[0]['ids']} ids, tied head on {size[0]['hidden_rows']} hidden "
          f"rows, best of several runs, {torch.get_num_threads()} thread(s):\n")
    print("| embedding | params | compression | lookup ms | vs nn.Embedding | head ms | vs dense head |")
    print("|---|---|---|---|---|---|---|")
    for r in size:
        print(f"| {r['model']} | {r['params']:,} | {r['ratio']:.1f}x | {r['lookup_ms']:.2f} | "
              f"{r['lookup_vs_dense']:.2f} | {r['head_ms']:.1f} | {r['head_vs_dense']:.2f} |")
    err = [r for r in rows if "table" in r]
    print(f"\nTT-SVD (2 cores) relative Frobenius error, {err[0]['shape']} tables; 'matrix' = truncated SVD of the "
          "table itself with the same parameter count:\n")
    print("| table | TT rank | TT params | TT error | matrix rank | matrix error | TT-SVD s |")
    print("|---|---|---|---|---|---|---|")
    for r in err:
        print(f"| {r['table']} | {r['rank']} | {r['params']:,} | {r['tt_error']:.4f} | {r['lowrank_rank']} | "
              f"{r['lowrank_error']:.4f} | {r['tt_svd_s']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="errors on 50000 x 1024, more ids and hidden rows")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _print(bench_tt(quick=not args.full))


if __name__ == "__main__":
    main()
