"""A few training steps of every GPU preset config, through the real command line, with steps/s and peak memory.

Each preset runs ``python -m cli fit --config configs/<name>.yaml`` in-process with the overrides below: on a
GPU only what the check's time limit needs (a few steps, no validation, no checkpoint files, less generated
data, random init where a weights file is absent); with ``--dry-run`` tiny models on the CPU (the test suite's
sizes), so the same code path stays exercised between GPU loans. A callback times every training batch
(synchronised) and reads ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``; the Phase 1 presets
also get the memory model's estimate (:func:`models.lm.phase1.estimate_memory`) and their budget
(``target_vram_gb``). One JSON object per preset goes to ``--json``.

    python benchmarks/gpu/presets.py phase1_8gb --json /tmp/phase1_8gb.json          # on a GPU
    python benchmarks/gpu/presets.py --all --dry-run --json /tmp/presets.json         # CPU, tiny
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402

GIB = 2**30
#: steps timed after the warm-up steps (the first steps compile kernels and grow the allocator's pools)
WARMUP_STEPS = 2
GPU_STEPS = 5
DINOV3_WEIGHTS = "weights/vit_small_patch16_dinov3.safetensors"

#: overrides every GPU preset run gets: a few steps, no validation and no checkpoint files
GPU_COMMON = ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.max_steps", str(GPU_STEPS),
              "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--checkpoint.save_top_k", "0", "--checkpoint.save_last", "false"]
DRY_COMMON = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_steps", "2",
              "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
              "--checkpoint.save_top_k", "0", "--checkpoint.save_last", "false"]

_TRACKNET_DRY = ["--data.synthetic.num_clips", "4", "--data.synthetic.frames_per_clip", "8",
                 "--data.synthetic.width", "128", "--data.synthetic.height", "64", "--data.batch_size", "4",
                 "--model.img_size", "[64, 32]", "--data.frame_size", "[64, 32]", "--data.num_workers", "0",
                 "--trainer.precision", "32"]
_PHASE2_DRY = ["--model.config.d_model", "16", "--model.config.n_heads", "2", "--model.config.head_dim", "8",
               "--model.config.n_layers", "1", "--model.config.chunk_size", "8", "--model.config.bk_chunk_size", "8",
               "--data.seq_len", "24", "--data.batch_size", "2", "--data.max_windows", "6",
               "--model.sample_tokens", "4", "--model.warmup_steps", "1", "--data.num_workers", "0"]
_SEMA_GLYPHS = ["--data.dataset", "glyphs", "--data.init_cls", "10", "--data.increment", "10",
                "--model.num_classes", "20", "--model.pretrained_file", "null", "--data.epochs_per_task", "1",
                "--model.descriptor_epochs", "1", "--trainer.max_epochs", "2"]


def _phase1_dry(name: str) -> list[str]:
    tiny = json.dumps({"preset": name.removeprefix("phase1_").removesuffix("gb") + "gb",
                       "model": {"d_model": 32, "n_layers": 1, "intermediate_size": 64},
                       "ar_ssm": {"max_rank": 16, "min_rank": 4}, "htt": {"rank": 16}})
    return ["--model.phase1", tiny, "--data.num_workers", "0", "--data.max_windows", "16", "--data.batch_size", "4",
            "--data.seq_len", "32", "--model.sample_tokens", "8"]


#: preset -> (overrides on a GPU, overrides for the CPU dry run, what was shrunk on the GPU and why)
PRESETS: dict[str, tuple[list[str], list[str], str]] = {
    "phase1_8gb": ([], _phase1_dry("phase1_8gb"), "full size"),
    "phase1_10gb": ([], _phase1_dry("phase1_10gb"), "full size"),
    "phase1_24gb": ([], _phase1_dry("phase1_24gb"), "full size"),
    "phase2_base": (["--trainer.precision", "bf16-mixed"], _PHASE2_DRY,
                    "full size, bf16-mixed as the config's header runs it"),
    "phase2_large": (["--trainer.precision", "bf16-mixed"], _PHASE2_DRY,
                     "full size, bf16-mixed as the config's header runs it"),
    "tracknet_dinov3_qlora": (
        ["--data.synthetic.num_clips", "4", "--data.synthetic.frames_per_clip", "40"],
        [*_TRACKNET_DRY, "--model.heatmap.size", "[32, 16]", "--data.heatmap.size", "[32, 16]",
         "--model.decoder.channels", "[384, 32, 16]", "--model.decoder.upsample", "[2, 2]"],
        "model and input at full size; 4 generated clips x 40 frames instead of 48 x 120"),
    "tracknet_v3_512x288": (
        ["--data.synthetic.num_clips", "4", "--data.synthetic.frames_per_clip", "40"],
        [*_TRACKNET_DRY, "--model.heatmap.size", "[64, 32]", "--data.heatmap.size", "[64, 32]",
         "--model.decoder.channels", "[384, 16, 8, 8, 8]"],
        "model and input at full size; 4 generated clips x 40 frames instead of 48 x 120"),
    "sema_cifar100_vitb": (
        [*_SEMA_GLYPHS, "--data.glyph_classes", "20", "--data.glyph_images_per_class", "40",
         "--trainer.limit_train_batches", "4"],
        [*_SEMA_GLYPHS, "--data.glyph_classes", "20", "--data.glyph_images_per_class", "8", "--data.image_size", "16",
         "--model.backbone", "vit_tiny_patch16_224", "--model.img_size", "16", "--model.patch_size", "8",
         "--model.backbone_kwargs", "{depth: 1, embed_dim: 32, num_heads: 2, global_pool: avg}",
         "--model.expansion_layers", "[-1]", "--trainer.precision", "32-true", "--data.num_workers", "0",
         "--trainer.limit_train_batches", "2", "--trainer.max_epochs", "1", "--data.batch_size", "8"],
        "ViT-B/16 at 224 as configured, random init; the embedded glyph data (20 classes, 2 tasks) instead of "
        "CIFAR-100, which the GPU machine does not have; 4 batches per task"),
}


class StepProbe(L.Callback):
    """Wall time of every training batch (device synchronised) and the device's peak memory."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._sync(pl_module)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:
        self._sync(pl_module)
        self.times.append(time.perf_counter() - self._t0)


def _weights_note(name: str, args: list[str]) -> tuple[list[str], str]:
    """TrackNet presets: the DINOv3 weights file of the checkout (absolute: runs start in a scratch folder), or
    random init when it is absent (an override YAML, as a user would write one)."""
    if not name.startswith("tracknet"):
        return args, ""
    weights = REPO / DINOV3_WEIGHTS
    found = weights.is_file()
    override = Path(tempfile.mkdtemp(prefix="adaptlab-gpu-")) / f"{name}.yaml"
    value = json.dumps(str(weights)) if found else "null"
    backbone = f"{{freeze: true, patch_size: 16, pretrained_file: {value}}}"
    override.write_text(f"model:\n  init_args:\n    backbone: {backbone}\n")
    return [*args, "--config", str(override)], (f"weights {DINOV3_WEIGHTS}" if found else
                                                f"{DINOV3_WEIGHTS} absent: random init")


def run_preset(name: str, dry_run: bool) -> dict[str, Any]:
    """Fit ``configs/<name>.yaml`` a few steps; returns steps/s, peak memory and (Phase 1) the estimate."""
    import cli

    gpu_args, dry_args, shrink = PRESETS[name]
    args, note = _weights_note(name, ["--config", str(REPO / "configs" / f"{name}.yaml")])
    args = ["fit", *args, *(DRY_COMMON + dry_args if dry_run else GPU_COMMON + gpu_args)]
    probe = StepProbe()
    defaults = cli.trainer_defaults
    cli.trainer_defaults = lambda: {**defaults(), "callbacks": [*defaults()["callbacks"], probe]}
    saved_argv, sys.argv = sys.argv, ["cli"]
    t0 = time.perf_counter()
    try:
        run = cli.main(args)
    finally:
        cli.trainer_defaults, sys.argv = defaults, saved_argv
    wall = time.perf_counter() - t0
    timed = probe.times[WARMUP_STEPS:] or probe.times
    step_s = statistics.median(timed) if timed else float("nan")
    device = run.trainer.strategy.root_device  # Lightning's teardown has moved the model back to the CPU
    out: dict[str, Any] = {
        "preset": name, "device": str(device), "steps": len(probe.times), "timed_steps": len(timed),
        "step_s": step_s, "steps_per_s": 1.0 / step_s if timed else None, "wall_s": wall,
        "precision": str(run.trainer.precision), "shrunk": "tiny CPU sizes (dry run)" if dry_run else shrink,
        "note": note, "params": sum(p.numel() for p in run.model.parameters()),
    }
    if device.type == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
        out["device_total_gib"] = torch.cuda.get_device_properties(device).total_memory / GIB
    config = getattr(run.model, "config", None)
    if name.startswith("phase1") and config is not None:
        from models.lm.phase1 import estimate_memory

        out["estimate_gib"] = estimate_memory(config)["total_bytes"] / GIB
        out["budget_gib"] = float(config.target_vram_gb)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="PRESET", help=", ".join(PRESETS))
    parser.add_argument("--all", action="store_true", help="every preset, one after the other in this process")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--json", required=True, help="write the results (a list of objects) here")
    args = parser.parse_args(argv)
    names = list(PRESETS) if args.all else args.names
    unknown = [n for n in names if n not in PRESETS]
    if unknown or not names:
        parser.error(f"unknown preset(s) {unknown}; choose from {', '.join(PRESETS)} or --all")
    results, failed = [], False
    workdir = Path(tempfile.mkdtemp(prefix="adaptlab-presets-"))
    os.chdir(workdir)  # runs/ and generated data land in a scratch folder, never in the checkout
    for name in names:
        try:
            results.append({"ok": True, **run_preset(name, args.dry_run)})
        except BaseException as e:  # noqa: BLE001  (SystemExit from the CLI's error: line included)
            failed = True
            results.append({"preset": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
                            "traceback": traceback.format_exc()[-4000:]})
            traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "traceback"}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
