"""Continual-learning methods side by side on the digits task sequence (5 tasks x 2 classes).

Runs ``none`` (head only), full fine-tuning, ``lora`` (rank 2r), ``nested_lora`` (r + r) and ``sema`` with the
same backbone, data and epochs, and prints a markdown table: average incremental accuracy, last accuracy,
forgetting, trainable parameters and the mean training-step time relative to ``lora``.

    python benchmarks/continual.py [--epochs-per-task 2] [--rank 4] [--depth 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.multi_rate import MultiRateStepping  # noqa: E402
from datamodules.continual import ClassIncrementalDataModule  # noqa: E402
from lightning_modules.continual_vit import ContinualViTModule  # noqa: E402


class StepTimer(L.Callback):
    """Wall time of every training batch (forward, backward and the multi-rate optimizer steps)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._t)


def run(name: str, args: argparse.Namespace, **model_kwargs) -> dict:
    L.seed_everything(0, verbose=False)
    dm = ClassIncrementalDataModule("digits", init_cls=2, increment=2, epochs_per_task=args.epochs_per_task,
                                    image_size=32, batch_size=32)
    module = ContinualViTModule(
        backbone_kwargs={"depth": args.depth, "embed_dim": 96, "num_heads": 3, "global_pool": "avg"},
        img_size=32, patch_size=8, first_task_adaptation=True, lr_fast=1e-3, scheduler="constant", **model_kwargs)
    timer = StepTimer()
    # MultiRateStepping before the timer, so the measured step includes the optimizer updates
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[MultiRateStepping(), timer], default_root_dir=args.out)
    trainer.fit(module, dm)
    res = module.results()
    times = sorted(timer.times[1:])  # the first batch pays one-off allocations
    res["step_ms"] = 1000 * times[len(times) // 2]  # median: robust to other jobs on a shared CPU
    res["name"] = name
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs-per-task", type=int, default=4)
    p.add_argument("--rank", type=int, default=4, help="Nested LoRA rank r (LoRA gets 2r)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--out", default="runs/benchmark_continual")
    args = p.parse_args()
    torch.set_num_threads(2)
    r = args.rank
    methods = {
        "none (head only)": dict(adapter_type="none"),
        "full fine-tuning": dict(adapter_type="none", finetune_backbone=True),
        f"lora (rank {2 * r})": dict(adapter_type="lora", lora_rank=2 * r),
        f"nested_lora ({r} + {r})": dict(adapter_type="nested_lora", nested_lora_rank=r, lr_slow=5e-4,
                                         slow_update_interval=3),
        "sema": dict(adapter_type="sema"),
    }
    rows = [run(name, args, **kw) for name, kw in methods.items()]
    lora_ms = next(x["step_ms"] for x in rows if x["name"].startswith("lora"))
    print("\n| method | avg incremental acc | last acc | forgetting | trainable params (last task) | step time vs lora |")
    print("|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['name']} | {100 * x['avg_incremental_acc']:.1f} | {100 * x['last_acc']:.1f} | "
              f"{100 * x['forgetting']:.1f} | {x['trainable_params']['trainable']:,} | "
              f"{x['step_ms'] / lora_ms:.2f}x ({x['step_ms']:.1f} ms) |")
    print(f"\ndigits, 5 tasks x 2 classes, {args.epochs_per_task} epochs/task, ViT depth {args.depth} width 96, "
          f"32x32 input, patch 8, batch 32, AdamW lr 1e-3 constant, first-task adaptation, torch threads 2")


if __name__ == "__main__":
    main()
