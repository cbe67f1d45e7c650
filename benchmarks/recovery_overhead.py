"""Per-step cost of the recovery callbacks on the digits quick start (ViT-tiny + LoRA, 32x32, batch 32).

Rows: no callbacks; OOMRecovery before any OOM (whole batches, gradients via torch.autograd.grad);
OOMRecovery after recoveries (micro-batch 16 and 8: 2x and 4x accumulation); StabilityMonitor; both.
Times are CPU seconds of this process (``time.process_time``, one torch thread), so other processes
sharing the machine do not inflate them. Usage: ``python benchmarks/recovery_overhead.py [--steps 12]``;
prints a markdown table.
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
        self._t = time.process_time()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.process_time() - self._t)


def run(callbacks: list[L.Callback], steps: int) -> tuple[float, float, dict[str, torch.Tensor]]:
    """Fastest and median CPU seconds per step (first 3 steps dropped) and the final trainable weights."""
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(img_size=32, patch_size=8, lora_r=8, lr=3e-3)
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[*callbacks, timer])
    trainer.fit(model, DigitsDataModule(image_size=32, batch_size=32))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return min(timer.times[3:]), statistics.median(timer.times[3:]), weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {
        "no callbacks": lambda: [],
        "OOMRecovery, no OOM yet": lambda: [OOMRecovery()],
        "OOMRecovery, micro-batch 16 (2x accumulation)": lambda: [OOMRecovery(micro_batch_size=16)],
        "OOMRecovery, micro-batch 8 (4x accumulation)": lambda: [OOMRecovery(micro_batch_size=8)],
        "StabilityMonitor": lambda: [StabilityMonitor()],
        "OOMRecovery + StabilityMonitor": lambda: [OOMRecovery(), StabilityMonitor()],
    }
    results = {name: run(make(), args.steps) for name, make in rows.items()}
    base, _, ref = results["no callbacks"]
    print(f"\n{args.steps} steps, torch {torch.__version__}, 1 torch thread, CPU time per step\n")
    print("| setup | fastest CPU ms/step | ratio vs none | median CPU ms/step | max abs weight diff vs none |")
    print("|---|---:|---:|---:|---:|")
    for name, (fastest, median, weights) in results.items():
        diff = max(float((weights[k] - ref[k]).abs().max()) for k in ref)
        print(f"| {name} | {fastest * 1e3:.1f} | {fastest / base:.2f} | {median * 1e3:.1f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
