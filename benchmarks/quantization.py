"""4-bit quantization benchmark: linear-weight storage per format, then peak RSS and step time of full
fine-tuning vs LoRA vs QLoRA-nf4 vs QLoRA-nf4 + double quantization on a timm ViT.

Each training variant runs in its own subprocess. Peak RSS comes from the process's ``VmHWM`` (Linux),
not ``getrusage``: ``ru_maxrss`` survives ``fork``/``exec`` and would report the parent's peak. The
training-phase peak is ``VmHWM`` again after resetting it (``/proc/self/clear_refs``) once the model is
built. QLoRA variants: ``--compute-dtype`` (default ``auto``: bfloat16 where the CPU computes it natively,
else float32), then explicit ``-fp32`` and ``-bf16`` (what the other choice costs on this CPU) and ``-saved``
(``save_dequantized``: one dequantization per step instead of two; ``-fp32-saved`` both). Every figure of a
row comes from one run: each variant runs ``--repeats`` times (interleaved), the run with the median step time
is reported whole, and a run's step time is the median of its timed steps. Prints markdown tables with the CPU model.

    python benchmarks/quantization.py                      # vit_small_patch16_224, img 64, batch 8
    python benchmarks/quantization.py --model vit_base_patch16_224 --steps 3
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from models.adapters.lora import count_parameters, inject_lora  # noqa: E402
from models.quant import Linear4bit, linear_weight_report, quantize_model  # noqa: E402
from models.utils.memory import cpu_model, proc_status_kib, reset_peak_rss  # noqa: E402
from models.vision.vit import create_vit  # noqa: E402

VARIANTS = ("full", "lora", "qlora-nf4", "qlora-nf4-dq", "qlora-nf4-dq-fp32", "qlora-nf4-dq-bf16",
            "qlora-nf4-dq-saved", "qlora-nf4-dq-fp32-saved")
MB = 2**20


def _build(args: argparse.Namespace, variant: str) -> nn.Module:
    torch.manual_seed(0)
    vit = create_vit(args.model, img_size=args.img_size, num_classes=10)
    if variant != "full":
        inject_lora(vit, r=args.rank, lora_alpha=2 * args.rank)
        if variant.startswith("qlora"):
            compute = "float32" if "-fp32" in variant else "bfloat16" if "-bf16" in variant else args.compute_dtype
            quantize_model(vit, "nf4", compute, use_double_quant="-dq" in variant, skip_modules=["head"],
                           save_dequantized=variant.endswith("-saved"))
        vit.head.weight.requires_grad_(True)  # the new classifier trains in every variant
        vit.head.bias.requires_grad_(True)
    return vit


def worker(args: argparse.Namespace) -> None:
    """One variant: build, one warm-up step, ``--steps`` timed steps; prints a JSON line."""
    torch.set_num_threads(args.threads)
    rss_import = proc_status_kib("VmRSS") / 1024
    vit = _build(args, args.worker)
    rss_built = proc_status_kib("VmRSS") / 1024
    build_peak = proc_status_kib("VmHWM") / 1024
    params = [p for p in vit.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch,))
    reset = reset_peak_rss()
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(vit(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # step 0 is the warm-up
            times.append(time.perf_counter() - t0)
    print("RESULT" + json.dumps({
        "variant": args.worker,
        "trainable": count_parameters(vit),
        "linear_weight_mb": linear_weight_report(vit)["bytes"] / MB,
        "rss_import_mb": rss_import,
        "rss_built_mb": rss_built,
        "peak_rss_mb": max(build_peak, proc_status_kib("VmHWM") / 1024),
        "train_peak_rss_mb": proc_status_kib("VmHWM") / 1024 if reset else float("nan"),
        "step_s": statistics.median(times),
        "loss": loss.item(),
    }))


def storage_table(args: argparse.Namespace) -> list[str]:
    torch.manual_seed(0)
    vit = create_vit(args.model, img_size=args.img_size)
    ref = {n: m.weight.detach().clone() for n, m in vit.named_modules() if isinstance(m, nn.Linear)}
    fp32 = linear_weight_report(vit)
    rows = [
        "| format | linear weight MB | bytes/param | bits/param | vs fp32 | rel. weight error |",
        "|---|---|---|---|---|---|",
        f"| fp32 | {fp32['bytes'] / MB:.2f} | 4.000 | 32.00 | 1.000 | 0 |",
        f"| bf16 | {fp32['bytes'] / 2 / MB:.2f} | 2.000 | 16.00 | 0.500 | "
        f"{_rel_error(ref, {n: w.bfloat16().float() for n, w in ref.items()}):.4f} |",
    ]
    for label, qt, dq in (("NF4", "nf4", False), ("NF4 + double quant", "nf4", True), ("FP4", "fp4", False),
                          ("FP4 + double quant", "fp4", True)):
        model = copy.deepcopy(vit)
        quantize_model(model, qt, "float32", use_double_quant=dq)
        rep = linear_weight_report(model)
        deq = {n: m.dequantize_weight(torch.float32) for n, m in model.named_modules() if isinstance(m, Linear4bit)}
        rows.append(
            f"| {label} | {rep['bytes'] / MB:.2f} | {rep['bytes_per_param']:.4f} | {rep['bits_per_param']:.3f} | "
            f"{rep['ratio_vs_fp32']:.4f} | {_rel_error(ref, deq):.4f} |"
        )
    return [f"Linear weights of `{args.model}` ({fp32['params'] / 1e6:.1f}M parameters):", ""] + rows


def _rel_error(ref: dict[str, torch.Tensor], approx: dict[str, torch.Tensor]) -> float:
    """||W - W_approx|| / ||W|| over all linear weights together."""
    num = sum(((ref[n] - approx[n]) ** 2).sum().item() for n in ref)
    return (num / sum((w**2).sum().item() for w in ref.values())) ** 0.5


def training_table(args: argparse.Namespace) -> list[str]:
    from models.quant import auto_compute_dtype, native_bf16

    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    for _ in range(args.repeats):  # variants interleaved: load on a shared CPU varies over time
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--worker", variant] + _passthrough(args)
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
            line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
            runs[variant].append(json.loads(line[len("RESULT"):]))
            print(f"  {variant}: {1000 * runs[variant][-1]['step_s']:.0f} ms/step", file=sys.stderr)
    # one whole run per variant: the one with the median step time (never per-field minima across runs)
    results = {v: sorted(rs, key=lambda r: r["step_s"])[(len(rs) - 1) // 2] for v, rs in runs.items()}
    lora = results["lora"]
    auto = str(auto_compute_dtype("cpu")).removeprefix("torch.")
    rows = [
        f"CPU: {cpu_model()} (native bf16: {native_bf16('cpu')}; compute_dtype auto = {auto}), torch "
        f"{torch.__version__}. `{args.model}`, img {args.img_size}, batch {args.batch}, LoRA r={args.rank} on "
        f"qkv/proj/fc1/fc2, QLoRA compute dtype {args.compute_dtype} unless the variant names one; per variant the "
        f"median-step-time run of {args.repeats}, its step time the median of {args.steps} steps; "
        f"{args.threads} thread(s):",
        "",
        "| variant | trainable params | linear weight MB | peak RSS MB (build + steps) | training-phase peak RSS MB "
        "| training peak above import MB | vs LoRA | step ms | step time vs LoRA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lora_train = lora["train_peak_rss_mb"] - lora["rss_import_mb"]
    for v, r in results.items():
        rows.append(
            f"| {v} | {r['trainable']:,} | {r['linear_weight_mb']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['train_peak_rss_mb']:.0f} | {r['train_peak_rss_mb'] - r['rss_import_mb']:.0f} | "
            f"{(r['train_peak_rss_mb'] - r['rss_import_mb']) / lora_train:.2f} | "
            f"{1000 * r['step_s']:.0f} | {r['step_s'] / lora['step_s']:.2f} |"
        )
    rows += ["", f"RSS right after importing torch/timm: {lora['rss_import_mb']:.0f} MB (included in every peak)."]
    return rows


def _passthrough(args: argparse.Namespace) -> list[str]:
    return [f"--model={args.model}", f"--img-size={args.img_size}", f"--batch={args.batch}", f"--steps={args.steps}",
            f"--rank={args.rank}", f"--compute-dtype={args.compute_dtype}", f"--threads={args.threads}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--compute-dtype", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    torch.set_num_threads(args.threads)
    print("\n".join(storage_table(args)) + "\n")
    print("\n".join(training_table(args)))


if __name__ == "__main__":
    main()
