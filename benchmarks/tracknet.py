"""TrackNet fine-tuning modes side by side: full fine-tune, LoRA, QLoRA-nf4, QLoRA-nf4 + double quantization.

Mirrors the real workflow (pretrained weights from a local file) without downloading anything: a
pre-training stage (its own process) fully trains the TrackNet ViT + decoder on generated clips of one seed
and saves the ViT state dict as a timm-loadable ``backbone.safetensors`` (and the decoder). Every mode then
starts from that file (``backbone.pretrained_file``) and fine-tunes on clips generated with another seed
(other trajectories, backgrounds, occluders). For each mode (each in its own process, so peak RSS is its
own): backbone weight bytes (parameters and buffers, and the linear weights alone), trainable parameters,
peak RSS, mean train-step time, and validation F1/precision/recall after the same fixed budget of steps.
Prints a markdown table with ratios to full fine-tuning.

    python benchmarks/tracknet.py                      # CPU defaults: timm test_vit, patch 4 (~5 minutes)
    python benchmarks/tracknet.py --model vit_tiny_patch16_224 --width 192 --patch-size 8 --pretrain-steps 350
    python benchmarks/tracknet.py --model vit_small_patch16_224 --steps 200 --device cuda

``--interleaved`` times training steps only, side by side in one process: LoRA, QLoRA-nf4 + double quantization
(``compute_dtype: auto``) and the same in float32, random-init weights, the variants' turns interleaved (order
rotated every round) so that load from other jobs hits all of them alike; medians and per-round ratios:

    python benchmarks/tracknet.py --interleaved --model vit_small_patch16_224 --width 384 --patch-size 8
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

from models.utils.memory import cpu_model  # noqa: E402

VARIANTS = ("full", "lora", "qlora_nf4", "qlora_nf4_dq")


def auto_note() -> str:
    from models.quant import auto_compute_dtype

    return f"auto = {str(auto_compute_dtype('cpu')).removeprefix('torch.')} on this CPU"


def decoder_upsample(patch_size: int) -> list[int]:
    """Three stage factors of 2 (or 1) that bring the patch grid back to the input (= heat-map) size."""
    factors, left = [], patch_size
    for _ in range(3):
        factors.append(2 if left > 1 else 1)
        left //= 2
    return factors


def variant_config(name: str, args: argparse.Namespace) -> dict:
    """TrackNet constructor arguments for one mode (everything else shared); ``pretrain`` = full training
    from random init, every other mode starts from ``args.pretrained_file``."""
    lora = {"enabled": True, "lora_r": args.rank, "lora_alpha": 2 * args.rank, "lora_dropout": 0.0}
    quant = {"enabled": True, "quant_type": "nf4", "compute_dtype": args.compute_dtype, "mode": "manual"}
    pretrained = None if name == "pretrain" else args.pretrained_file
    cfg = dict(pretrained_model_name=args.model,
               backbone={"freeze": True, "patch_size": args.patch_size, "pretrained_file": pretrained},
               decoder={"channels": [args.width, 128, 64, 32], "upsample": decoder_upsample(args.patch_size)},
               heatmap={"size": [128, 72], "sigma": args.sigma}, lr=args.lr, pos_weight=args.pos_weight,
               threshold=args.threshold)
    if name == "pretrain":
        cfg["backbone"]["freeze"] = False
        cfg["lr"] = args.pretrain_lr
    elif name == "full":
        cfg["backbone"]["freeze"] = False
        cfg["lr"] = args.full_lr  # full fine-tuning of a whole pretrained ViT needs a smaller step than adapters
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


def clips(args: argparse.Namespace, seed: int, num_clips: int) -> tuple[list[dict], list[dict]]:
    """Decoded train/val batches of the clips generated with ``seed`` (decoded once, so every mode sees the
    same batches in the same order)."""
    from datamodules.tracknet import TrackNetDataModule

    dm = TrackNetDataModule(heatmap={"size": [128, 72], "sigma": args.sigma}, batch_size=args.batch_size,
                            val_fraction=0.25, test_fraction=0.0, synthetic_dir=args.data_dir,
                            synthetic={"num_clips": num_clips, "frames_per_clip": 48, "width": 256, "height": 144,
                                       "seed": seed})
    dm.prepare_data()
    dm.setup("fit")
    return list(dm.train_dataloader()), list(dm.val_dataloader())


def evaluate(model, val: list[dict], args: argparse.Namespace) -> dict:
    """Validation loss and TrackNet F1/precision/recall/accuracy."""
    import torch

    from models.metrics.tracknet import TrackNetMetrics

    model.eval()
    metric = TrackNetMetrics(threshold=args.threshold, tolerance=4.0)
    losses = []
    with torch.no_grad():
        for batch in val:
            logits = model(batch["frames"].to(args.device))
            losses.append(float(model._loss(logits, batch["heatmap"].to(args.device))))
            metric.update(torch.sigmoid(logits.float()).cpu(), batch["xy"], batch["visible"])
    m = metric.compute()
    model.train()
    return {"val_loss": sum(losses) / len(losses),
            **{k: float(m[k]) for k in ("f1", "precision", "recall", "accuracy")}}


def run_one(name: str, args: argparse.Namespace) -> dict:
    """Train one mode (or the pre-training stage) and evaluate; runs inside the child process."""
    import torch

    from lightning_modules.tracknet import HeatmapTracker
    from models.adapters.lora import count_parameters

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pretrain = name == "pretrain"
    train, val = clips(args, *((args.pretrain_seed, args.pretrain_clips) if pretrain else (args.seed, args.clips)))
    steps = args.pretrain_steps if pretrain else args.steps
    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = HeatmapTracker(**variant_config(name, args)).to(args.device)
    if not pretrain and args.decoder_init == "pretrained":
        from safetensors.torch import load_file

        model.model.decoder.load_state_dict(load_file(str(Path(args.pretrained_file).with_name("decoder.safetensors"))))
    weight_bytes, linear_bytes = backbone_bytes(model.model.backbone)
    opt = model.configure_optimizers()
    model.train()
    times = []
    for step in range(steps):
        batch = train[step % len(train)]
        t0 = time.perf_counter()
        loss = model._loss(model(batch["frames"].to(args.device)), batch["heatmap"].to(args.device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"{name} step {step + 1}: train loss {loss.item():.4f}, val {evaluate(model, val, args)}",
                  file=sys.stderr, flush=True)
    result = evaluate(model, val, args)
    if pretrain:
        from safetensors.torch import save_file

        out = Path(args.pretrained_file)
        for module, path in ((model.model.backbone, out), (model.model.decoder, out.with_name("decoder.safetensors"))):
            save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path))
    skip = min(3, len(times) - 1)
    return {
        "variant": name, "weight_bytes": weight_bytes, "linear_bytes": linear_bytes,
        "trainable": count_parameters(model), "total_params": count_parameters(model, trainable_only=False),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "base_rss_mb": rss_base / 1024, "step_s": sum(times[skip:]) / len(times[skip:]),
        "train_s": sum(times), **result,
    }


def interleaved(args: argparse.Namespace) -> None:
    """Step times of LoRA vs QLoRA side by side in this process (see the module docstring)."""
    import os
    import statistics

    import torch

    from datamodules.tracknet import render_heatmap
    from lightning_modules.tracknet import HeatmapTracker

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    configs = {"lora": variant_config("lora", args),
               f"qlora_nf4_dq ({args.compute_dtype})": variant_config("qlora_nf4_dq", args),
               "qlora_nf4_dq (float32)": variant_config("qlora_nf4_dq", argparse.Namespace(
                   **{**vars(args), "compute_dtype": "float32"}))}
    models = {name: HeatmapTracker(**cfg).to(args.device).train() for name, cfg in configs.items()}
    opts = {name: m.configure_optimizers() for name, m in models.items()}
    frames = torch.randn(args.batch_size, 9, 72, 128, device=args.device)
    xy = torch.rand(args.batch_size, 2) * torch.tensor([128.0, 72.0])
    target = torch.stack([render_heatmap(float(x), float(y), True, (128, 72), args.sigma) for x, y in xy])
    target = target.to(args.device)

    def step(name: str) -> float:
        model, opt = models[name], opts[name]
        t0 = time.perf_counter()
        model._loss(model(frames), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    names = list(models)
    for name in names:  # warm-up
        step(name), step(name)
    times: dict[str, list[list[float]]] = {n: [] for n in names}
    load = [os.getloadavg()[0]]
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append([step(name) for _ in range(args.steps_per_turn)])
        load.append(os.getloadavg()[0])
    print(f"\n{args.model} patch {args.patch_size}, 128x72 input, batch {args.batch_size}, LoRA r={args.rank}, "
          f"{args.threads} thread(s), device {args.device} ({cpu_model()}), torch {torch.__version__}, "
          f"{auto_note()}; {args.repeats} rounds x {args.steps_per_turn} steps per variant, interleaved; "
          f"load average {min(load):.1f}-{max(load):.1f}\n")
    lora = statistics.median(t for turn in times["lora"] for t in turn)
    print("| variant | median step (ms) | x LoRA (medians) | x LoRA per round (min-max) |\n|---|---:|---:|---:|")
    for name in names:
        med = statistics.median(t for turn in times[name] for t in turn)
        rounds = [statistics.median(a) / statistics.median(b) for a, b in zip(times[name], times["lora"])]
        print(f"| {name} | {1000 * med:.0f} | {med / lora:.2f} | {min(rounds):.2f}-{max(rounds):.2f} |")


def markdown(rows: list[dict]) -> str:
    ref = next((r for r in rows if r["variant"] == "full"), rows[0])
    lora = next((r for r in rows if r["variant"] == "lora"), ref)
    head = ("| mode | backbone bytes (MB) | x full | linear weights (MB) | x full | trainable params | "
            "peak RSS (MB) | RSS over data-loaded baseline (MB) | step (s) | x full | x LoRA | val loss | val F1 | "
            "precision | recall |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['weight_bytes'] / 1e6:.1f} | {r['weight_bytes'] / ref['weight_bytes']:.3f} | "
            f"{r['linear_bytes'] / 1e6:.2f} | {r['linear_bytes'] / ref['linear_bytes']:.3f} | {r['trainable']:,} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['base_rss_mb']:.0f} | {r['step_s']:.3f} | "
            f"{r['step_s'] / ref['step_s']:.2f} | {r['step_s'] / lora['step_s']:.2f} | {r['val_loss']:.4f} | "
            f"{r['f1']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="test_vit")
    p.add_argument("--width", type=int, default=64, help="first decoder width (the ViT width)")
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--sigma", type=float, default=3.0, help="heat-map Gaussian std (heat-map pixels)")
    p.add_argument("--pos-weight", type=float, default=100.0)
    p.add_argument("--threshold", type=float, default=0.5, help="peak threshold on the sigmoid map")
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--pretrain-lr", type=float, default=3e-4)
    p.add_argument("--pretrain-seed", type=int, default=1, help="generator seed of the pre-training clips")
    p.add_argument("--pretrain-clips", type=int, default=40, help="generated clips for pre-training (3/4 train)")
    p.add_argument("--seed", type=int, default=0, help="generator seed of the fine-tuning clips")
    p.add_argument("--decoder-init", choices=("fresh", "pretrained"), default="pretrained",
                   help="fine-tuning decoder: random init (like a new head) or the pre-trained one")
    p.add_argument("--pretrained-file", default=None, help="reuse this backbone file and skip pre-training")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--clips", type=int, default=12)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--full-lr", type=float, default=2e-4)
    p.add_argument("--compute-dtype", default="auto", help="QLoRA matmul dtype (auto: bf16 where native)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=0, help="print val metrics every N steps (0 = only at the end)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--data-dir", default=None, help="generated clips (default: a temp folder)")
    p.add_argument("--interleaved", action="store_true", help="only time LoRA vs QLoRA steps, interleaved")
    p.add_argument("--repeats", type=int, default=7, help="--interleaved: rounds")
    p.add_argument("--steps-per-turn", type=int, default=3, help="--interleaved: timed steps per variant per round")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.interleaved:
        interleaved(args)
        return
    if args.child:
        print("RESULT " + json.dumps(run_one(args.child, args)))
        return
    if args.pretrained_file is not None and not Path(args.pretrained_file).is_file():
        raise FileNotFoundError(f"--pretrained-file {args.pretrained_file!r} does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        args.data_dir = args.data_dir or tmp
        base = [a for a in (argv if argv is not None else sys.argv[1:]) if a]

        def child(name: str, pretrained_file: str) -> dict:
            cmd = [sys.executable, str(Path(__file__).resolve()), *base, "--data-dir", args.data_dir,
                   "--pretrained-file", pretrained_file, "--child", name]
            res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, cwd=str(REPO))
            if res.returncode != 0:
                raise RuntimeError(f"{name} failed (exit {res.returncode})")
            return json.loads(next(line for line in res.stdout.splitlines() if line.startswith("RESULT "))[7:])

        pre = None
        if args.pretrained_file is None:
            args.pretrained_file = str(Path(tmp) / "backbone.safetensors")
            pre = child("pretrain", args.pretrained_file)
            print(f"pretrain: {args.pretrain_steps} steps in {pre['train_s']:.0f}s, val F1 {pre['f1']:.3f} "
                  f"(seed {args.pretrain_seed} clips)", file=sys.stderr)
        rows = []
        for name in args.variants:
            if name.startswith("qlora"):
                try:
                    import models.quant  # noqa: F401
                except ImportError:
                    print(f"skipping {name}: models.quant is not available", file=sys.stderr)
                    continue
            rows.append(child(name, args.pretrained_file))
            r = rows[-1]
            print(f"{name}: step {r['step_s']:.3f}s, F1 {r['f1']:.3f}, peak RSS {r['peak_rss_mb']:.0f} MB",
                  file=sys.stderr)
    if pre is not None:
        print(f"\npre-training: {args.model} fully trained {args.pretrain_steps} steps x batch {args.batch_size} "
              f"on seed-{args.pretrain_seed} clips in {pre['train_s']:.0f} s; its own val: loss {pre['val_loss']:.4f}, "
              f"F1 {pre['f1']:.3f}, precision {pre['precision']:.3f}, recall {pre['recall']:.3f}")
    print(f"\nfine-tuning from the pre-trained backbone ({args.decoder_init} decoder) on seed-{args.seed} clips: "
          f"{args.steps} steps x batch {args.batch_size}, device {args.device} ({cpu_model()}), "
          f"{args.threads} thread(s), QLoRA compute dtype {args.compute_dtype} ({auto_note()}); each row is one run "
          "of its variant (its own process), the step time the mean over its steps after warm-up\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
