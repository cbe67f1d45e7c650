"""Continual-learning methods side by side on the embedded glyph sequence (10 tasks x 5 classes) with the
offline glyph-pretrained, frozen backbone, over several seeds.

Every run starts from ``configs/sema_nested.yaml`` (the main job: same backbone file, data, epochs and
learning rates) and changes only what the method needs, so the ``nested_lora`` row is the main job itself
(seed 0 = ``python -m cli fit --config configs/sema_nested.yaml``). Methods: frozen backbone + head only,
full fine-tuning, LoRA (rank 2r), Nested LoRA (r + r), SEMA, and Nested LoRA ablations (no consolidation,
slow step every batch, discard instead of accumulate, slow step only at task ends). Per run: average
incremental accuracy, last accuracy, forgetting, BWT (class-incremental, over all seen classes) and the
final model's within-task accuracy (each task's test set scored over its own classes only), trainable
parameters and wall time. Results are appended to a JSON-lines file as they finish (``--out``), so an
interrupted grid keeps what it measured; the table is printed from that file (mean +- std over seeds).

    python benchmarks/continual.py [--seeds 0 1 2] [--methods nested_lora lora ...] [--table-only]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.continual_eval import continual_results  # noqa: E402
from callbacks.multi_rate import MultiRateStepping  # noqa: E402
from datamodules.continual import ClassIncrementalDataModule  # noqa: E402
from datamodules.glyph_backbone import GlyphPretraining  # noqa: E402
from lightning_modules.continual_vit import ContinualClassifier  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "sema_nested.yaml"

#: name -> (model overrides, MultiRateStepping slow_grad_mode)
METHODS: dict[str, tuple[dict, str]] = {
    "none": ({"adapter_type": "none"}, "accumulate"),
    "full": ({"adapter_type": "none", "finetune_backbone": True, "lr_backbone": 1e-4}, "accumulate"),
    "lora": ({"adapter_type": "lora", "lora_r": 8}, "accumulate"),
    "nested_lora": ({}, "accumulate"),
    "sema": ({"adapter_type": "sema", "expansion_layers": [-3, -2, -1], "expansion_threshold": 2.0,
              "lr_descriptor": 0.01}, "accumulate"),
    "nested_no_consolidation": ({"use_consolidation": False}, "accumulate"),
    "nested_interval_1": ({"slow_update_interval": 1}, "accumulate"),
    "nested_discard": ({}, "discard"),
    "nested_task_end": ({"slow_update_interval": 10**6}, "accumulate"),
}
LABELS = {
    "none": "frozen backbone + head only", "full": "full fine-tuning (backbone lr 1e-4)", "lora": "LoRA (rank 8)",
    "nested_lora": "Nested LoRA (4 + 4), main job", "sema": "SEMA (threshold 2)",
    "nested_no_consolidation": "Nested LoRA, no consolidation", "nested_interval_1": "Nested LoRA, slow interval 1",
    "nested_discard": "Nested LoRA, discard (interval 3)",
    "nested_task_end": "Nested LoRA, slow step at task ends only",
}


def config_args() -> tuple[dict, dict]:
    cfg = yaml.safe_load(CONFIG.read_text())
    return cfg["model"]["init_args"], cfg["data"]["init_args"]


@torch.no_grad()
def within_task_accuracy(module: ContinualClassifier, dm: ClassIncrementalDataModule) -> float:
    """Final model, each task's test set scored over that task's own classes only (task-incremental)."""
    module.eval()
    accs = []
    for t in range(dm.num_tasks):
        lo, hi = dm.task_offset(t), dm.classes_seen(t)
        correct = total = 0
        for x, y in dm.loader(dm.task_dataset("test", t)):
            pred = module.model(x, hi)[:, lo:].argmax(-1) + lo
            correct += int((pred == y).sum())
            total += len(y)
        accs.append(correct / total)
    return sum(accs) / len(accs)


def run(method: str, seed: int) -> dict:
    model_args, data_args = config_args()
    overrides, grad_mode = METHODS[method]
    model_args = {**copy.deepcopy(model_args), **overrides}
    model_args["pretrain"] = GlyphPretraining(**model_args["pretrain"])
    L.seed_everything(seed, verbose=False)
    module = ContinualClassifier(**model_args)
    dm = ClassIncrementalDataModule(**data_args)
    # validation runs as in the main job (its loaders draw from the global random state, so skipping it would
    # change the training batches' order): seed 0 of `nested_lora` reproduces `python -m cli fit --config
    # configs/sema_nested.yaml`
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[MultiRateStepping(slow_grad_mode=grad_mode)],
                        default_root_dir="runs/benchmark_continual")
    t0 = time.perf_counter()
    trainer.fit(module, dm)
    res = continual_results(trainer, module)
    res.update(method=method, seed=seed, seconds=time.perf_counter() - t0,
               within_task_acc=within_task_accuracy(module, dm))
    return res


def fmt(values: list[float], scale: float = 100.0) -> str:
    v = [scale * x for x in values]
    if len(v) == 1:
        return f"{v[0]:.1f}"
    return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}"


def table(rows: list[dict]) -> str:
    out = ["| method | seeds | avg incremental acc | last acc | forgetting | BWT | within-task acc (final) | "
           "trainable params (last task) | expansions | time/run |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        rs = [r for r in rows if r["method"] == method]
        if not rs:
            continue
        exp = [len(r.get("expansions", [])) for r in rs] if method == "sema" else None
        out.append(
            f"| {LABELS[method]} | {len(rs)} | {fmt([r['avg_incremental_acc'] for r in rs])} | "
            f"{fmt([r['last_acc'] for r in rs])} | {fmt([r['forgetting'] for r in rs])} | "
            f"{fmt([r['bwt'] for r in rs])} | {fmt([r['within_task_acc'] for r in rs])} | "
            f"{rs[0]['trainable_params']['trainable']:,} | {'/'.join(map(str, exp)) if exp else '-'} | "
            f"{statistics.mean(r['seconds'] for r in rs):.0f} s |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--out", default="runs/benchmark_continual/results.jsonl")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--table-only", action="store_true", help="print the table of --out and exit")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        lines = out.read_text().splitlines() if out.exists() else []
        done = {(r["method"], r["seed"]) for r in map(json.loads, lines)}
        for seed in args.seeds:
            for method in args.methods:
                if (method, seed) in done:
                    continue
                res = run(method, seed)
                with out.open("a") as f:
                    f.write(json.dumps(res) + "\n")
                print(f"{method} seed {seed}: avg {100 * res['avg_incremental_acc']:.1f} "
                      f"last {100 * res['last_acc']:.1f} "
                      f"forgetting {100 * res['forgetting']:.1f} within-task {100 * res['within_task_acc']:.1f} "
                      f"({res['seconds']:.0f} s)", flush=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    print()
    print(table(rows))
    print(f"\nglyph sequence, 10 tasks x 5 classes (class order seed 1993), backbone and training from {CONFIG.name}; "
          f"torch threads {args.threads}")


if __name__ == "__main__":
    main()
