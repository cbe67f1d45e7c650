"""Continual-learning methods side by side on the shifted glyph sequence (10 tasks x 5 classes, dark-on-light,
tinted, textured: a rendering the glyph-pretrained backbone never saw), over seeds that also change the class
order.

Every run starts from ``configs/sema_nested.yaml`` (the main job: same backbone file, data, epochs) and changes
only what the method needs, with the learning rates chosen by ``--select``; seed ``s`` uses class order seed
``1993 + s``, so the ``nested_lora`` seed-0 row is the main job itself (``python -m cli fit --config
configs/sema_nested.yaml`` writes the same accuracy matrix). SimpleCIL and RanPAC need no training: their rows
come from frozen features extracted once (the same classifier classes the CLI uses with ``classifier: ncm |
ridge``). Per run: average incremental / last accuracy, forgetting, BWT, within-task accuracy, old / new
accuracy after the last task, the method's relative weight change ||dW|| / ||W||, the last accuracy with its
adapters switched off, trainable parameters and time. Runs are appended to JSON lines as they finish
(``--out``), so an interrupted grid keeps what it measured.

    python benchmarks/continual.py --headroom          # joint linear probe vs joint LoRA (must be >= 15 points)
    python benchmarks/continual.py --select            # learning rates and method knobs, validation split, seed 100
    python benchmarks/continual.py --seeds 0 1 2 3 4   # test grid, tables, benchmarks/continual_curves.png
    python benchmarks/continual.py --multidomain       # SEMA's expansions against known domain boundaries
    python benchmarks/continual.py --sequence multidomain --seeds 0 1 2 3 4   # the grid on the multi-domain sequence

``--select`` also calibrates SEMA (threshold = the largest z-score of held-out new classes of the descriptors' own
domain, width = the one that best separates the later domains; see ``calibrate_sema``) and searches Nested LoRA's
slow/fast ratio, slow interval, consolidation alpha and slow rank, and APER's adaptation phases.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from callbacks.continual_eval import ContinualEvaluation, continual_results  # noqa: E402
from callbacks.multi_rate import MultiRateStepping  # noqa: E402
from datamodules.continual import ClassIncrementalDataModule  # noqa: E402
from datamodules.glyph_backbone import GlyphPretraining  # noqa: E402
from lightning_modules.continual_vit import ContinualClassifier  # noqa: E402
from models.continual.classifiers import NCMClassifier, RidgeClassifier  # noqa: E402
from models.metrics import continual as cm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "sema_nested.yaml"
CHOSEN = REPO / "benchmarks" / "continual_chosen.json"  # written by --select, read by the grid

#: name -> model overrides (learning rates come from CHOSEN)
METHODS: dict[str, dict] = {
    "simplecil": {"adapter_type": "none", "classifier": "ncm"},
    "ranpac": {"adapter_type": "none", "classifier": "ridge"},
    "none": {"adapter_type": "none"},
    "lora": {"adapter_type": "lora", "lora_r": 8},
    "nested_lora": {},
    "sema": {"adapter_type": "sema", "expansion_layers": [-3, -2, -1], "expansion_order": "joint"},
    "aper": {"adapter_type": "aper", "lora_r": 8, "classifier": "ncm"},  # aper_phases: from the selection
    "sema_layerwise": {"adapter_type": "sema", "expansion_layers": [-3, -2, -1], "expansion_order": "layerwise"},
    "sema_ridge": {"adapter_type": "sema", "expansion_layers": [-3, -2, -1], "expansion_order": "joint",
                   "classifier": "ridge"},
    "aper_ridge": {"adapter_type": "aper", "lora_r": 8, "classifier": "ridge"},
    "lora_ncm": {"adapter_type": "lora", "lora_r": 8, "classifier": "ncm"},
    "nested_ncm": {"classifier": "ncm"},
    "lora_ridge": {"adapter_type": "lora", "lora_r": 8, "classifier": "ridge"},
    "nested_ridge": {"classifier": "ridge"},
    "joint_lora": {"adapter_type": "lora", "lora_r": 8},
}
FEATURE_ONLY = ("simplecil", "ranpac")
LABELS = {
    "simplecil": "SimpleCIL (frozen, cosine NCM)", "ranpac": "RanPAC (frozen, random proj. + ridge)",
    "none": "head only (frozen, linear)", "lora": "LoRA r8 (linear head)", "nested_lora": "Nested LoRA 4+4 (main job)",
    "sema": "SEMA (joint order)", "aper": "APER (LoRA r8 on task 0, NCM)", "lora_ncm": "LoRA r8 + NCM",
    "nested_ncm": "Nested LoRA 4+4 + NCM", "aper_ridge": "APER + ridge (RanPAC with first-session adaptation)",
    "lora_ridge": "LoRA r8 + ridge", "nested_ridge": "Nested LoRA 4+4 + ridge",
    "sema_layerwise": "SEMA (layer-by-layer order, SEMA-CL's)", "sema_ridge": "SEMA (joint order) + ridge",
    "joint_lora": "joint LoRA r8 (upper bound, one task)",
}
#: lr grids of --select (centred on the previous selection; extended by x3 steps while the winner is at an edge)
GRIDS = {"lr_head": [3e-2, 9e-2, 2.7e-1],
         "lr_fast": {"lora": [1e-3, 3e-3, 9e-3], "aper": [3e-4, 1e-3, 3e-3], "nested_lora": [3e-3, 9e-3, 2.7e-2],
                     "sema": [3e-3, 9e-3, 2.7e-2]}}
#: SEMA calibration: descriptor widths tried, the multi-domain sequence its z-scores are read on
SEMA_WIDTHS = [8, 16, 32]
MULTIDOMAIN = {"dataset": "multidomain", "domain_classes": [15, 15, 10, 10]}
#: data overrides of the sequence the grid runs (``--sequence``): {} = the main job's shifted glyph sequence
SEQUENCE: dict = {}
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def config_args() -> tuple[dict, dict]:
    cfg = yaml.safe_load(CONFIG.read_text())
    return cfg["model"]["init_args"], cfg["data"]["init_args"]


def trainer_args() -> dict:
    return yaml.safe_load(CONFIG.read_text())["trainer"]


def chosen() -> dict[str, dict]:
    return json.loads(CHOSEN.read_text()) if CHOSEN.exists() else {}


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
        data_overrides: dict | None = None, use_chosen: bool = True) -> dict:
    """One method over the whole sequence through the LightningModule (``split="val"``: the accuracy matrix on the
    validation split, for ``--select``, which passes ``use_chosen=False``)."""
    model_args, data_args = config_args()
    over = {**METHODS[method], **(chosen().get(method, {}) if use_chosen else {}), **(model_overrides or {})}
    model_args = {**copy.deepcopy(model_args), **resolve(over)}
    data_args = {**data_args, "class_order_seed": 1993 + seed, **SEQUENCE, **(data_overrides or {})}
    if method == "joint_lora":  # one task of every class; 4 epochs unless data_overrides says otherwise
        data_args.update(init_cls=data_args["glyph_classes"],
                         epochs_per_task=(data_overrides or {}).get("epochs_per_task", 4))
    model_args["pretrain"] = GlyphPretraining(**model_args["pretrain"])
    L.seed_everything(seed, verbose=False)
    module = ContinualClassifier(**model_args)
    dm = ClassIncrementalDataModule(**data_args)
    # validation runs as in the main job (its loaders draw from the global random state, so skipping it would
    # change the training batches' order): seed 0 of `nested_lora` reproduces the main job
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        check_val_every_n_epoch=trainer_args().get("check_val_every_n_epoch", 1),
                        callbacks=[MultiRateStepping(), ContinualEvaluation(split=split, plots=False)],
                        default_root_dir=str(REPO / "runs" / "benchmark_continual"))
    t0 = time.perf_counter()
    trainer.fit(module, dm)
    res = continual_results(trainer, module)
    res.update(method=method, seed=seed, seconds=time.perf_counter() - t0, split=split,
               within_task_acc=within_task_accuracy(module, dm, split), settings=over,
               class_order_seed=data_args["class_order_seed"])
    return res


# ---------------------------------------------------------------------------------------------- frozen features
_FEATURES: dict[str, Any] = {}


@torch.no_grad()
def frozen_features(data_overrides: dict | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Pooled features of the frozen backbone for every image of each split, with the *original* class labels
    (before any class order), computed once per process."""
    key = json.dumps(data_overrides or {}, sort_keys=True)
    if key in _FEATURES:
        return _FEATURES[key]
    model_args, data_args = config_args()
    model_args = {**model_args, "adapter_type": "none", "pretrain": GlyphPretraining(**model_args["pretrain"])}
    module = ContinualClassifier(**model_args).eval()
    dm = ClassIncrementalDataModule(**{**data_args, **(data_overrides or {}), "shuffle": False})
    dm.setup()
    out = {}
    for split, ds in dm._sets.items():
        out[split] = (torch.cat([module.model.features(x) for x, _ in dm.loader(ds)]), ds.labels.clone())
    _FEATURES[key] = out
    return out


def run_features(method: str, seed: int, split: str = "test") -> dict:
    """SimpleCIL / RanPAC from frozen features: per task, fit the classifier on the task's training features and
    score the seen tasks' ``split`` features (the same classifiers the CLI fits at task ends)."""
    t0 = time.perf_counter()
    feats = frozen_features(SEQUENCE)
    _, data_args = config_args()
    dm = ClassIncrementalDataModule(**{**data_args, "class_order_seed": 1993 + seed, **SEQUENCE})
    position = torch.empty(dm.num_classes, dtype=torch.long)
    position[torch.from_numpy(dm.class_order).long()] = torch.arange(dm.num_classes)
    f = {s: (x, position[y]) for s, (x, y) in feats.items()}
    n, dim = dm.num_classes, f["train"][0].shape[1]
    clf = NCMClassifier(dim, n) if method == "simplecil" else RidgeClassifier(dim, n, 1000, seed=0)
    R, A, records = [], [], []
    for t in range(dm.num_tasks):
        lo, hi = dm.task_offset(t), dm.classes_seen(t)
        tr = (f["train"][1] >= lo) & (f["train"][1] < hi)
        va = (f["val"][1] >= lo) & (f["val"][1] < hi)
        clf.fit_task(f["train"][0][tr], f["train"][1][tr], hi, (f["val"][0][va], f["val"][1][va]))
        te = f[split][1] < hi
        pred = clf(f[split][0][te]).argmax(-1)
        conf = np.bincount((f[split][1][te] * hi + pred).numpy(), minlength=hi * hi).reshape(hi, hi)
        R.append([float(np.diag(conf)[dm.task_offset(i):dm.classes_seen(i)].sum()
                        / conf[dm.task_offset(i):dm.classes_seen(i)].sum()) for i in range(t + 1)])
        A.append(float(np.trace(conf) / conf.sum()))
        records.append({"task": t, **cm.old_new_accuracy(conf, lo, hi), "relative_delta": 0.0})
    records[-1]["acc_adapters_off"] = A[-1]
    within = []
    for t in range(dm.num_tasks):
        lo, hi = dm.task_offset(t), dm.classes_seen(t)
        m = (f[split][1] >= lo) & (f[split][1] < hi)
        within.append(float(((clf(f[split][0][m])[:, lo:hi].argmax(-1) + lo) == f[split][1][m]).float().mean()))
    return {"method": method, "seed": seed, "split": split, "accuracy_matrix": R, "acc_seen": A,
            **cm.summary(R, A), "task_records": records, "relative_delta": 0.0, "acc_adapters_off": A[-1],
            "within_task_acc": sum(within) / len(within), "trainable_params": {"trainable": 0},
            "seconds": time.perf_counter() - t0, "class_order_seed": 1993 + seed}


# ---------------------------------------------------------------------------------------------- grids
def extend(values: list[float], score: Any, factor: float = 3.0, steps: int = 2) -> tuple[float, list[float]]:
    """Best of ``values`` by ``score`` (higher is better; each value scored once, ``score`` may cache); while the
    winner is at an edge, one more value ``factor`` further out in that direction (``steps`` times at most).
    Returns the winner and the grid actually scored."""
    values = sorted(values)
    scores: dict[float, float] = {}
    for _ in range(steps + 1):
        for v in values:
            if v not in scores:
                scores[v] = score(v)
        best = max(values, key=lambda v: scores[v])
        if best not in (values[0], values[-1]) or _ == steps:
            break
        values = [best / factor] + values if best == values[0] else values + [best * factor]
    return best, values


# ---------------------------------------------------------------------------------------------- headroom
def headroom(out: Path) -> dict:
    """Joint (all 50 classes at once) linear probe on frozen features vs joint LoRA, test split; the probe's lr and
    weight decay and LoRA's lr chosen on the validation split."""
    feats = frozen_features()
    x, y = feats["train"]
    mu, sd = x.mean(0), x.std(0) + 1e-6
    rows: list = []
    probes: dict[tuple[float, float], dict[str, float]] = {}

    def probe(lr: float, wd: float) -> dict[str, float]:
        if (lr, wd) not in probes:
            torch.manual_seed(0)
            head = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
            opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=wd)
            for _ in range(300):
                loss = F.cross_entropy(head((x - mu) / sd), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                probes[lr, wd] = {s: float((head((feats[s][0] - mu) / sd).argmax(-1) == feats[s][1]).float().mean())
                                  for s in ("val", "test")}
            rows.append((lr, wd, probes[lr, wd]))
        return probes[lr, wd]

    # weight decay and lr, each grid extended while its winner is at an edge
    wd_grid, lr_grid = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1], [3e-3, 1e-2, 3e-2, 1e-1]
    for _ in range(3):
        wd_best, wd_grid = extend(wd_grid, lambda wd: max(probe(lr, wd)["val"] for lr in lr_grid), factor=10)
        lr_best, lr_grid = extend(lr_grid, lambda lr: probe(lr, wd_best)["val"])
        if wd_best not in (wd_grid[0], wd_grid[-1]) and lr_best not in (lr_grid[0], lr_grid[-1]):
            break
    best = (lr_best, wd_best, probe(lr_best, wd_best))
    lora: dict[tuple[float, int], float] = {}
    runs_file = out.with_name("headroom_runs.jsonl")  # val runs, reused when the search is run again
    done = {(r["lr"], r["epochs"], r["seed"]): r["acc"] for r in map(json.loads, runs_file.read_text().splitlines())
            } if runs_file.exists() else {}

    def lora_val(lr: float, epochs: int) -> float:
        """Validation accuracy of joint LoRA, mean over two selection seeds (one seed's run can diverge)."""
        if (lr, epochs) not in lora:
            accs = []
            for seed in (100, 101):
                if (lr, epochs, seed) not in done:
                    r = run("joint_lora", seed, "val", {"lr_fast": lr}, {"epochs_per_task": epochs}, use_chosen=False)
                    done[lr, epochs, seed] = r["acc_seen"][-1]
                    with runs_file.open("a") as f:
                        f.write(json.dumps({"lr": lr, "epochs": epochs, "seed": seed, "acc": r["acc_seen"][-1]}) + "\n")
                accs.append(done[lr, epochs, seed])
            lora[lr, epochs] = statistics.mean(accs)
            print(f"[headroom] joint LoRA lr {lr:g}, {epochs} epochs: val acc {100 * lora[lr, epochs]:.1f} (seeds "
                  f"100, 101: {', '.join(f'{100 * a:.1f}' for a in accs)})", flush=True)
        return lora[lr, epochs]

    # epochs: 4 / 8 / 16 at lr 3e-3, no further (accuracy still rises at 16: the joint bound, and so the headroom,
    # is a lower estimate); then the lr at the best epochs, extended while its winner is at an edge
    epochs = max([4, 8, 16], key=lambda e: lora_val(3e-3, e))
    lr_lora, _ = extend([1e-3, 3e-3, 1e-2], lambda lr: lora_val(lr, epochs))
    tests = [run("joint_lora", seed, "test", {"lr_fast": lr_lora}, {"epochs_per_task": epochs}, use_chosen=False)
             for seed in (0, 1, 2)]
    test = tests[0]
    result = {"probe_lr": best[0], "probe_wd": best[1], "probe_val": best[2]["val"], "probe_test": best[2]["test"],
              "probe_grid": rows, "probe_lr_grid": lr_grid, "probe_wd_grid": wd_grid, "lora_lr": lr_lora,
              "lora_epochs": epochs, "lora_val": {f"lr {k[0]:g}, {k[1]} epochs": v for k, v in lora.items()},
              "lora_test": statistics.median(r["acc_seen"][-1] for r in tests),
              "lora_test_seeds": [r["acc_seen"][-1] for r in tests], "joint_lora_run": test}
    result["headroom"] = result["lora_test"] - result["probe_test"]
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"[headroom] joint linear probe (frozen backbone; lr {best[0]:g}, wd {best[1]:g}, chosen on val): test "
          f"{100 * result['probe_test']:.1f}%; joint LoRA r8 (lr {lr_lora:g}, {epochs} epochs, chosen on val): test "
          f"{100 * result['lora_test']:.1f}% (median of seeds 0-2: "
          f"{', '.join(f'{100 * a:.1f}' for a in result['lora_test_seeds'])}); "
          f"headroom {100 * result['headroom']:+.1f} points "
          f"({'>=' if result['headroom'] >= 0.15 else '<'} 15)", flush=True)
    return result


# ---------------------------------------------------------------------------------------------- selection
def select(seed: int, out: Path, methods: tuple[str, ...] = ("lora", "aper", "nested_lora", "sema")
           ) -> dict[str, dict]:
    """Per-method settings on the validation split with seed ``seed`` (class order ``1993 + seed``), coordinate by
    coordinate; an lr grid whose winner is at an edge is extended by a x3 step in that direction (twice at most).
    Score: validation average incremental accuracy. The head lr (head only) comes first and is shared; then
    ``methods`` (several processes may select different methods at once: runs are cached in ``out`` and
    ``benchmarks/continual_chosen.json`` is merged). Writes ``benchmarks/continual_chosen.json``."""
    lines = out.read_text().splitlines() if out.exists() else []
    cache = {json.dumps([r["method"], r["settings"]], sort_keys=True): r for r in map(json.loads, lines)
             if r["seed"] == seed}
    table: list[str] = ["| method | setting | value | val avg inc. acc | val last acc | val forgetting | chosen |",
                        "|---|---|---|---|---|---|---|"]

    def score(method: str, settings: dict) -> float:
        full = {**METHODS[method], **settings}
        key = json.dumps([method, full], sort_keys=True)
        if key not in cache:
            r = run(method, seed, "val", settings, use_chosen=False)
            cache[key] = r
            with out.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"[select] {method} {settings}: val avg {100 * r['avg_incremental_acc']:.1f} last "
                  f"{100 * r['last_acc']:.1f} ({r['seconds']:.0f} s)", flush=True)
        return cache[key]["avg_incremental_acc"]

    def search(method: str, base: dict, key: str, values: list, log_grid: bool = True) -> dict:
        """One coordinate; a numeric grid is extended while its winner is at an edge."""
        if log_grid:
            best, values = extend(values, lambda v: score(method, {**base, key: v}))
        else:
            best = max(values, key=lambda v: score(method, {**base, key: v}))
        for v in values:
            r = cache[json.dumps([method, {**METHODS[method], **base, key: v}], sort_keys=True)]
            table.append(f"| {method} | {key} | {v:g} | {100 * r['avg_incremental_acc']:.1f} | "
                         f"{100 * r['last_acc']:.1f} | {100 * r['forgetting']:.1f} | "
                         f"{'**yes**' if v == best else ''} |")
        return {**base, key: best}

    picked: dict[str, dict] = {}
    picked["none"] = search("none", {}, "lr_head", GRIDS["lr_head"])
    head = {"lr_head": picked["none"]["lr_head"]}
    if "lora" in methods:
        picked["lora"] = search("lora", head, "lr_fast", GRIDS["lr_fast"]["lora"])
    if "aper" in methods:  # lr at 3 adaptation phases, the phases, the lr again at the chosen phases
        aper = search("aper", {**head, "aper_phases": 3}, "lr_fast", GRIDS["lr_fast"]["aper"])
        aper = search("aper", aper, "aper_phases", [1, 3, 9], log_grid=False)
        picked["aper"] = search("aper", aper, "lr_fast", GRIDS["lr_fast"]["aper"])
    if "nested_lora" in methods:
        # seed 004's knobs, one coordinate at a time from the main job's settings: fast lr (slow = fast / ratio),
        # the slow/fast ratio 1x / 10x / 100x, the slow interval, the consolidation alpha, slow rank r vs 2r
        nested = {**head, "lr_slow_ratio": 10, "slow_update_interval": 3, "consolidation_alpha": 1.0}
        nested = search("nested_lora", nested, "lr_fast", GRIDS["lr_fast"]["nested_lora"])
        nested = search("nested_lora", nested, "lr_slow_ratio", [1, 10, 100], log_grid=False)
        nested = search("nested_lora", nested, "slow_update_interval", [1, 3, 9], log_grid=False)
        nested = search("nested_lora", nested, "consolidation_alpha", [0.5, 1.0, 2.0])
        picked["nested_lora"] = search("nested_lora", nested, "nested_slow_r", [4, 8], log_grid=False)
    if "sema" in methods:
        calib = calibrate_sema(seed, cache, out)
        table.extend(calib.pop("table"))
        picked["sema"] = search("sema", {**head, **calib}, "lr_fast", GRIDS["lr_fast"]["sema"])
    if "lora" in picked:
        picked["lora_ncm"] = picked["lora_ridge"] = picked["joint_lora"] = picked["lora"]
    if "nested_lora" in picked:
        picked["nested_ncm"] = picked["nested_ridge"] = picked["nested_lora"]
    if "aper" in picked:
        picked["aper_ridge"] = picked["aper"]
    if "sema" in picked:
        picked["sema_layerwise"] = picked["sema_ridge"] = picked["sema"]
    print("\n".join(table))
    current = chosen()  # other --select processes may have written their methods meanwhile
    current.update({k: resolve(v) for k, v in picked.items()})
    CHOSEN.write_text(json.dumps(current, indent=2) + "\n")
    print(f"\nselection seed {seed} (class order {1993 + seed}), validation split: {json.dumps(picked)}")
    with (out.parent / "select_table.md").open("a") as f:
        f.write("\n".join(table) + "\n")
    return picked


def domain_of(starts: list[int], task: int) -> int:
    """Index of the domain a task belongs to, from the domains' first tasks."""
    return sum(1 for s in starts if s <= task) - 1


def calibrate_sema(seed: int, cache: dict, out: Path) -> dict:
    """SEMA's expansion threshold and descriptor width from z-scores, not from accuracy: for each width, SEMA runs
    the multi-domain sequence (validation split, seed ``seed``) with expansion switched off, so every later task is
    tested against the task-0 descriptors. Tasks of the first domain are held-out new classes of the descriptors'
    own domain; the threshold is the largest z they reach (no false expansion on them), and the width is the one
    whose threshold the later domains' tasks exceed most often (ties: by the median ratio of their z to it)."""
    _, data_args = config_args()
    starts = ClassIncrementalDataModule(**{**data_args, **MULTIDOMAIN}).domain_tasks
    table = ["", "| SEMA calibration | width | threshold (max z, first domain) | later-domain tasks detected | "
             "median z / threshold |", "|---|---|---|---|---|"]
    scores = {}
    for width in SEMA_WIDTHS:
        settings = {"sema_descriptor_hidden": width, "expansion_threshold": 1e9, "lr_fast": 9e-3}
        key = json.dumps(["sema@multidomain", {**METHODS["sema"], **settings}], sort_keys=True)
        if key not in cache:
            r = run("sema", seed, "val", settings, MULTIDOMAIN, use_chosen=False)
            r["method"] = "sema@multidomain"
            cache[key] = r
            with out.open("a") as f:
                f.write(json.dumps(r) + "\n")
        per_task: dict[int, float] = {}
        for d in cache[key]["sema_decisions"]:
            per_task[d["task"]] = max(per_task.get(d["task"], 0.0), d["z"])
        same = [z for t, z in per_task.items() if domain_of(starts, t) == 0]
        other = [z for t, z in per_task.items() if domain_of(starts, t) > 0]
        thr = math.ceil(100 * max(same)) / 100
        detected = sum(z > thr for z in other) / len(other)
        ratio = statistics.median(z / thr for z in other)
        scores[width] = (detected, ratio, thr)
        table.append(f"| | {width} | {thr:.2f} | {100 * detected:.0f}% of {len(other)} | {ratio:.2f} |")
        print(f"[select] SEMA width {width}: threshold {thr:.2f}, later domains detected {100 * detected:.0f}%, "
              f"median z/threshold {ratio:.2f}", flush=True)
    width = max(SEMA_WIDTHS, key=lambda w: scores[w][:2])
    table.append(f"| chosen | **{width}** | **{scores[width][2]:.2f}** | | |")
    return {"sema_descriptor_hidden": width, "expansion_threshold": scores[width][2], "table": table}


def resolve(settings: dict) -> dict:
    """``lr_slow_ratio`` (selection knob) -> ``lr_slow``."""
    s = dict(settings)
    if "lr_slow_ratio" in s:
        s["lr_slow"] = s["lr_fast"] / s.pop("lr_slow_ratio")
    return s


# ---------------------------------------------------------------------------------------------- tables
def fmt(values: list[float], scale: float = 100.0) -> str:
    v = [scale * x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.1f}"
    return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}"


def paired(a: list[float], b: list[float]) -> str:
    """Mean paired difference a - b in points with its 95% t confidence interval."""
    d = [100 * (x - y) for x, y in zip(a, b)]
    if len(d) < 2:
        return "-"
    m, s = statistics.mean(d), statistics.stdev(d)
    h = T_975.get(len(d) - 1, 1.96) * s / math.sqrt(len(d))
    return f"{m:+.1f} [{m - h:+.1f}, {m + h:+.1f}]"


def tables(rows: list[dict]) -> str:
    by = {m: sorted([r for r in rows if r["method"] == m], key=lambda r: r["seed"]) for m in METHODS}
    out = ["| method | seeds | avg incremental acc | last acc | forgetting | within-task acc | old / new acc (last "
           "task) | ‖ΔW‖/‖W‖ | last acc, adapters off | trainable params | time/run |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, rs in by.items():
        if not rs:
            continue
        last = [r["task_records"][-1] for r in rs]
        out.append(
            f"| {LABELS[m]} | {len(rs)} | {fmt([r['avg_incremental_acc'] for r in rs])} | "
            f"{fmt([r['last_acc'] for r in rs])} | {fmt([r['forgetting'] for r in rs])} | "
            f"{fmt([r['within_task_acc'] for r in rs])} | {fmt([x.get('old_acc', math.nan) for x in last])} / "
            f"{fmt([x['new_acc'] for x in last])} | "
            f"{statistics.mean(r['relative_delta'] for r in rs):.3f} | "
            f"{fmt([r.get('acc_adapters_off', math.nan) for r in rs])} | "
            f"{rs[0]['trainable_params'].get('trainable', 0):,} | {statistics.mean(r['seconds'] for r in rs):.0f} s |")
    ref = {r["seed"]: r for r in by["lora"]}
    out += ["", "Paired differences against LoRA r8 (same seed and class order), mean and 95% t interval, points:", "",
            "| method | seeds | Δ last acc | Δ avg incremental acc | Δ forgetting |", "|---|---|---|---|---|"]
    for m, rs in by.items():
        rs = [r for r in rs if r["seed"] in ref]
        if m == "lora" or len(rs) < 2:
            continue
        b = [ref[r["seed"]] for r in rs]
        out.append(f"| {LABELS[m]} | {len(rs)} | {paired([r['last_acc'] for r in rs], [x['last_acc'] for x in b])} | "
                   f"{paired([r['avg_incremental_acc'] for r in rs], [x['avg_incremental_acc'] for x in b])} | "
                   f"{paired([r['forgetting'] for r in rs], [x['forgetting'] for x in b])} |")
    pairs = [("nested_lora", "lora"), ("nested_ncm", "lora_ncm"), ("nested_ridge", "lora_ridge"),
             ("aper", "simplecil"), ("aper_ridge", "ranpac"),
             ("sema_layerwise", "sema"), ("sema_ridge", "lora_ridge"), ("lora_ridge", "ranpac"),
             ("nested_ridge", "ranpac")]
    out += ["", "Paired differences with the same classifier (same seed and class order), mean and 95% t interval, "
            "points:", "", "| method | against | seeds | Δ last acc | Δ avg incremental acc | Δ forgetting |",
            "|---|---|---|---|---|---|"]
    for m, base in pairs:
        ref = {r["seed"]: r for r in by[base]}
        rs = [r for r in by[m] if r["seed"] in ref]
        if len(rs) < 2:
            continue
        b = [ref[r["seed"]] for r in rs]
        out.append(f"| {LABELS[m]} | {LABELS[base]} | {len(rs)} | "
                   f"{paired([r['last_acc'] for r in rs], [x['last_acc'] for x in b])} | "
                   f"{paired([r['avg_incremental_acc'] for r in rs], [x['avg_incremental_acc'] for x in b])} | "
                   f"{paired([r['forgetting'] for r in rs], [x['forgetting'] for x in b])} |")
    return "\n".join(out)


def per_task(rows: list[dict], methods: tuple[str, ...] = ("simplecil", "none", "lora", "nested_lora", "sema")) -> str:
    """Old / new accuracy after each task (mean over seeds)."""
    out = ["| method | " + " | ".join(f"t{t}" for t in range(10)) + " |", "|---|" + "---|" * 10]
    for m in methods:
        rs = [r for r in rows if r["method"] == m]
        if not rs:
            continue
        cells = []
        for t in range(len(rs[0]["task_records"])):
            old = [r["task_records"][t].get("old_acc") for r in rs]
            new = [r["task_records"][t]["new_acc"] for r in rs]
            o = "-" if old[0] is None else f"{100 * statistics.mean(old):.0f}"
            cells.append(f"{o}/{100 * statistics.mean(new):.0f}")
        out.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def curves_figure(rows: list[dict], path: Path, title: str) -> None:
    curves, spreads = {}, {}
    for m in METHODS:
        rs = [r for r in rows if r["method"] == m and m != "joint_lora"]
        if rs:
            a = np.array([r["acc_seen"] for r in rs])
            curves[LABELS[m]], spreads[LABELS[m]] = a.mean(0), a.std(0)
    cm.save_figure(cm.plot_curves(curves, spreads, f"{title}: accuracy on all seen classes (mean ± std over seeds)"),
                   path)


# ---------------------------------------------------------------------------------------------- multidomain
def multidomain(seed: int, out: Path) -> None:
    """SEMA on the multi-domain sequence: expansions per layer against the known domain boundaries."""
    dm_over = MULTIDOMAIN
    r = run("sema", seed, "test", data_overrides=dm_over)
    with out.open("a") as f:
        f.write(json.dumps(r) + "\n")
    dm = ClassIncrementalDataModule(**{**config_args()[1], **dm_over})
    starts = dm.domain_tasks
    print(f"multidomain (domains start at tasks {starts}): last acc {100 * r['last_acc']:.1f}, avg "
          f"{100 * r['avg_incremental_acc']:.1f}")
    layers = sorted({e["layer"] for e in r["expansions"]} | set(int(k) for k in r["sema_layout"]))
    print("| layer | " + " | ".join(f"t{t}{'*' if t in starts else ''}" for t in range(1, dm.num_tasks)) + " |")
    for layer in layers:
        hit = {e["task"] for e in r["expansions"] if e["layer"] == layer}
        print(f"| {layer} | " + " | ".join("E" if t in hit else "." for t in range(1, dm.num_tasks)) + " |")
    z = {(d["task"], d["layer"]): d["z"] for d in r["sema_decisions"]}
    for layer in layers:
        print(f"| z, layer {layer} | " + " | ".join(f"{z[t, layer]:.1f}" if (t, layer) in z else "-"
                                                   for t in range(1, dm.num_tasks)) + " |")
    print(f"threshold {r['settings'].get('expansion_threshold')}, descriptor width "
          f"{r['settings'].get('sema_descriptor_hidden')} (from --select)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "joint_lora"], choices=list(METHODS))
    p.add_argument("--sequence", choices=["shifted", "multidomain"], default="shifted",
                   help="the grid's sequence: the main job's (shifted glyphs) or the multi-domain one")
    p.add_argument("--out", default=None, help="JSON lines of the grid (default: runs/benchmark_continual/"
                   "results.jsonl, results_multidomain.jsonl with --sequence multidomain)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--table-only", action="store_true", help="print the tables of --out and exit")
    p.add_argument("--headroom", action="store_true", help="joint linear probe vs joint LoRA, then exit")
    p.add_argument("--select", action="store_true", help="choose the settings on the validation split, then exit")
    p.add_argument("--select-seed", type=int, default=100, help="seed of the selection runs (not a reported one)")
    p.add_argument("--select-out", default="runs/benchmark_continual/select.jsonl")
    p.add_argument("--select-methods", nargs="+", default=["lora", "aper", "nested_lora", "sema"],
                   choices=["lora", "aper", "nested_lora", "sema"], help="methods --select tunes")
    p.add_argument("--multidomain", action="store_true", help="SEMA on the multi-domain sequence, then exit")
    p.add_argument("--wait-chosen", action="store_true",
                   help="wait until --select (run in parallel) has written settings for every --methods entry")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.sequence == "multidomain":
        SEQUENCE.update(MULTIDOMAIN)
    out = Path(args.out or f"runs/benchmark_continual/results{'_multidomain' if SEQUENCE else ''}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.headroom:
        headroom(out.parent / "headroom.json")
        return
    if args.select:
        if args.select_seed in args.seeds:
            raise SystemExit(f"error: --select-seed {args.select_seed} is one of the reported --seeds {args.seeds}")
        select(args.select_seed, Path(args.select_out), tuple(args.select_methods))
        return
    if args.multidomain:
        multidomain(args.seeds[0], out.parent / "multidomain.jsonl")
        return
    head_file = out.parent / "headroom.json"
    if not SEQUENCE and head_file.exists():  # the grid means something only with room for adaptation
        h = json.loads(head_file.read_text())
        print(f"headroom ({head_file}): joint linear probe {100 * h['probe_test']:.1f}% vs joint LoRA "
              f"{100 * h['lora_test']:.1f}%: {100 * h['headroom']:+.1f} points "
              f"({'>=' if h['headroom'] >= 0.15 else 'BELOW'} 15)\n", flush=True)
    elif not SEQUENCE:
        print("headroom not measured yet: python benchmarks/continual.py --headroom\n", flush=True)
    while args.wait_chosen and not all(m in chosen() for m in args.methods if m not in FEATURE_ONLY):
        time.sleep(30)
    if not args.table_only:
        lines = out.read_text().splitlines() if out.exists() else []
        done = {(r["method"], r["seed"]) for r in map(json.loads, lines)}
        for seed in args.seeds:
            for method in args.methods:
                if (method, seed) in done:
                    continue
                res = run_features(method, seed) if method in FEATURE_ONLY else run(method, seed)
                with out.open("a") as f:
                    f.write(json.dumps(res) + "\n")
                print(f"{method} seed {seed}: avg {100 * res['avg_incremental_acc']:.1f} last "
                      f"{100 * res['last_acc']:.1f} forgetting {100 * res['forgetting']:.1f} within-task "
                      f"{100 * res['within_task_acc']:.1f} ({res['seconds']:.0f} s)", flush=True)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    rows = [r for r in rows if r["seed"] in args.seeds]
    print()
    print(tables(rows))
    print("\nOld / new accuracy after each task (old/new, %, mean over seeds):\n")
    print(per_task(rows))
    if rows:
        curves_figure(rows, REPO / "benchmarks" / f"continual_curves{'_multidomain' if SEQUENCE else ''}.png",
                      "multi-domain sequence" if SEQUENCE else "shifted glyph sequence")
    print(f"\n{args.sequence} sequence, 10 tasks x 5 classes, class order seed 1993 + seed; settings from "
          f"{CHOSEN.name}; torch threads {args.threads}")


if __name__ == "__main__":
    main()
