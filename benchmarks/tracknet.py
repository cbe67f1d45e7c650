"""TrackNet fine-tuning modes side by side: full fine-tune, LoRA, QLoRA-nf4, QLoRA-nf4 + double quantization.

For each mode (each in its own process, so peak RSS is its own): backbone weight bytes (parameters and
buffers, and the linear weights alone), trainable parameters, peak RSS, mean train-step time, and
validation F1/precision/recall after the same fixed budget of steps on the same generated clips.
Prints a markdown table with ratios to full fine-tuning.

    python benchmarks/tracknet.py                      # CPU defaults (a few minutes)
    python benchmarks/tracknet.py --model vit_small_patch16_224 --steps 200 --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = ("full", "lora", "qlora_nf4", "qlora_nf4_dq")


def variant_config(name: str, args: argparse.Namespace) -> dict:
    """TrackNet constructor arguments for one mode (everything else shared)."""
    lora = {"enabled": True, "r": args.rank, "lora_alpha": 2 * args.rank, "lora_dropout": 0.0}
    quant = {"enabled": True, "quant_type": "nf4", "compute_dtype": args.compute_dtype, "mode": "manual"}
    cfg = dict(pretrained_model_name=args.model, backbone={"freeze": True, "patch_size": 8, "pretrained_file": None},
               decoder={"channels": [args.width, 128, 64, 32], "upsample": [2, 2, 2]},
               heatmap={"size": [128, 72], "sigma": 2.0}, lr=args.lr)
    if name == "full":
        cfg["backbone"]["freeze"] = False
        cfg["lr"] = args.lr / 5  # full fine-tuning of a whole ViT needs a smaller step than adapters
    elif name == "lora":
        cfg["lora"] = lora
    elif name == "qlora_nf4":
        cfg.update(lora=lora, quantization={**quant, "compress_statistics": False, "use_double_quant": False})
    elif name == "qlora_nf4_dq":
        cfg.update(lora=lora, quantization={**quant, "compress_statistics": True, "use_double_quant": True})
    return cfg


def backbone_bytes(vit) -> tuple[int, int]:
    """(all backbone parameter + buffer bytes, bytes of the linear weights only) — packed 4-bit counted as stored."""
    from torch import nn

    total = sum(t.numel() * t.element_size() for t in list(vit.parameters()) + list(vit.buffers()))
    linear = 0
    for m in vit.modules():
        if isinstance(m, nn.Linear):
            linear += m.weight.numel() * m.weight.element_size()
        elif hasattr(m, "storage_bytes"):
            linear += int(m.storage_bytes())
    return total, linear


def run_one(name: str, args: argparse.Namespace) -> dict:
    """Train one mode for ``args.steps`` steps and evaluate; runs inside the child process."""
    import torch

    from datamodules.tracknet import TrackNetDataModule
    from lightning_modules.tracknet import TrackNet
    from models.lora import count_parameters
    from models.tracknet_metrics import TrackNetMetrics

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dm = TrackNetDataModule(heatmap={"size": [128, 72], "sigma": 2.0}, batch_size=args.batch_size,
                            val_fraction=0.25, test_fraction=0.0, synthetic_dir=args.data_dir,
                            synthetic={"num_clips": args.clips, "frames_per_clip": 48, "width": 256, "height": 144})
    dm.prepare_data()
    dm.setup("fit")
    train = list(dm.train_dataloader())  # decode once; every mode sees the same batches in the same order
    val = list(dm.val_dataloader())
    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = TrackNet(**variant_config(name, args)).to(args.device)
    weight_bytes, linear_bytes = backbone_bytes(model.model.backbone)
    opt = model.configure_optimizers()
    model.train()
    times = []
    for step in range(args.steps):
        batch = train[step % len(train)]
        t0 = time.perf_counter()
        loss = model._loss(model(batch["frames"].to(args.device)), batch["heatmap"].to(args.device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    model.eval()
    metric = TrackNetMetrics(threshold=0.5, tolerance=4.0)
    val_losses = []
    with torch.no_grad():
        for batch in val:
            logits = model(batch["frames"].to(args.device))
            val_losses.append(float(model._loss(logits, batch["heatmap"].to(args.device))))
            metric.update(torch.sigmoid(logits.float()).cpu(), batch["xy"], batch["visible"])
    m = metric.compute()
    skip = min(3, len(times) - 1)
    return {
        "variant": name, "weight_bytes": weight_bytes, "linear_bytes": linear_bytes,
        "trainable": count_parameters(model), "total_params": count_parameters(model, trainable_only=False),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "base_rss_mb": rss_base / 1024,
        "step_s": sum(times[skip:]) / len(times[skip:]), "val_loss": sum(val_losses) / len(val_losses),
        **{k: float(m[k]) for k in ("f1", "precision", "recall", "accuracy")},
    }


def markdown(rows: list[dict]) -> str:
    ref = next((r for r in rows if r["variant"] == "full"), rows[0])
    head = ("| mode | backbone bytes (MB) | x full | linear weights (MB) | x full | trainable params | "
            "peak RSS (MB) | RSS over data-loaded baseline (MB) | step (s) | x full | val loss | val F1 | precision | recall |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['weight_bytes'] / 1e6:.1f} | {r['weight_bytes'] / ref['weight_bytes']:.3f} | "
            f"{r['linear_bytes'] / 1e6:.2f} | {r['linear_bytes'] / ref['linear_bytes']:.3f} | {r['trainable']:,} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['base_rss_mb']:.0f} | {r['step_s']:.3f} | {r['step_s'] / ref['step_s']:.2f} | {r['val_loss']:.4f} | {r['f1']:.3f} | "
            f"{r['precision']:.3f} | {r['recall']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_tiny_patch16_224")
    p.add_argument("--width", type=int, default=192, help="first decoder width (the ViT width)")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--clips", type=int, default=12)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--compute-dtype", default="float32", help="QLoRA matmul dtype (bfloat16 on GPUs)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--data-dir", default=None, help="generated clips (default: a temp folder)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child, args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.data_dir = args.data_dir or tmp
        base = [a for a in (argv if argv is not None else sys.argv[1:]) if a]
        rows = []
        for name in args.variants:
            if name.startswith("qlora"):
                try:
                    import models.quantization  # noqa: F401
                except ImportError:
                    print(f"skipping {name}: models.quantization is not available", file=sys.stderr)
                    continue
            cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--data-dir", args.data_dir, "--child", name]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO))
            if res.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{res.stderr[-4000:]}")
            rows.append(json.loads(next(l for l in res.stdout.splitlines() if l.startswith("RESULT "))[7:]))
            r = rows[-1]
            print(f"{name}: step {r['step_s']:.3f}s, F1 {r['f1']:.3f}, peak RSS {r['peak_rss_mb']:.0f} MB",
                  file=sys.stderr)
    print(f"\nmodel {args.model}, {args.steps} steps x batch {args.batch_size}, device {args.device}, "
          f"{args.threads} thread(s), QLoRA compute dtype {args.compute_dtype}\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
