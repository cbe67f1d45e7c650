"""Skip2-LoRA + Skip-Cache vs Skip2-LoRA without cache vs standard LoRA (same trainable parameter count).

One run, same data, same machine: pre-train a small byte-level GPT on the stdlib's top-level modules (Python code),
then fine-tune it on English prose, the Python documentation that ships inside every standard library
(``pydoc_data.topics``: 79 reStructuredText topics in Python 3.11, ~0.46 MB, the text ``help("if")`` shows), three
ways, and print a markdown ratio table: train-epoch time (epoch 1, the median of epochs 2+, and the total
fine-tuning time, which is what the paper's "90% less" refers to, with the saving after every epoch count),
cache-filling overhead, and the loss. The topics are written one file each to a temporary folder and split by
file (``TextDataModule(source="files")``, hash of the file name): train, val and test are different topics, and
the pre-training files (top-level ``*.py``) do not include ``pydoc_data/``. Quality: each method's learning rate is
chosen on the validation split and its loss is reported on the held-out test split, next to the pre-trained model
without any fine-tuning (the do-nothing baseline; the check ``fine-tuning matters on this split`` needs a gain of
at least 2% of its loss).
Epochs of the three methods run interleaved (epoch e of each method in turn), so machine noise hits
them alike. The training loop is plain PyTorch over the same ``GPT``/``SkipCache`` code the
Lightning module uses (no Lightning overhead in the timings).

    python benchmarks/skip2lora.py --weights /tmp/gpt_bench.pt   # a few minutes on a busy 2-core CPU
    python benchmarks/skip2lora.py --weights /tmp/gpt_bench.pt --epochs 16 --lrs 3e-3 1e-2   # time-saving curve
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.text import TextDataModule  # noqa: E402
from models.adapters.lora import count_parameters  # noqa: E402
from models.cache.skip_cache import SkipCache  # noqa: E402
from models.lm.gpt import GPT, Config, load_backbone_state  # noqa: E402


def arch(a: argparse.Namespace) -> dict:
    return dict(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, block_size=a.seq_len, vocab_size=256)


def write_pydoc_topics(folder: Path) -> int:
    """Write every ``pydoc_data.topics`` entry (English documentation prose) to ``folder/<topic>.txt``; returns
    how many. Offline: the module is part of the standard library (``pydoc`` reads it for ``help()``)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip it; no other prose of this size ships offline
        raise SystemExit(f"error: this Python has no pydoc_data.topics (the fine-tuning text): {e}") from e
    for name, text in topics.items():
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return len(topics)


def batches(n: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).split(batch_size))


def pretrain(a: argparse.Namespace, data: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(Config(**arch(a)))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    step, t0 = 0, time.perf_counter()
    while step < a.pretrain_steps:
        for keys in batches(len(data), a.batch_size, step):
            x, y = data[keys, :-1], data[keys, 1:]
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step % 50 == 0 or step == a.pretrain_steps:
                print(f"  pretrain step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
            if step == a.pretrain_steps:
                break
    return model.state_dict()


@torch.no_grad()
def val_loss(model: GPT, data: torch.Tensor, batch_size: int) -> float:
    model.eval()
    total = 0.0
    for chunk in data.split(batch_size):
        total += F.cross_entropy(model(chunk[:, :-1]).flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
    model.train()
    return total / (len(data) * (data.size(1) - 1))


class Method:
    """One fine-tuning variant: its model, optimizer, optional cache and per-epoch timings."""

    def __init__(self, name: str, config: Config, weights: dict, lr: float, cache: bool, n: int, seq_len: int):
        torch.manual_seed(1)
        self.name, self.model = name, GPT(config)
        load_backbone_state(self.model, weights)  # maps plain keys onto LoRA-wrapped layers
        self.opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr)
        self.cache = None
        if cache:
            shapes = {"final": (seq_len, config.n_embd), "skip": (len(self.model.skip_indices), seq_len, config.n_embd)}
            self.cache = SkipCache(n, shapes, max_memory_mb=8192)
        self.times: list[float] = []
        self.val: list[float] = []
        self.test = float("nan")

    def epoch(self, data: torch.Tensor, batch_size: int, seed: int) -> None:
        t0 = time.perf_counter()
        for keys in batches(len(data), batch_size, seed):
            x, y = data[keys, :-1], data[keys, 1:]
            if self.cache is not None:
                feats = self.cache.lookup(keys, lambda pos: self.model.forward_backbone(x[pos]))
                logits = self.model.forward_from_cache(feats)
            else:
                logits = self.model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        self.times.append(time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--pretrain_steps", type=int, default=150)
    p.add_argument("--pretrain_windows", type=int, default=4000)
    p.add_argument("--train_windows", type=int, default=256)
    p.add_argument("--val_windows", type=int, default=128)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--skip2lora_r", type=int, default=8)
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2, 1e-1],
                   help="AdamW rates tried per method (the best is chosen on val for each method)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", help="pre-trained state dict: loaded if it exists, else written after pre-training")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    def windows(dm: TextDataModule, split: str) -> torch.Tensor:
        ds = dm.load_split(split)
        return torch.stack([torch.cat([ds[i]["input_ids"], ds[i]["labels"][-1:]]) for i in range(len(ds))])

    print(f"# Skip2-LoRA benchmark  torch {torch.__version__}, {a.threads} thread(s)", flush=True)
    pre_dm = TextDataModule(include=["*.py"], seq_len=a.seq_len, max_windows=a.pretrain_windows)
    assert not any("pydoc_data" in str(f) for s in pre_dm.split_files.values() for f in s)  # domains disjoint
    pre = windows(pre_dm, "train")
    with tempfile.TemporaryDirectory() as folder:
        n_topics = write_pydoc_topics(Path(folder))
        split = {s: TextDataModule(source="files", paths=[folder], seq_len=a.seq_len, max_windows=n)
                 for s, n in (("train", a.train_windows), ("val", a.val_windows), ("test", a.val_windows))}
        n_files = {s: len(dm.split_files[s]) for s, dm in split.items()}
        train, val, test = (windows(dm, s) for s, dm in split.items())
    if a.weights and Path(a.weights).is_file():
        print(f"pre-trained weights from {a.weights}", flush=True)
        weights = torch.load(a.weights, map_location="cpu", weights_only=True)
    else:
        print(f"pre-training on {len(pre)} windows of stdlib top-level modules, {a.pretrain_steps} steps", flush=True)
        weights = pretrain(a, pre)
        if a.weights:
            torch.save(weights, a.weights)

    # Equal budgets: Skip2-LoRA rank r on every block = 2*d*r per block; LoRA on query+value at r/2 = 2*2*d*(r/2).
    lora_r = a.skip2lora_r // 2
    skip_cfg = Config(**arch(a), skip2lora_enabled=True, skip2lora_r=a.skip2lora_r, skip2lora_alpha=2.0 * a.skip2lora_r)
    lora_cfg = Config(**arch(a), lora_query=True, lora_value=True, lora_r=lora_r, lora_alpha=2.0 * lora_r)
    kinds = [("Skip2-LoRA + Skip-Cache", skip_cfg, True), ("Skip2-LoRA, no cache", skip_cfg, False),
             (f"LoRA q,v r={lora_r}", lora_cfg, False)]
    base = GPT(Config(**arch(a)))
    base.load_state_dict(weights)
    base_val, base_test = val_loss(base, val, a.batch_size), val_loss(base, test, a.batch_size)
    print(f"fine-tuning on {len(train)} windows of the Python documentation (pydoc_data.topics, {n_topics} topics: "
          f"{n_files['train']} train, {n_files['val']} val, {n_files['test']} test; {len(val)} val, {len(test)} test "
          "windows); "
          f"pre-trained model's val loss there: {base_val:.4f}, test loss {base_test:.4f}", flush=True)
    # Untimed warm-up, one step of each kind on throwaway models: the first timed epoch of the process (always the
    # cached method's) does not pay for one-off kernel and allocator set-up.
    for name, cfg, cache in kinds:
        warm = Method(name, cfg, weights, a.lrs[0], cache, a.batch_size, a.seq_len)
        warm.epoch(train[: a.batch_size], a.batch_size, seed=0)
    runs: dict[str, list[Method]] = {name: [] for name, _, _ in kinds}
    for lr in a.lrs:
        methods = [Method(name, cfg, weights, lr, cache, len(train), a.seq_len) for name, cfg, cache in kinds]
        if lr == a.lrs[0]:
            for m in methods:
                print(f"  {m.name}: {count_parameters(m.model)} trainable parameters", flush=True)
        for e in range(a.epochs):
            for m in methods:
                m.epoch(train, a.batch_size, seed=100 + e)
                m.val.append(val_loss(m.model, val, a.batch_size))
            print(f"  lr {lr:g} epoch {e + 1}: "
                  + ", ".join(f"{m.name} {m.times[-1]:.2f} s / val {m.val[-1]:.4f}" for m in methods), flush=True)
        for m in methods:
            m.test = val_loss(m.model, test, a.batch_size)
            runs[m.name].append(m)
    report(a, runs, base_val, base_test, len(train))


def report(a: argparse.Namespace, runs: dict[str, list["Method"]], base_val: float, base_test: float,
           n_train: int) -> None:
    """Markdown tables: timings pooled over every learning rate; test loss at the rate chosen on validation."""
    names = list(runs)
    first = {n: statistics.median(m.times[0] for m in runs[n]) for n in names}
    later = {n: statistics.median(t for m in runs[n] for t in m.times[1:]) for n in names}  # robust to noise
    total = {n: statistics.median(sum(m.times) for m in runs[n]) for n in names}  # whole fine-tuning run
    best = {n: min(runs[n], key=lambda m: m.val[-1]) for n in names}  # chosen on val, reported on test
    cached, nocache, lora = names
    print(f"\nGPT n_layer={a.n_layer} n_embd={a.n_embd} seq_len={a.seq_len} batch={a.batch_size}, {n_train} training "
          f"windows, {a.epochs} epochs per run, learning rates {a.lrs}; cache {best[cached].cache.nbytes / 2**20:.0f} "
          f"MiB (float32). Times: medians over all runs (total = all {a.epochs} epochs, cache filling included); "
          "learning rate chosen on the val split, loss reported on the test split.\n")
    print("| method | trainable params | epoch 1 (s) | epochs 2+ (s) | speed-up vs LoRA (2+) | total (s) "
          f"| total time vs LoRA | lr (chosen on val) | test loss after {a.epochs} epochs | test loss vs LoRA |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| no fine-tuning (pre-trained) | 0 | - | - | - | 0 | - | - | {base_test:.4f} "
          f"| {100 * (base_test / best[lora].test - 1):+.2f}% |")
    for n in names:
        m = best[n]
        print(f"| {n} | {count_parameters(m.model)} | {first[n]:.2f} | {later[n]:.3f} | {later[lora] / later[n]:.1f}x "
              f"| {total[n]:.2f} | {100 * (total[n] / total[lora] - 1):+.0f}% | {m.opt.param_groups[0]['lr']:g} "
              f"| {m.test:.4f} | {100 * (m.test / best[lora].test - 1):+.2f}% |")
    print("\n| val loss by learning rate | " + " | ".join(f"{lr:g}" for lr in a.lrs) + " |")
    print("|---|" + "---|" * len(a.lrs))
    for n in (cached, lora):
        print(f"| {n} | " + " | ".join(f"{m.val[-1]:.4f}" for m in runs[n]) + " |")
    gap = max(abs(x.val[-1] - y.val[-1]) for x, y in zip(runs[cached], runs[nocache]))
    print(f"\ncache-filling overhead in epoch 1: {first[cached] / first[nocache]:.2f}x the uncached Skip2-LoRA epoch "
          f"({first[cached] - first[nocache]:+.2f} s); largest cached-vs-uncached val loss gap: {gap:.1e}; "
          f"test perplexity: " + ", ".join(f"{n} {math.exp(best[n].test):.2f}" for n in names)
          + f" (pre-trained: {math.exp(base_test):.2f})")
    saving = [1 - statistics.median(sum(m.times[:k]) for m in runs[cached])
              / statistics.median(sum(m.times[:k]) for m in runs[lora]) for k in range(1, a.epochs + 1)]
    reach = next((k for k, x in enumerate(saving, 1) if x >= 0.9), None)
    print("total fine-tuning time saving of Skip2-LoRA + Skip-Cache vs LoRA after k epochs (measured, cumulative "
          "per-epoch times, medians over the rates): " + ", ".join(f"{k}: {100 * x:.1f}%" for k, x in
                                                                    enumerate(saving, 1))
          + (f"; 90% is reached at {reach} epochs" if reach else f"; 90% not reached within {a.epochs} epochs"))
    speed_ok = later[lora] / later[cached] >= 10
    total_ok = total[cached] <= 0.1 * total[lora]
    loss_ok = best[cached].test <= 1.02 * best[lora].test
    gain = base_test - best[lora].test
    matters = gain >= 0.02 * base_test and abs(best[cached].test - best[lora].test) < 0.5 * gain
    print(f"targets: epochs 2+ >= 10x faster than LoRA: {'met' if speed_ok else 'MISSED'}; total fine-tuning time "
          f"<= 10% of LoRA's (the paper's '90% less'): {'met' if total_ok else 'MISSED'} "
          f"({100 * (1 - total[cached] / total[lora]):.0f}% less); test loss within 2% of LoRA: "
          f"{'met' if loss_ok else 'MISSED'}; fine-tuning matters on this split (LoRA gains {gain:.4f} nats over no "
          f"fine-tuning; needed: >= 2% of its loss and more than twice the Skip2-LoRA/LoRA gap): "
          f"{'yes' if matters else 'NO'}")


if __name__ == "__main__":
    main()
