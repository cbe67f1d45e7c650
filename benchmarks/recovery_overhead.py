"""Per-step cost of the recovery callbacks on the digits quick start (ViT-tiny + LoRA, 32x32, batch 64).

Rows: no callbacks; OOMRecovery before any OOM (whole batches, gradients via torch.autograd.grad);
OOMRecovery after recoveries (micro-batch 32 and 16: 2x and 4x accumulation); StabilityMonitor; both.
Usage: ``python benchmarks/recovery_overhead.py [--steps 30]``; prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.oom_recovery import OOMRecovery  # noqa: E402
from callbacks.stability import StabilityMonitor  # noqa: E402
from datamodules.digits import DigitsDataModule  # noqa: E402
from lightning_modules.image_classifier import ImageClassifier  # noqa: E402


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self._t)


def run(callbacks: list[L.Callback], steps: int) -> tuple[float, float]:
    """Median seconds per step (first 3 steps dropped) and the final training loss."""
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(img_size=32, patch_size=8, lora_r=8, lr=3e-3)
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[*callbacks, timer])
    trainer.fit(model, DigitsDataModule(image_size=32, batch_size=64))
    return statistics.median(timer.times[3:]), float(trainer.callback_metrics["train/loss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    rows = {
        "no callbacks": lambda: [],
        "OOMRecovery, no OOM yet": lambda: [OOMRecovery()],
        "OOMRecovery, micro-batch 32 (2x accumulation)": lambda: [OOMRecovery(micro_batch_size=32)],
        "OOMRecovery, micro-batch 16 (4x accumulation)": lambda: [OOMRecovery(micro_batch_size=16)],
        "StabilityMonitor": lambda: [StabilityMonitor()],
        "OOMRecovery + StabilityMonitor": lambda: [OOMRecovery(), StabilityMonitor()],
    }
    results = {name: run(make(), args.steps) for name, make in rows.items()}
    base = results["no callbacks"][0]
    print(f"\n{args.steps} steps, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| setup | ms/step | ratio vs none | train loss at last step |")
    print("|---|---:|---:|---:|")
    for name, (t, loss) in results.items():
        print(f"| {name} | {t * 1e3:.1f} | {t / base:.2f} | {loss:.4f} |")


if __name__ == "__main__":
    main()
