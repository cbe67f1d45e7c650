"""Resident memory of token shards vs the in-memory text data, as the corpus grows.

For each corpus size (UTF-8 text built from the standard library's sources, in 4 MiB files, byte tokens),
separate processes measure their peak resident set (``ru_maxrss``): importing the project only (the
baseline), ``prepare_shards`` (tokenize into uint16 shards), one full training epoch read through
``TokenShardDataModule`` (``seq_len`` 1024, batches of 32), and ``TextDataModule`` loading the same training
split into memory. A memory budget is chosen (``--budget_mib``, default 64 MiB above the baseline) and the
largest corpus is several times that budget: the shard path must stay inside it at every size, the in-memory
path grows with the corpus. This machine has 24 GiB and is shared, so the corpus cannot exceed free RAM within
the time; flatness of the peak against corpus size is what is shown (the reading code does not depend on
the corpus size: one window per ``pread``).

    python benchmarks/token_shards.py                       # 64, 128, 256, 512 MiB; in-memory up to 256 MiB
    python benchmarks/token_shards.py --sizes 2048 --cap_mib 1024   # a corpus 2x the memory a process may use
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FILE_MIB = 4


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB
    return float("nan")


def reset_peak() -> float:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (``/proc/self/clear_refs``); returns the RSS."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def make_corpus(folder: Path, total_mib: int, seed: int = 0) -> list[Path]:
    """``total_mib`` MiB of Python source text in ``FILE_MIB`` MiB files (stdlib files in random order)."""
    from datamodules.text import list_stdlib_files, stdlib_root  # noqa: F401

    root, rels = list_stdlib_files(["**/*.py"], ["site-packages/**", "test/**", "**/test/**", "**/tests/**"])
    texts = []
    for r in rels:
        try:
            t = (root / r).read_bytes()
            t.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if b"\x00" not in t:
            texts.append(t)
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(total_mib // FILE_MIB):
        chunk, size = [], 0
        while size < FILE_MIB * 2**20:
            t = rng.choice(texts)
            chunk.append(t)
            size += len(t)
        path = folder / f"part_{k:04d}.py"
        path.write_bytes(b"".join(chunk)[: FILE_MIB * 2**20].decode("utf-8", "ignore").encode())
        files.append(path)
    return files


def _data(files: list[str]):
    from datamodules.text import TextDataModule

    return TextDataModule(source="files", paths=files, val_fraction=0.05, test_fraction=0.0, seq_len=1024,
                          batch_size=32)


def child(mode: str, files: list[str], out: str) -> dict:
    import torch  # noqa: F401  (the baseline includes torch and Lightning)

    from datamodules.token_shards import TokenShardDataModule, prepare_shards

    start_rss = reset_peak()
    t0 = time.perf_counter()
    result: dict = {}
    if mode == "prepare":
        prepare_shards(_data(files), out, shard_tokens=2**25, progress=False)
    elif mode == "iterate":
        dm = TokenShardDataModule(out, seq_len=1024, batch_size=32)
        loader = dm.train_dataloader()
        tokens = 0
        for batch in loader:
            tokens += batch["input_ids"].numel()
        result["tokens"] = tokens
    elif mode == "in_memory":
        result["tokens"] = len(_data(files).load_split("train").tokens)
    result.update(seconds=time.perf_counter() - t0, start_mib=start_rss, peak_mib=_status("VmHWM") - start_rss)
    return result


CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def memory_cgroup(limit_mib: int) -> Path:
    """A cgroup-v1 memory group that caps what its processes may use at ``limit_mib`` (resident memory plus the
    page cache they fill, which the kernel reclaims under the cap); Linux, as root."""
    group = CGROUP_V1 / f"adaptlab_token_shards_{os.getpid()}"
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(limit_mib * 2**20))
    return group


def run_child(mode: str, files: list[Path], out: Path, cgroup: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    join = None if cgroup is None else (lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid())))
    res = subprocess.run([sys.executable, __file__, "--child", mode, "--out", str(out), "--files",
                          *map(str, files)], env=env, capture_output=True, text=True, cwd=REPO, preexec_fn=join)
    if res.returncode:
        raise RuntimeError(f"{mode} failed (exit {res.returncode}):\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def capped_run(size_mib: int, limit_mib: int, work: Path) -> None:
    """Prepare and read one epoch of a ``size_mib`` corpus with every process capped at ``limit_mib`` (a corpus
    larger than the memory the process may use); the in-memory path is tried under the same cap."""
    files = make_corpus(work / "corpus", size_mib)
    group = memory_cgroup(limit_mib)
    try:
        out = work / "shards"
        prep = run_child("prepare", files, out, group)
        it = run_child("iterate", files, out, group)
        print(f"# corpus {size_mib} MiB, every process capped at {limit_mib} MiB (cgroup v1 memory.limit_in_bytes), "
              f"{cpu_model()}, {time.strftime('%Y-%m-%d')}")
        print(f"prepare: {prep['seconds']:.1f} s, peak RSS {prep['start_mib'] + prep['peak_mib']:.0f} MiB "
              f"({prep['peak_mib']:.0f} above the {prep['start_mib']:.0f} MiB after imports)")
        print(f"epoch:   {it['seconds']:.1f} s, {it['tokens']:,} tokens, peak RSS "
              f"{it['start_mib'] + it['peak_mib']:.0f} MiB ({it['peak_mib']:.0f} above)")
        try:
            mem = run_child("in_memory", files, out, group)
            print(f"in-memory TextDataModule: finished, peak RSS {mem['start_mib'] + mem['peak_mib']:.0f} MiB")
        except RuntimeError as e:
            print(f"in-memory TextDataModule: failed under the cap ({str(e).splitlines()[0]})")
    finally:
        for pid in (group / "cgroup.procs").read_text().split():
            (CGROUP_V1 / "cgroup.procs").write_text(pid)
        group.rmdir()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512], help="corpus sizes in MiB")
    p.add_argument("--in_memory_max", type=int, default=256, help="largest size also loaded in memory (MiB)")
    p.add_argument("--budget_mib", type=float, default=64.0, help="memory budget above the baseline (MiB)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--child", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--files", nargs="*", default=[])
    p.add_argument("--cap_mib", type=int, default=None,
                   help="instead: one corpus of --sizes[0] MiB with every process capped at this many MiB (cgroup v1)")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.files, a.out)))
        return
    sys.path.insert(0, str(REPO))
    work = Path(a.workdir or tempfile.mkdtemp(prefix="token_shards_bench_"))
    try:
        if a.cap_mib is not None:
            capped_run(a.sizes[0], a.cap_mib, work)
            return
        files = make_corpus(work / "corpus", max(a.sizes))
        base = run_child("baseline", files[:1], work / "none")["start_mib"]
        rows = []
        for size in sorted(a.sizes):
            sel = files[: size // FILE_MIB]
            out = work / f"shards_{size}"
            prep = run_child("prepare", sel, out)
            it = run_child("iterate", sel, out)
            mem = run_child("in_memory", sel, out) if size <= a.in_memory_max else None
            rows.append((size, prep, it, mem))
            shutil.rmtree(out)
        import lightning
        import numpy
        import torch

        print(f"# token shards: peak RSS during the work above the RSS before it (after imports: {base:.0f} MiB), "
              f"byte tokens, seq_len 1024\n"
              f"# {cpu_model()}, {os.cpu_count()} cores, Python "
              f"{platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}, "
              f"numpy {numpy.__version__}, {time.strftime('%Y-%m-%d')}; budget {a.budget_mib:.0f} MiB\n")
        print("| corpus MiB | corpus / budget | prepare s | prepare RSS MiB | epoch s | epoch tokens/s | "
              "epoch RSS MiB | in-memory RSS MiB |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for size, prep, it, mem in rows:
            mem_s = f"{mem['peak_mib']:.0f}" if mem else "not run"
            print(f"| {size} | {size / a.budget_mib:.1f}x | {prep['seconds']:.1f} | {prep['peak_mib']:.0f} | "
                  f"{it['seconds']:.1f} | {it['tokens'] / it['seconds']:,.0f} | {it['peak_mib']:.0f} | "
                  f"{mem_s} |")
        worst = max(max(prep["peak_mib"], it["peak_mib"]) for _, prep, it, _ in rows)
        small, large = rows[0], rows[-1]
        growth = (max(large[1]["peak_mib"], large[2]["peak_mib"]) - max(small[1]["peak_mib"], small[2]["peak_mib"]))
        print(f"\nshards: worst peak {worst:.0f} MiB above baseline ({'within' if worst <= a.budget_mib else 'OVER'} "
              f"the {a.budget_mib:.0f} MiB budget); growth from {small[0]} to {large[0]} MiB of corpus: "
              f"{growth:+.0f} MiB")
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
