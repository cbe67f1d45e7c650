"""Continual-learning methods side by side on the digits task sequence (5 tasks x 2 classes).

Runs ``none`` (head only), full fine-tuning, ``lora`` (rank 2r), ``nested_lora`` (r + r) and ``sema`` with the
same backbone, data and epochs, and prints a markdown table: average incremental accuracy, last accuracy,
forgetting, trainable parameters and the median training-step time of a later task (frozen backbone,
forward + backward + optimizer steps, methods timed round-robin) relative to ``lora``.

    python benchmarks/continual.py [--epochs-per-task 8] [--rank 4] [--timing-only]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.continual_eval import continual_results  # noqa: E402
from callbacks.multi_rate import MultiRateStepping  # noqa: E402
from datamodules.continual import ClassIncrementalDataModule  # noqa: E402
from lightning_modules.continual_vit import ContinualClassifier  # noqa: E402
from models.vision.continual_vit import ContinualViT  # noqa: E402

BACKBONE = {"depth": 4, "embed_dim": 96, "num_heads": 3, "global_pool": "avg"}


def step_times(methods: dict[str, dict], args: argparse.Namespace, rounds: int = 60) -> dict[str, float]:
    """Median time of one training step of a later task (frozen backbone) per method, measured round-robin
    (every method once per round) so that load from other jobs on a shared CPU hits all methods alike."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(2, 4, (32,))
    setups = {}
    for name, kw in methods.items():
        kw = dict(kw)
        full = kw.pop("finetune_backbone", False)
        interval = kw.pop("slow_update_interval", 1)
        kw.pop("lr_slow", None)
        model = ContinualViT(backbone_kwargs=BACKBONE, img_size=32, patch_size=8, **kw)
        groups = model.set_trainable(1, train_backbone=full)
        fast = torch.optim.AdamW(groups["head"] + groups["fast"] + groups["backbone"] + groups["descriptors"], lr=1e-3)
        slow = torch.optim.AdamW(groups["slow"], lr=1e-3) if groups["slow"] else None
        setups[name] = (model, fast, slow, interval)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(rounds):
        for name, (model, fast, slow, interval) in setups.items():
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x, 4, 2), y)
            aux = model.auxiliary_loss()
            (loss if aux is None else loss + aux).backward()
            fast.step()
            fast.zero_grad(set_to_none=True)
            if slow is not None and (r + 1) % interval == 0:
                slow.step()
                slow.zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t0)
    return {name: 1000 * statistics.median(t[3:]) for name, t in times.items()}


def run(name: str, args: argparse.Namespace, **model_kwargs) -> dict:
    L.seed_everything(0, verbose=False)
    dm = ClassIncrementalDataModule("digits", init_cls=2, increment=2, epochs_per_task=args.epochs_per_task,
                                    image_size=32, batch_size=32)
    module = ContinualClassifier(
        backbone_kwargs=BACKBONE,
        img_size=32, patch_size=8, first_task_adaptation=True, lr_fast=1e-3, scheduler="constant", **model_kwargs)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[MultiRateStepping()], default_root_dir=args.out)
    trainer.fit(module, dm)
    res = continual_results(module.trainer, module)
    res["name"] = name
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs-per-task", type=int, default=8)
    p.add_argument("--rank", type=int, default=4, help="Nested LoRA rank r (LoRA gets 2r)")
    p.add_argument("--out", default="runs/benchmark_continual")
    p.add_argument("--timing-only", action="store_true", help="skip the task sequences")
    args = p.parse_args()
    torch.set_num_threads(2)
    r = args.rank
    methods = {
        "none (head only)": dict(adapter_type="none"),
        "full fine-tuning": dict(adapter_type="none", finetune_backbone=True),
        f"lora (rank {2 * r})": dict(adapter_type="lora", lora_r=2 * r),
        f"nested_lora ({r} + {r})": dict(adapter_type="nested_lora", nested_lora_r=r, lr_slow=5e-4,
                                         slow_update_interval=3),
        "sema": dict(adapter_type="sema"),
    }
    ms = step_times(methods, args)
    if args.timing_only:
        lora = next(v for k, v in ms.items() if k.startswith("lora"))
        print("\n".join(f"{k}: {v:.2f} ms ({v / lora:.2f}x lora)" for k, v in ms.items()))
        return
    rows = [run(name, args, **kw) for name, kw in methods.items()]
    for x in rows:
        x["step_ms"] = ms[x["name"]]
    lora_ms = next(x["step_ms"] for x in rows if x["name"].startswith("lora"))
    print("\n| method | avg incremental acc | last acc | forgetting | trainable params (last task) | step time vs lora |")
    print("|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['name']} | {100 * x['avg_incremental_acc']:.1f} | {100 * x['last_acc']:.1f} | "
              f"{100 * x['forgetting']:.1f} | {x['trainable_params']['trainable']:,} | "
              f"{x['step_ms'] / lora_ms:.2f}x ({x['step_ms']:.1f} ms) |")
    print(f"\ndigits, 5 tasks x 2 classes, {args.epochs_per_task} epochs/task, ViT depth 4 width 96, "
          f"32x32 input, patch 8, batch 32, AdamW lr 1e-3 constant, first-task adaptation, torch threads 2")


if __name__ == "__main__":
    main()
