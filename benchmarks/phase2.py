"""Phase 2 language-model benchmarks, one section per component (``--section NAME``).

scan: the dissipative Hebbian fast-weight memory (models/layers/fast_weights.py). Forward and
forward+backward time of the sequential reference vs the chunked form at ``--ref-len`` tokens (target:
chunked >= 10x faster), then time vs sequence length next to causal softmax attention
(``F.scaled_dot_product_attention(is_causal=True)``) with the same batch, heads and head size.
"chunked+rule" is the chunked form with the layer's boundary rule (the SNR filter at every chunk, and
resonant-mode damping when ``--resonance-damping`` > 0; the configs' default is 0). Variants run
interleaved, one call each per round, after one warm-up call; tables show the median. Runs on CUDA when
available (``--device``). Prints markdown tables.

    python benchmarks/phase2.py --section scan            # CPU, 1 thread: about 2-3 minutes
    python benchmarks/phase2.py --section scan --quick    # lengths 1024-4096, fewer rounds
    python benchmarks/phase2.py --section scan --check    # exit 1 when a target is missed

Every section records its targets (target, measured, verdict; "not measured" for a GPU target on the CPU) and the
script ends with their table. On CUDA the scan section also times the fused backends (Triton rule kernel +
Triton or fla attention) against the sequential reference.

memory: does the forgetting control do what it claims, on a task nobody tuned the model for? Copying at a
distance: a sequence ``v, f_1 .. f_D, Q`` (v one of 8 value tokens, f random filler tokens, Q the query token)
must be answered with v at Q. A tiny Phase 2 LM (the layers of models/lm/phase2.py, no change) is trained on
distances 1..``--train-max-distance`` for every ``base_decay`` in ``--decays`` (same seed, same steps, same
learning rate, chosen before the run), then tested on fresh sequences (another seed) at each distance,
including distances longer than any seen in training. Chance (the do-nothing answer) is 1/8.

    python benchmarks/phase2.py --section memory --quick  # CPU: a few minutes

compare: Phase 2 vs Phase 1 (when models/lm/phase1 is in the checkout) vs GPT at (nearly) equal parameter counts
and equal steps, batch and learning rate on the stdlib corpus (TextDataModule windows): loss on the validation and test
splits after training, and training tokens/s. The do-nothing baseline is the unigram model of the training bytes.

    python benchmarks/phase2.py --section compare --quick
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import sync, time_interleaved  # noqa: E402
from benchmarks.verdicts import Verdicts  # noqa: E402
from models.layers.fast_weights import (  # noqa: E402
    MemoryBoundaryRule,
    fixed_orthonormal_basis,
    hebbian_scan_chunked,
    hebbian_scan_fused,
    hebbian_scan_sequential,
)
from models.utils.launches import count_launches  # noqa: E402

VERDICTS = Verdicts()


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
    return MemoryBoundaryRule(fixed_orthonormal_basis(args.head_dim, 0).to(device), 2.0,
                              resonance_damping=args.resonance_damping)


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
        fwd = time_interleaved(fns, device, args.rounds)
    leaves = _inputs(args, n, device, grad=True)
    qg, kg, vg, ldg = leaves
    bwd = time_interleaved({
        "chunked": _fwd_bwd(lambda: hebbian_scan_chunked(qg, kg, vg, ldg, 1.0, chunk_size=c)[0], leaves),
        "rule": _fwd_bwd(lambda: hebbian_scan_chunked(qg, kg, vg, ldg, 1.0, chunk_size=c,
                                                      boundary=_rule(args, device))[0], leaves),
        "sdpa": _fwd_bwd(lambda: F.scaled_dot_product_attention(qg, kg, vg, is_causal=True), leaves[:3]),
    }, device, args.rounds)
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
        }, device, args.rounds)

    leaves = _inputs(args, args.ref_len, device, grad=True)
    qg, kg, vg, ldg = leaves
    tb_fns = {
        "seq": _fwd_bwd(lambda: hebbian_scan_sequential(qg, kg, vg, ldg, 1.0)[0], leaves),
        "chunked": _fwd_bwd(lambda: hebbian_scan_chunked(qg, kg, vg, ldg, 1.0, chunk_size=c)[0], leaves),
        "seq+rule": _fwd_bwd(lambda: hebbian_scan_sequential(qg, kg, vg, ldg, 1.0, boundary=_rule(args, device),
                                                             period=c)[0], leaves),
        "chunked+rule": _fwd_bwd(lambda: hebbian_scan_chunked(qg, kg, vg, ldg, 1.0, chunk_size=c,
                                                              boundary=_rule(args, device))[0], leaves),
    }
    tb = time_interleaved(tb_fns, device, args.rounds)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    def row(label: str, key: str, diff: float) -> str:
        seq, chk = f"seq{key}", f"chunked{key}"
        return (f"| {label} | {t[seq]:.1f} | {t[chk]:.1f} | {t[seq] / t[chk]:.1f}x | {tb[seq]:.1f} | {tb[chk]:.1f} | "
                f"{tb[seq] / tb[chk]:.1f}x | {diff:.1e} |")

    ops = {key: count_launches(tb_fns[key]).launches for key in ("seq", "chunked", "seq+rule", "chunked+rule")}
    lines += [(f"At {args.ref_len} tokens (target: chunked >= 10x faster than sequential); forward = inference "
               "prefill, forward+backward = a training step's share; launches = PyTorch operations that are not "
               "views + Triton launches of one forward+backward (models/utils/launches.py):"), "",
              ("| memory | sequential fwd ms | chunked fwd ms | fwd speedup | sequential fwd+bwd ms "
               "| chunked fwd+bwd ms | fwd+bwd speedup | rel. difference | launches seq / chunked |"),
              "|---|---|---|---|---|---|---|---|---|",
              row("plain", "", rel(out_plain, ref_plain)) + f" {ops['seq']} / {ops['chunked']} |",
              row("with boundary rule", "+rule", rel(out_rule, ref_rule)) + f" {ops['seq+rule']} / "
              f"{ops['chunked+rule']} |", ""]
    for key, label in (("", "plain"), ("+rule", "with the SNR rule")):
        for name, times in (("fwd", t), ("fwd+bwd", tb)):
            ratio = times[f"seq{key}"] / times[f"chunked{key}"]
            VERDICTS.add("scan", f"{device.type}: chunked {label} >= 10x sequential, {name}, {args.ref_len} tokens",
                         f"{ratio:.1f}x", ratio >= 10)
    if device.type == "cuda":  # the fused backends: the rule kernel + Triton / fla attention
        from models.layers.fast_weights_fla import HAS_FLA

        for backend in ("triton", "fla") if HAS_FLA else ("triton",):
            def fused(backend: str = backend) -> torch.Tensor:
                return hebbian_scan_fused(qg, kg, vg, ldg, 1.0, chunk_size=c, rule=_rule(args, device),
                                          backend=backend)[0]
            tf = time_interleaved({"seq": tb_fns["seq+rule"], "fused": _fwd_bwd(fused, leaves)}, device, args.rounds)
            ratio = tf["seq"] / tf["fused"]
            lines.append(f"fused {backend} with the rule, fwd+bwd: {tf['fused']:.2f} ms, {ratio:.1f}x sequential, "
                         f"{count_launches(_fwd_bwd(fused, leaves)).launches} launches")
            VERDICTS.add("scan", f"GPU: fused {backend} + rule >= 10x sequential, fwd+bwd", f"{ratio:.1f}x",
                         ratio >= 10)
    else:
        VERDICTS.add("scan", "GPU: chunked / fused >= 10x sequential, fwd and fwd+bwd", "no GPU in this run", None)
    lines += ["Time vs length (ms); SDPA = causal softmax attention, same batch / heads / head size:", "",
              ("| tokens | sequential fwd | chunked fwd | chunked+rule fwd | SDPA fwd | chunked / SDPA fwd "
               "| chunked fwd+bwd | chunked+rule fwd+bwd | SDPA fwd+bwd | chunked / SDPA fwd+bwd |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for n in args.lengths:
        lines.append(_length_row(args, device, n))
        print(lines[-1], flush=True)
    return lines


# ------------------------------------------------------------------------------------------------------ memory
N_VALUES, FILLER0, N_FILLER = 8, 9, 32  # value tokens 1..8, filler tokens 9..40, the query token 41, vocab 64
QUERY, VOCAB = FILLER0 + N_FILLER, 64


def copy_batch(batch: int, distance: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (batch, distance + 2), answers (batch,)): value, ``distance`` fillers, query."""
    values = torch.randint(1, N_VALUES + 1, (batch,), generator=gen)
    fill = torch.randint(FILLER0, FILLER0 + N_FILLER, (batch, distance), generator=gen)
    query = torch.full((batch, 1), QUERY)
    return torch.cat([values[:, None], fill, query], 1), values


def _tiny_phase2(base_decay: float, seed: int):
    from models.lm.phase2 import Phase2Config, Phase2LM

    torch.manual_seed(seed)
    return Phase2LM(Phase2Config(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, head_dim=16, chunk_size=16,
                                 bk_chunk_size=64, base_decay=base_decay, reset_token=None))


def train_copy(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> float:
    """Cross-entropy at the query only; distances uniform in 1..train_max_distance. Returns seconds."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.memory_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1000)
    t0 = time.perf_counter()
    for _ in range(args.memory_steps):
        distance = int(torch.randint(1, args.train_max_distance + 1, (), generator=gen))
        x, y = copy_batch(args.memory_batch, distance, gen)
        logits = model(x.to(device))[:, -1]
        loss = F.cross_entropy(logits.float(), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return time.perf_counter() - t0


@torch.no_grad()
def copy_accuracy(model: torch.nn.Module, distance: int, n: int, seed: int, device: torch.device) -> float:
    model.eval()
    x, y = copy_batch(n, distance, torch.Generator().manual_seed(seed + distance))
    return (model(x.to(device))[:, -1].argmax(-1).cpu() == y).float().mean().item()


def memory_section(args: argparse.Namespace, device: torch.device) -> list[str]:
    dists = args.distances
    lines = [(f"### Copy at a distance: accuracy vs distance by base_decay (tiny Phase 2 LM, d 32, 2 layers, "
              f"{args.memory_steps} steps of {args.memory_batch}, lr {args.memory_lr:g}, trained on distances "
              f"1..{args.train_max_distance}, tested on {args.memory_test} fresh sequences per distance; "
              f"chance {1 / N_VALUES:.3f})"), "",
             "| base_decay | horizon 1/base_decay | " + " | ".join(f"d={d}" for d in dists) + " | train s |",
             "|---|---|" + "---|" * len(dists) + "---|"]
    first, trained, same_weights = None, {}, {}
    for decay in args.decays:
        model = _tiny_phase2(decay, seed=0)
        secs = train_copy(model, args, device)
        first = first or (decay, model)
        acc = [copy_accuracy(model, d, args.memory_test, 50_000, device) for d in dists]
        trained[decay] = acc
        horizon = "inf" if decay == 0 else f"{1 / decay:.0f}"
        lines.append(f"| {decay:g} | {horizon} | " + " | ".join(f"{a:.3f}" for a in acc) + f" | {secs:.0f} |")
        print(lines[-1], flush=True)
    lines.append("| do nothing (chance) | - | " + " | ".join(f"{1 / N_VALUES:.3f}" for _ in dists) + " | - |")
    # Same weights, only the floor of Gamma changed at test time: forgetting isolated from learnability.
    trained_with, model = first
    lines += ["", (f"Same weights (the model trained with base_decay {trained_with:g}), base_decay raised at test time "
                   "only (it lifts Gamma in the memory and in the BK potential):"), "",
              "| base_decay at test | " + " | ".join(f"d={d}" for d in dists) + " |", "|---|" + "---|" * len(dists)]
    for decay in args.decays:
        for block in model.blocks:
            block.memory.base_decay = decay
        acc = [copy_accuracy(model, d, args.memory_test, 50_000, device) for d in dists]
        same_weights[decay] = acc
        lines.append(f"| {decay:g} | " + " | ".join(f"{a:.3f}" for a in acc) + " |")
        print(lines[-1], flush=True)
    best_d1 = max(trained[d][0] for d in trained)
    VERDICTS.add("memory", f"the memory learns: best accuracy at distance {dists[0]} >= 0.5 (chance "
                 f"{1 / N_VALUES:.3f})", f"{best_d1:.3f}", best_d1 >= 0.5)
    inside = max(i for i, d in enumerate(dists) if d <= args.train_max_distance)
    lo, hi = min(args.decays), max(args.decays)
    drop = same_weights[lo][inside] - same_weights[hi][inside]
    VERDICTS.add("memory", f"forgetting acts: same weights, accuracy at d={dists[inside]} drops >= 0.1 from "
                 f"base_decay {lo:g} to {hi:g}", f"{drop:+.3f}", drop >= 0.1)
    return lines


# ----------------------------------------------------------------------------------------------------- compare
def _windows(split: str, seq_len: int, max_windows: int | None):
    from datamodules.text import TextDataModule

    dm = TextDataModule(seq_len=seq_len, batch_size=1, max_windows=max_windows)
    return dm.load_split(split)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _matched(build: Callable[[int | None], torch.nn.Module], target: int) -> Callable[[], torch.nn.Module]:
    """The builder with the MLP width that brings its parameter count closest to ``target``."""
    base, step = _params(build(512)), _params(build(513)) - _params(build(512))
    width = max(16, 512 + round((target - base) / step))
    return lambda: build(width)


def _lm_candidates(target: int, seq_len: int) -> dict[str, Callable[[], torch.nn.Module]]:
    """Builders at about ``target`` parameters (MLP width matched): Phase 2, GPT, and Phase 1 when this checkout
    has it (models/lm/phase1, issue 10: BK mixer + AR-SSM blocks, its default features; gradient checkpointing off,
    a memory-for-time trade that is not part of the model)."""
    from models.lm.gpt import GPT, Config
    from models.lm.phase2 import Phase2Config, Phase2LM

    out = {"phase2": lambda: Phase2LM(Phase2Config(d_model=128, n_layers=2, n_heads=2, head_dim=64)),
           "gpt": _matched(lambda w: GPT(Config(n_layer=3, n_head=4, n_embd=128, block_size=seq_len,
                                                intermediate_size=w)), target)}
    try:
        from models.lm.phase1 import Phase1Config, create_phase1_model
    except ImportError:
        return out
    out["phase1"] = _matched(lambda w: create_phase1_model(Phase1Config(
        d_model=128, n_layers=2, n_seq=seq_len, intermediate_size=w, use_gradient_checkpointing=False)), target)
    return out


@torch.no_grad()
def _eval_loss(model: torch.nn.Module, data, batch: int, device: torch.device) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch):
        items = [data[j] for j in range(i, min(i + batch, len(data)))]
        x = torch.stack([it["input_ids"] for it in items]).to(device)
        y = torch.stack([it["labels"] for it in items]).to(device)
        total += F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        count += y.numel()
    model.train()
    return total / count


def _unigram_loss(train, data) -> float:
    counts = torch.bincount(train.tokens.long(), minlength=256).double() + 1.0
    logp = (counts / counts.sum()).log()
    ids = torch.cat([data[i]["labels"] for i in range(len(data))])
    return -logp[ids].mean().item()


def compare_section(args: argparse.Namespace, device: torch.device) -> list[str]:
    seq, batch = args.lm_seq_len, args.lm_batch
    train = _windows("train", seq, None)
    val, test = _windows("val", seq, args.lm_eval_windows), _windows("test", seq, args.lm_eval_windows)
    target = _params(_lm_candidates(0, seq)["phase2"]())
    builders = _lm_candidates(target, seq)
    lines = [(f"### Phase 2 vs Phase 1 vs GPT on the stdlib corpus (seq {seq}, batch {batch}, {args.lm_steps} steps, "
              f"AdamW lr {args.lm_lr:g}, cosine to 1e-6, clip 1.0, same windows in the same order; "
              f"{len(val)} val / {len(test)} test windows)"), ""]
    if "phase1" not in builders:
        lines += ["Phase 1 LM: not in this checkout (models/lm/phase1); row omitted.", ""]
    lines += ["| model | params | val loss | test loss | test bits/byte | train tokens/s | tokens/s vs GPT |",
              "|---|---|---|---|---|---|---|"]
    rows = {}
    for name, build in builders.items():
        torch.manual_seed(0)
        model = build().to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lm_lr, weight_decay=0.01)
        floor = 1e-6 / args.lm_lr
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * s / args.lm_steps)))
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
        times = []
        for step in range(args.lm_steps):
            idx = order[(step * batch) % len(order):][:batch]
            x = torch.stack([train[int(i)]["input_ids"] for i in idx]).to(device)
            y = torch.stack([train[int(i)]["labels"] for i in idx]).to(device)
            sync(device)
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
            loss = loss + getattr(model, "aux_loss", 0.0)  # Phase 1's AR-SSM gate L1 term (its recipe)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            sync(device)
            times.append(time.perf_counter() - t0)
        tps = batch * seq / statistics.median(times[1:] or times)
        rows[name] = (sum(p.numel() for p in model.parameters()), _eval_loss(model, val, batch, device),
                      _eval_loss(model, test, batch, device), tps)
        print(name, rows[name], flush=True)
    gpt_tps = rows["gpt"][3]
    for name, (params, vl, tl, tps) in rows.items():
        lines.append(f"| {name} | {params:,} | {vl:.3f} | {tl:.3f} | {tl / math.log(2):.3f} | {tps:,.0f} | "
                     f"{tps / gpt_tps:.2f} |")
    ul = _unigram_loss(train, test)
    lines.append(f"| do nothing (unigram of train bytes) | 256 | {_unigram_loss(train, val):.3f} | {ul:.3f} | "
                 f"{ul / math.log(2):.3f} | - | - |")
    p2, gpt = rows["phase2"][2], rows["gpt"][2]
    VERDICTS.add("compare", "Phase 2 test loss below the do-nothing (unigram) baseline", f"{p2:.3f} vs {ul:.3f}",
                 p2 < ul)
    VERDICTS.add("compare", "Phase 2 test loss within 5 % of GPT's (equal parameters and steps)",
                 f"{p2 / gpt:.3f} x GPT", p2 <= 1.05 * gpt)
    return lines


SECTIONS: dict[str, Callable[[argparse.Namespace, torch.device], list[str]]] = {
    "scan": scan_section, "memory": memory_section, "compare": compare_section}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--section", choices=sorted(SECTIONS), action="append",
                        help="section(s) to run (repeatable); default: all")
    parser.add_argument("--quick", action="store_true", help="lengths 1024-4096 and 2 rounds")
    parser.add_argument("--check", action="store_true", help="exit 1 when a measured target is missed")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--ref-len", type=int, default=4096)
    parser.add_argument("--resonance-damping", type=float, default=0.0,
                        help="scan: damping of the boundary rule (0 = the Phase 2 configs' default: SNR filter only)")
    parser.add_argument("--seq-max", type=int, default=4096, help="longest length timed with the sequential loop")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per variant (default 3, quick 2)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--decays", type=float, nargs="+", default=[0.0, 0.01, 0.05, 0.2],
                        help="memory: base_decay values")
    parser.add_argument("--distances", type=int, nargs="+", default=None, help="memory: test distances")
    parser.add_argument("--train-max-distance", type=int, default=64)
    parser.add_argument("--memory-steps", type=int, default=None, help="memory: training steps (default 800)")
    parser.add_argument("--memory-batch", type=int, default=32)
    parser.add_argument("--memory-lr", type=float, default=3e-3)
    parser.add_argument("--memory-test", type=int, default=512, help="memory: test sequences per distance")
    parser.add_argument("--lm-seq-len", type=int, default=256)
    parser.add_argument("--lm-batch", type=int, default=8)
    parser.add_argument("--lm-steps", type=int, default=None, help="compare: training steps (default 300)")
    parser.add_argument("--lm-lr", type=float, default=1e-3)
    parser.add_argument("--lm-eval-windows", type=int, default=64, help="compare: windows per evaluation split")
    args = parser.parse_args()
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.distances = args.distances or [1, 4, 16, 32, 64, 128, 256]
    args.memory_steps = args.memory_steps or (400 if args.quick else 800)
    args.lm_steps = args.lm_steps or (120 if args.quick else 300)
    args.lengths = args.lengths or ([1024, 2048, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384])
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for name in args.section or sorted(SECTIONS):
        t0 = time.perf_counter()
        lines = SECTIONS[name](args, device)
        print("\n" + "\n".join(lines) + f"\n\n({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
    print("\nTargets:\n\n" + VERDICTS.table())
    sys.exit(VERDICTS.exit_code(args.check))


if __name__ == "__main__":
    main()
