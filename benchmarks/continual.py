"""Continual-learning methods side by side on the embedded glyph sequence (10 tasks x 5 classes) with the
offline glyph-pretrained, frozen backbone, over several seeds.

Every run starts from ``configs/sema_nested.yaml`` (the main job: same backbone file, data, epochs and
learning rates) and changes only what the method needs, so the ``nested_lora`` row is the main job itself
(seed 0 = ``python -m cli fit --config configs/sema_nested.yaml``). Methods: frozen backbone + head only,
full fine-tuning, LoRA (rank 2r), Nested LoRA (r + r), SEMA (joint and layer-by-layer expansion order), and
Nested LoRA ablations (no consolidation, slow step every batch, discard instead of accumulate, slow step only at
task ends). Per run: average
incremental accuracy, last accuracy, forgetting, BWT (class-incremental, over all seen classes) and the
final model's within-task accuracy (each task's test set scored over its own classes only), trainable
parameters and wall time. Results are appended to a JSON-lines file as they finish (``--out``), so an
interrupted grid keeps what it measured; the table is printed from that file (mean +- std over seeds).

    python benchmarks/continual.py [--seeds 0 1 2] [--methods nested_lora lora ...] [--table-only]
    python benchmarks/continual.py --select     # choose lrs and epochs on the validation split, seed 100
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

from callbacks.continual_eval import ContinualEvaluation, continual_results  # noqa: E402
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
              "lr_descriptor": 0.01, "expansion_order": "joint"}, "accumulate"),
    "sema_layerwise": ({"adapter_type": "sema", "expansion_layers": [-3, -2, -1], "expansion_threshold": 2.0,
                        "lr_descriptor": 0.01, "expansion_order": "layerwise"}, "accumulate"),
    "nested_no_consolidation": ({"use_consolidation": False}, "accumulate"),
    "nested_interval_1": ({"slow_update_interval": 1}, "accumulate"),
    "nested_discard": ({}, "discard"),
    "nested_task_end": ({"slow_update_interval": 10**6}, "accumulate"),
}
LABELS = {
    "none": "frozen backbone + head only", "full": "full fine-tuning (backbone lr 1e-4)", "lora": "LoRA (rank 8)",
    "nested_lora": "Nested LoRA (4 + 4), main job", "sema": "SEMA (threshold 2, joint order: default)",
    "sema_layerwise": "SEMA, layer by layer (SEMA-CL order)",
    "nested_no_consolidation": "Nested LoRA, no consolidation", "nested_interval_1": "Nested LoRA, slow interval 1",
    "nested_discard": "Nested LoRA, discard (interval 3)",
    "nested_task_end": "Nested LoRA, slow step at task ends only",
}


#: --select grid (validation split, a seed outside the reported ones): head lr with head only, then one shared
#: adapter lr (LoRA and Nested LoRA's fast adapters; Nested LoRA's slow lr keeps the config's slow/fast ratio)
#: and the epochs per task, scored by the mean of LoRA's and Nested LoRA's average incremental accuracy
SELECT_HEAD_LRS = (2e-3, 5e-3, 1e-2)
SELECT_ADAPTER_LRS = (3e-4, 1e-3, 3e-3)
SELECT_EPOCHS = (3, 5)
SELECT_ADAPTER_METHODS = ("nested_lora", "lora")


def config_args() -> tuple[dict, dict]:
    cfg = yaml.safe_load(CONFIG.read_text())
    return cfg["model"]["init_args"], cfg["data"]["init_args"]


@torch.no_grad()
def within_task_accuracy(module: ContinualClassifier, dm: ClassIncrementalDataModule, split: str = "test") -> float:
    """Final model, each task's ``split`` set scored over that task's own classes only (task-incremental)."""
    module.eval()
    accs = []
    for t in range(dm.num_tasks):
        lo, hi = dm.task_offset(t), dm.classes_seen(t)
        correct = total = 0
        for x, y in dm.loader(dm.task_dataset(split, t)):
            pred = module.model(x, hi)[:, lo:].argmax(-1) + lo
            correct += int((pred == y).sum())
            total += len(y)
        accs.append(correct / total)
    return sum(accs) / len(accs)


def run(method: str, seed: int, split: str = "test", model_overrides: dict | None = None,
        epochs_per_task: int | None = None) -> dict:
    """One method over the whole sequence; ``split="val"`` scores the accuracy matrix on the validation split
    (hyper-parameter selection), with ``model_overrides``/``epochs_per_task`` replacing the config's values."""
    model_args, data_args = config_args()
    overrides, grad_mode = METHODS[method]
    model_args = {**copy.deepcopy(model_args), **overrides, **(model_overrides or {})}
    if epochs_per_task is not None:
        data_args = {**data_args, "epochs_per_task": epochs_per_task}
    model_args["pretrain"] = GlyphPretraining(**model_args["pretrain"])
    L.seed_everything(seed, verbose=False)
    module = ContinualClassifier(**model_args)
    dm = ClassIncrementalDataModule(**data_args)
    # validation runs as in the main job (its loaders draw from the global random state, so skipping it would
    # change the training batches' order): seed 0 of `nested_lora` reproduces `python -m cli fit --config
    # configs/sema_nested.yaml`
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[MultiRateStepping(slow_grad_mode=grad_mode)]
                        + ([ContinualEvaluation(split=split)] if split != "test" else []),
                        default_root_dir="runs/benchmark_continual")
    t0 = time.perf_counter()
    trainer.fit(module, dm)
    res = continual_results(trainer, module)
    res.update(method=method, seed=seed, seconds=time.perf_counter() - t0, split=split,
               within_task_acc=within_task_accuracy(module, dm, split), lr_head=model_args.get("lr_head"),
               lr_fast=model_args.get("lr_fast"), lr_slow=model_args.get("lr_slow"),
               epochs_per_task=data_args["epochs_per_task"])
    return res


def select(seed: int, out: Path) -> dict:
    """Hyper-parameter selection on the validation split with a seed outside the reported ones: (1) head lr
    per epoch count with head only (``none``); (2) with that head lr, one adapter lr shared by LoRA and Nested
    LoRA and the epochs per task, by the mean of their average incremental accuracies. Runs are cached in
    ``out`` (JSON lines). Returns the chosen values."""
    model_args, _ = config_args()
    slow_ratio = model_args["lr_slow"] / model_args["lr_fast"]
    lines = out.read_text().splitlines() if out.exists() else []
    done = {(r["method"], r["lr_head"], r["lr_fast"], r["epochs_per_task"]): r for r in map(json.loads, lines)
            if r["seed"] == seed}

    def cached(method: str, lr_head: float, lr_fast: float, epochs: int) -> dict:
        key = (method, lr_head, lr_fast, epochs)
        if key not in done:
            over = {"lr_head": lr_head, "lr_fast": lr_fast, "lr_slow": lr_fast * slow_ratio}
            done[key] = run(method, seed, "val", over, epochs)
            with out.open("a") as f:
                f.write(json.dumps(done[key]) + "\n")
            r = done[key]
            print(f"[select] {method} lr_head {lr_head:g} lr_fast {lr_fast:g} epochs {epochs}: val avg "
                  f"{100 * r['avg_incremental_acc']:.1f} last {100 * r['last_acc']:.1f} ({r['seconds']:.0f} s)",
                  flush=True)
        return done[key]

    base_fast = model_args["lr_fast"]
    rows = ["| stage | method | head lr | adapter lr | epochs/task | val avg incremental acc | val last acc | "
            "val forgetting | score |", "|---|---|---|---|---|---|---|---|---|"]
    best_head: dict[int, float] = {}
    for epochs in SELECT_EPOCHS:
        scores = {lr: cached("none", lr, base_fast, epochs) for lr in SELECT_HEAD_LRS}
        best_head[epochs] = max(SELECT_HEAD_LRS, key=lambda lr: scores[lr]["avg_incremental_acc"])
        for lr, r in scores.items():
            mark = " **chosen for this epoch count**" if lr == best_head[epochs] else ""
            rows.append(f"| 1 | none | {lr:g} | - | {epochs} | {100 * r['avg_incremental_acc']:.1f} | "
                        f"{100 * r['last_acc']:.1f} | {100 * r['forgetting']:.1f} | "
                        f"{100 * r['avg_incremental_acc']:.1f}{mark} |")
    score: dict[tuple[float, int], float] = {}
    for epochs in SELECT_EPOCHS:
        for lr in SELECT_ADAPTER_LRS:
            rs = [cached(m, best_head[epochs], lr, epochs) for m in SELECT_ADAPTER_METHODS]
            score[lr, epochs] = statistics.mean(r["avg_incremental_acc"] for r in rs)
            for m, r in zip(SELECT_ADAPTER_METHODS, rs):
                rows.append(f"| 2 | {m} | {best_head[epochs]:g} | {lr:g} | {epochs} | "
                            f"{100 * r['avg_incremental_acc']:.1f} | {100 * r['last_acc']:.1f} | "
                            f"{100 * r['forgetting']:.1f} | {100 * score[lr, epochs]:.1f} |")
    lr_fast, epochs = max(score, key=score.get)
    chosen = {"lr_head": best_head[epochs], "lr_fast": lr_fast, "lr_slow": lr_fast * slow_ratio,
              "epochs_per_task": epochs}
    print("\n".join(rows))
    print(f"\nselection seed {seed}, validation split (10 images per class): chosen {chosen} "
          f"(score = mean val avg incremental acc of {' and '.join(SELECT_ADAPTER_METHODS)})")
    return chosen


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
        exp = [len(r.get("expansions", [])) for r in rs] if method.startswith("sema") else None
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
    p.add_argument("--select", action="store_true",
                   help="choose head lr, adapter lr and epochs per task on the validation split (--select-seed) "
                        "and print the selection table instead of the test grid")
    p.add_argument("--select-seed", type=int, default=100, help="seed of the selection runs (not a reported one)")
    p.add_argument("--select-out", default="runs/benchmark_continual/select.jsonl")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.select:
        if args.select_seed in args.seeds:
            raise SystemExit(f"error: --select-seed {args.select_seed} is one of the reported --seeds {args.seeds}")
        Path(args.select_out).parent.mkdir(parents=True, exist_ok=True)
        select(args.select_seed, Path(args.select_out))
        return
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
