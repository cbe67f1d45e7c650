"""The GPU benchmark sections side by side in one process, each with its target and a verdict.

* ``mixer``: BK resolvent mixer vs causal SDPA attention (``benchmarks/phase1.py``'s pair: ``BKMixer`` and
  ``CausalSelfAttention``, d_model 256, 4 heads, batch 1) at 4096 and 16384 tokens, forward+backward time and
  peak memory. Targets (the Phase 1 guide's, as in ``phase1.py --section mixer``): BK time(16384)/time(4096)
  <= 4.5 and BK faster than SDPA at both lengths.
* ``phase2``: the fast-weight memory at 4096 tokens, sequential reference vs chunked form (``benchmarks/phase2.py``'s
  inputs, batch 1, 8 heads x 64, chunk 64), forward and forward+backward. Target: chunked >= 10x faster.
* ``qlora``: one training step (forward, backward, AdamW) of the ViT-S TrackNet of
  ``configs/tracknet_dinov3_qlora.yaml`` (512x288, 3 frames, random init, batch 8, bf16 autocast on CUDA) with
  LoRA vs with QLoRA (NF4 + double quantization). Target: QLoRA's peak memory (resident weights + step)
  below LoRA's; the time ratio is reported.

Variants run interleaved (one call each per round, after a warm-up call; median over rounds). ``--dry-run``: the
same code at tiny sizes on the CPU.

    python benchmarks/gpu/bench.py --json /tmp/bench.json
    python benchmarks/gpu/bench.py --dry-run --json /tmp/bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import phase1 as bench_phase1  # noqa: E402  (benchmarks/phase1.py)
import phase2 as bench_phase2  # noqa: E402  (benchmarks/phase2.py)
import torch  # noqa: E402
import yaml  # noqa: E402

from benchmarks.timing import time_interleaved  # noqa: E402
from models.utils.memory import measure_peak_memory  # noqa: E402

MIB = 2**20


def figure(name: str, value: float | None, unit: str, target: str, ok: bool | None) -> dict[str, Any]:
    """One reported number: ``verdict`` is pass / fail, or ``info`` where the figure has no target."""
    verdict = "info" if ok is None else ("pass" if ok else "fail")
    value = None if value is None or value != value else float(value)  # NaN (unmeasured) -> null in the JSON
    return {"name": name, "value": value, "unit": unit, "target": target, "verdict": verdict}


def mixer_section(device: torch.device, dry: bool, rounds: int) -> list[dict[str, Any]]:
    d_model, heads, chunk = (32, 2, 16) if dry else (256, 4, 256)
    lengths = (64, 256) if dry else (4096, 16384)
    torch.manual_seed(0)
    models = {"bk": bench_phase1.BKMixer(d_model, chunk_size=chunk).to(device),
              "sdpa": bench_phase1.CausalSelfAttention(d_model, heads).to(device)}
    ms: dict[tuple[str, int], float] = {}
    peak: dict[tuple[str, int], float] = {}
    for n in lengths:
        x = torch.randn(1, n, d_model, device=device, requires_grad=True)
        steps = {name: (lambda m=m: m(x).square().mean().backward()) for name, m in models.items()}
        for name, t in time_interleaved(steps, device, rounds).items():
            ms[name, n] = t
        for name, step in steps.items():
            peak[name, n] = measure_peak_memory(step, device) if device.type == "cuda" else float("nan")
        for m in models.values():
            m.zero_grad(set_to_none=True)
    short, long = lengths
    out = []
    for n in lengths:
        out.append(figure(f"BK fwd+bwd at {n} tokens", ms["bk", n], "ms",
                          f"faster than SDPA ({ms['sdpa', n]:.1f} ms)", ms["bk", n] < ms["sdpa", n]))
        out.append(figure(f"SDPA fwd+bwd at {n} tokens", ms["sdpa", n], "ms", "reference", None))
        out.append(figure(f"BK / SDPA peak memory at {n} tokens", peak["bk", n] / max(peak["sdpa", n], 1e-9), "x",
                          f"BK {peak['bk', n]:.0f} MiB, SDPA {peak['sdpa', n]:.0f} MiB", None))
    scaling = ms["bk", long] / ms["bk", short]
    out.append(figure(f"BK time({long}) / time({short})", scaling, "x", "<= 4.5 (linear: 4.0)", scaling <= 4.5))
    out.append(figure(f"SDPA time({long}) / time({short})", ms["sdpa", long] / ms["sdpa", short], "x",
                      "reference (quadratic: 16)", None))
    return out


def phase2_section(device: torch.device, dry: bool, rounds: int) -> list[dict[str, Any]]:
    args = argparse.Namespace(batch=1, heads=2 if dry else 8, head_dim=16 if dry else 64, dtype="float32")
    n, chunk = (128, 16) if dry else (4096, 64)
    rounds = min(rounds, 3)  # the sequential loop takes seconds per call on a GPU (4096 steps of small kernels)
    q, k, v, ld = bench_phase2._inputs(args, n, device)
    seq, chunked = bench_phase2.hebbian_scan_sequential, bench_phase2.hebbian_scan_chunked
    with torch.no_grad():
        fwd = time_interleaved({"seq": lambda: seq(q, k, v, ld, 1.0),
                                             "chunked": lambda: chunked(q, k, v, ld, 1.0, chunk_size=chunk)},
                                            device, rounds)
        ref, got = seq(q, k, v, ld, 1.0)[0], chunked(q, k, v, ld, 1.0, chunk_size=chunk)[0]
        rel = ((got - ref).norm() / ref.norm()).item()
    leaves = bench_phase2._inputs(args, n, device, grad=True)
    qg, kg, vg, ldg = leaves
    both = time_interleaved({
        "seq": bench_phase2._fwd_bwd(lambda: seq(qg, kg, vg, ldg, 1.0)[0], leaves),
        "chunked": bench_phase2._fwd_bwd(lambda: chunked(qg, kg, vg, ldg, 1.0, chunk_size=chunk)[0], leaves),
    }, device, rounds)
    return [
        figure(f"Phase 2 forward speed-up, chunked vs sequential, {n} tokens", fwd["seq"] / fwd["chunked"], "x",
               f">= 10 (sequential {fwd['seq']:.1f} ms, chunked {fwd['chunked']:.1f} ms)",
               fwd["seq"] / fwd["chunked"] >= 10),
        figure(f"Phase 2 fwd+bwd speed-up, chunked vs sequential, {n} tokens", both["seq"] / both["chunked"], "x",
               f">= 10 (sequential {both['seq']:.1f} ms, chunked {both['chunked']:.1f} ms)",
               both["seq"] / both["chunked"] >= 10),
        figure("Phase 2 chunked vs sequential relative difference", rel, "", "< 1e-3 (fp32)", rel < 1e-3),
    ]


def _tracknet_args(dry: bool, quantized: bool) -> dict[str, Any]:
    """The model of configs/tracknet_dinov3_qlora.yaml (random init), with or without 4-bit weights."""
    cfg = yaml.safe_load((REPO / "configs" / "tracknet_dinov3_qlora.yaml").read_text())["model"]["init_args"]
    cfg["backbone"] = {**cfg["backbone"], "pretrained_file": None}
    cfg["quantization"] = {**cfg["quantization"], "enabled": quantized}
    if dry:  # a ViT-Ti backbone at 64x32: the same code, CPU-sized
        cfg.update(pretrained_model_name="vit_tiny_patch16_224", img_size=[64, 32],
                   heatmap={"size": [32, 16], "sigma": 2.0}, decoder={"channels": [192, 32, 16], "upsample": [2, 2]})
    return cfg


def qlora_section(device: torch.device, dry: bool, rounds: int) -> list[dict[str, Any]]:
    from lightning_modules.tracknet import HeatmapTracker

    batch = 2 if dry else 8
    models, opts, resident = {}, {}, {}
    for name, quantized in (("lora", False), ("qlora", True)):
        torch.manual_seed(0)
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        models[name] = HeatmapTracker(**_tracknet_args(dry, quantized)).to(device)
        resident[name] = (torch.cuda.memory_allocated(device) - before) / MIB if device.type == "cuda" else 0.0
        opts[name] = models[name].configure_optimizers()
    w, h = models["lora"].hparams.img_size or models["lora"].hparams.heatmap["size"]
    frames = torch.rand(batch, 3 * models["lora"].hparams.num_frames, h, w, device=device)
    with torch.no_grad():
        target = (torch.rand_like(models["lora"](frames).float()) > 0.99).float()

    def step(name: str) -> Callable[[], None]:
        model, opt = models[name], opts[name]

        def run() -> None:
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                loss = model._loss(model(frames), target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    ms = time_interleaved({name: step(name) for name in models}, device, rounds)
    cuda = device.type == "cuda"
    peak = {name: resident[name] + measure_peak_memory(step(name), device) if cuda else float("nan") for name in models}
    ok = peak["qlora"] < peak["lora"] if cuda else None
    return [
        figure("ViT-S TrackNet step, QLoRA-nf4-dq / LoRA time", ms["qlora"] / ms["lora"], "x",
               f"reported (LoRA {ms['lora']:.1f} ms, QLoRA {ms['qlora']:.1f} ms, batch {batch})", None),
        figure("ViT-S TrackNet step, QLoRA-nf4-dq / LoRA peak memory", peak["qlora"] / max(peak["lora"], 1e-9), "x",
               f"< 1 (LoRA {peak['lora']:.0f} MiB, QLoRA {peak['qlora']:.0f} MiB: resident weights + step)", ok),
    ]


SECTIONS: dict[str, Callable[[torch.device, bool, int], list[dict[str, Any]]]] = {
    "mixer": mixer_section, "phase2": phase2_section, "qlora": qlora_section}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per variant (default 5, dry run 1)")
    parser.add_argument("--section", choices=sorted(SECTIONS), action="append", help="default: all")
    parser.add_argument("--json", required=True, help="write {section: {figures, seconds, error}} here")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.dry_run:
        parser.error("no CUDA device: use --dry-run")
    rounds = args.rounds or (1 if args.dry_run else 5)
    results: dict[str, Any] = {}
    failed = False
    for name in args.section or list(SECTIONS):
        t0 = time.perf_counter()
        try:
            results[name] = {"figures": SECTIONS[name](device, args.dry_run, rounds)}
        except Exception as e:  # noqa: BLE001  (one broken section must not hide the others)
            failed = True
            traceback.print_exc()
            results[name] = {"figures": [], "error": f"{type(e).__name__}: {e}"[:2000]}
        if args.dry_run:  # tiny CPU sizes: the figures only show the code ran
            for f in results[name]["figures"]:
                f["verdict"] = "skipped (dry run)"
        results[name]["seconds"] = time.perf_counter() - t0
        results[name]["device"] = str(device)
        Path(args.json).write_text(json.dumps(results, indent=1))
        for f in results[name]["figures"]:
            print(f"{name}: {f['name']}: {f['value']} {f['unit']} (target {f['target']}): {f['verdict']}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
