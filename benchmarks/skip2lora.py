"""Skip2-LoRA + Skip-Cache vs Skip2-LoRA without cache vs standard LoRA (same trainable parameter count).

One run, same data, same machine: pre-train a small byte-level GPT on the stdlib's top-level modules,
then fine-tune it on ``email/`` + ``json/`` three ways and print a markdown ratio table:
train-epoch time (epoch 1 and the mean of epochs 2+), cache-filling overhead, validation loss.
Epochs of the three methods run interleaved (epoch e of each method in turn), so machine noise hits
them alike. The training loop is plain PyTorch over the same ``GPT``/``SkipCache`` code the
Lightning module uses (no Lightning overhead in the timings).

    python benchmarks/skip2lora.py --weights /tmp/gpt_bench.pt   # ~10-15 min on a busy 2-core CPU
    python benchmarks/skip2lora.py --epochs 3 --train_windows 128 --pretrain_steps 50   # quicker
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
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
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3], help="AdamW rates tried per method")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", help="pre-trained state dict: loaded if it exists, else written after pre-training")
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    def windows(include: list[str], split: str, n: int) -> torch.Tensor:
        dm = TextDataModule(include=include, seq_len=a.seq_len, max_windows=n)
        ds = dm.load_split(split)
        return torch.stack([torch.cat([ds[i]["input_ids"], ds[i]["labels"][-1:]]) for i in range(len(ds))])

    print(f"# Skip2-LoRA benchmark  torch {torch.__version__}, {a.threads} thread(s)", flush=True)
    pre = windows(["*.py"], "train", a.pretrain_windows)
    train, val = (windows(["email/**", "json/**"], "train", a.train_windows),
                  windows(["email/**", "json/**"], "val", a.val_windows))
    if a.weights and Path(a.weights).is_file():
        print(f"pre-trained weights from {a.weights}", flush=True)
        weights = torch.load(a.weights, map_location="cpu")
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
    base_val = val_loss(base, val, a.batch_size)
    print(f"fine-tuning on {len(train)} windows of email/ + json/ ({len(val)} val windows); "
          f"pre-trained model's val loss there: {base_val:.4f}", flush=True)
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
            runs[m.name].append(m)
    report(a, runs, base_val, len(train))


def report(a: argparse.Namespace, runs: dict[str, list["Method"]], base_val: float, n_train: int) -> None:
    """Markdown tables: timings pooled over every learning rate, validation loss at each method's best rate."""
    names = list(runs)
    first = {n: statistics.median(m.times[0] for m in runs[n]) for n in names}
    later = {n: statistics.median(t for m in runs[n] for t in m.times[1:]) for n in names}  # robust to noise
    best = {n: min(runs[n], key=lambda m: m.val[-1]) for n in names}
    cached, nocache, lora = names
    print(f"\nGPT n_layer={a.n_layer} n_embd={a.n_embd} seq_len={a.seq_len} batch={a.batch_size}, {n_train} training "
          f"windows, {a.epochs} epochs per run, learning rates {a.lrs}; cache {best[cached].cache.nbytes / 2**20:.0f} "
          f"MiB (float32). Times: medians over all runs; val loss: each method at its best learning rate.\n")
    print("| method | trainable params | epoch 1 (s) | epochs 2+ (s) | speed-up vs LoRA (2+) | best lr "
          f"| val loss after {a.epochs} epochs | val loss vs LoRA |")
    print("|---|---|---|---|---|---|---|---|")
    for n in names:
        m = best[n]
        print(f"| {n} | {count_parameters(m.model)} | {first[n]:.2f} | {later[n]:.3f} | {later[lora] / later[n]:.1f}x "
              f"| {m.opt.param_groups[0]['lr']:g} | {m.val[-1]:.4f} "
              f"| {100 * (m.val[-1] / best[lora].val[-1] - 1):+.2f}% |")
    print("\n| val loss by learning rate | " + " | ".join(f"{lr:g}" for lr in a.lrs) + " |")
    print("|---|" + "---|" * len(a.lrs))
    for n in (cached, lora):
        print(f"| {n} | " + " | ".join(f"{m.val[-1]:.4f}" for m in runs[n]) + " |")
    gap = max(abs(x.val[-1] - y.val[-1]) for x, y in zip(runs[cached], runs[nocache]))
    print(f"\ncache-filling overhead in epoch 1: {first[cached] / first[nocache]:.2f}x the uncached Skip2-LoRA epoch "
          f"({first[cached] - first[nocache]:+.2f} s); largest cached-vs-uncached val loss gap: {gap:.1e}; "
          f"perplexity: " + ", ".join(f"{n} {math.exp(best[n].val[-1]):.2f}" for n in names)
          + f" (pre-trained: {math.exp(base_val):.2f})")
    speed_ok = later[lora] / later[cached] >= 10
    loss_ok = best[cached].val[-1] <= 1.02 * best[lora].val[-1]
    print(f"targets: epochs 2+ >= 10x faster than LoRA: {'met' if speed_ok else 'MISSED'}; "
          f"val loss within 2% of LoRA: {'met' if loss_ok else 'MISSED'}")


if __name__ == "__main__":
    main()
