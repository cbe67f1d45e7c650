"""GPU readiness check: everything CUDA-specific in one call, under a wall-time limit, with one summary.

Run through ``bash benchmarks/gpu/check.sh [--dry-run] [OUT_DIR]`` (OUT_DIR defaults to ``$OUT``). Steps, each a
subprocess with its own time limit (the remaining time of the whole check caps every one, so one hang cannot eat
the rest), in priority order:

1. ``install``: every package of ``benchmarks/gpu/wheels.txt`` that this Python lacks is installed from
   ``benchmarks/gpu/wheels/`` into a scratch folder put on ``PYTHONPATH`` (nothing is downloaded);
2. ``env``: device, driver and package versions;
3. ``gpu_tests``: ``pytest -m gpu`` (every test marked ``gpu``, whoever wrote it; they skip without CUDA);
4. ``bench``: the GPU benchmark sections side by side (``benchmarks/gpu/bench.py``);
5. ``main_job``: wall time of ``python -m cli fit --config configs/sema_nested.yaml`` on the GPU;
6. ``preset:<name>``: a few training steps of every GPU preset config (``benchmarks/gpu/presets.py``), last
   because their time varies most: when the check runs out of time, only the last presets are skipped.

Writes ``summary.json``, ``summary.md`` and ``check.log`` (each step's output tail) into OUT_DIR. ``--dry-run``:
the same steps on the CPU at tiny sizes, nothing installed, CUDA-only results reported as skipped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HERE = REPO / "benchmarks" / "gpu"
sys.path.insert(0, str(HERE))

DEADLINE_S = 480.0  # the target: the whole check within 8 minutes
#: step -> its own time limit (s) on a GPU; the check's remaining time caps each
LIMITS = {"env": 45, "gpu_tests": 170, "preset": 60, "bench": 75, "main_job": 60}
DRY_LIMITS = {"env": 60, "gpu_tests": 180, "preset": 180, "bench": 120, "main_job": 120}
TAIL = 4000  # characters of each step's output kept in check.log (the gpu tests: TEST_TAIL)
TEST_TAIL = 30000
#: the main job on the CPU (benchmarks/RESULTS.md, backbone cached): the GPU figure is reported beside it
MAIN_JOB_CPU_S = 29.0


class Check:
    def __init__(self, out_dir: Path, dry_run: bool, started: float, deadline_s: float) -> None:
        self.out_dir, self.dry_run, self.started, self.deadline = out_dir, dry_run, started, started + deadline_s
        self.work = Path(tempfile.mkdtemp(prefix="adaptlab-gpu-check-"))
        self.site = self.work / "site"
        self.steps: list[dict[str, Any]] = []
        self.figures: list[dict[str, Any]] = []
        self.tests: list[dict[str, Any]] = []
        self.info: dict[str, Any] = {}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        if dry_run:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run never touches a GPU, even where one exists
        (out_dir / "check.log").write_text("")

    # ------------------------------------------------------------------------------------------------ running
    def remaining(self) -> float:
        return self.deadline - time.time()

    def run(self, name: str, cmd: list[str], limit: float, cwd: Path | None = None) -> dict[str, Any]:
        """Run one step in its own process group, killed at ``min(limit, time left)``; logs its output."""
        timeout = min(limit, self.remaining())
        step: dict[str, Any] = {"name": name, "command": " ".join(cmd), "timeout_s": round(max(timeout, 0), 1)}
        if self.remaining() < 5:
            step.update(status="skipped", reason="no time left in the check's limit", seconds=0.0)
            self.steps.append(step)
            return step
        t0 = time.time()
        log = self.work / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=cwd or REPO, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
                status = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc, status = proc.wait(), "timeout"
        step.update(status=status, rc=rc, seconds=round(time.time() - t0, 1))
        text = log.read_text(errors="replace")
        tail = text[-(TEST_TAIL if name == "gpu_tests" else TAIL):]
        step["output_tail"] = tail
        with open(self.out_dir / "check.log", "a") as f:
            f.write(f"===== {name}: {status} (rc {rc}, {step['seconds']} s of {step['timeout_s']} s)\n{tail}\n")
        print(f"[check] {name}: {status} in {step['seconds']} s", flush=True)
        self.steps.append(step)
        return step

    def limit(self, key: str) -> float:
        return (DRY_LIMITS if self.dry_run else LIMITS)[key]

    def figure(self, section: str, name: str, value: Any, unit: str, target: str, verdict: str) -> None:
        if self.dry_run and verdict in ("pass", "fail", "info"):
            verdict = "skipped (dry run)"
        self.figures.append({"section": section, "name": name, "value": value, "unit": unit, "target": target,
                             "verdict": verdict})

    # -------------------------------------------------------------------------------------------------- steps
    def install(self, listing: Path = HERE / "wheels.txt", wheels_dir: Path = HERE / "wheels") -> None:
        """Install the missing packages of ``listing`` from ``wheels_dir`` (never from a network)."""
        t0 = time.time()
        present, missing, installed, problems = {}, [], [], []
        for line in listing.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            spec = line.split()[0]
            name, version = spec.split("==")
            try:
                present[name] = importlib.metadata.version(name)
                continue
            except importlib.metadata.PackageNotFoundError:
                missing.append(spec)
            stem = re.sub(r"[-_.]+", "_", name).lower() + "-" + version + "-"
            found = sorted(wheels_dir.glob("*.whl")) if wheels_dir.is_dir() else []
            wheel = next((w for w in found if w.name.lower().startswith(stem)), None)
            if self.dry_run:
                continue
            if wheel is None:
                problems.append(f"{spec}: no wheel in {wheels_dir} (run benchmarks/gpu/fetch_wheels.sh and carry it)")
                continue
            res = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                  "--no-compile", "--no-cache-dir", "--target", str(self.site), str(wheel)],
                                 capture_output=True, text=True, timeout=max(5.0, min(120.0, self.remaining())))
            (installed if res.returncode == 0 else problems).append(
                spec if res.returncode == 0 else f"{spec}: pip failed: {res.stderr.strip()[-500:]}")
        if installed:
            self.env["PYTHONPATH"] = os.pathsep.join([str(self.site), self.env["PYTHONPATH"]])
        status = "failed" if problems else "ok"
        step = {"name": "install", "status": status, "seconds": round(time.time() - t0, 1), "present": present,
                "missing": missing, "installed": installed, "problems": problems,
                "note": "dry run: nothing installed" if self.dry_run else ""}
        self.steps.append(step)
        self.info["install"] = {k: step[k] for k in ("present", "missing", "installed", "problems")}
        print(f"[check] install: {status}; missing {missing}; installed {installed}; problems {problems}", flush=True)

    def environment(self) -> None:
        out = self.work / "env.json"
        code = (
            "import json, platform, sys, importlib.metadata as md, torch\n"
            "v = {}\n"
            "for n in ('torch', 'triton', 'lightning', 'timm', 'torchmetrics', 'tensorboard', 'jsonargparse',\n"
            "          'bitsandbytes', 'fla-core', 'av', 'numpy'):\n"
            "    try: v[n] = md.version(n)\n"
            "    except md.PackageNotFoundError: v[n] = None\n"
            "d = {'python': sys.version.split()[0], 'platform': platform.platform(), 'versions': v,\n"
            "     'cuda_available': torch.cuda.is_available(), 'torch_cuda': torch.version.cuda}\n"
            "if torch.cuda.is_available():\n"
            "    p = torch.cuda.get_device_properties(0)\n"
            "    d.update(device=p.name, capability=f'{p.major}.{p.minor}', memory_gib=p.total_memory / 2**30,\n"
            "             multiprocessors=p.multi_processor_count, bf16=torch.cuda.is_bf16_supported())\n"
            "else:\n"
            "    from models.utils.memory import cpu_model\n"
            "    d['device'] = 'cpu: ' + cpu_model()\n"
            f"open({str(out)!r}, 'w').write(json.dumps(d))\n"
        )
        self.run("env", [sys.executable, "-c", code], self.limit("env"))
        if out.is_file():
            self.info["environment"] = json.loads(out.read_text())
        try:
            query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
            smi = subprocess.run(query, capture_output=True, text=True, timeout=20)
            self.info.setdefault("environment", {})["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            self.info.setdefault("environment", {})["nvidia_smi"] = f"unavailable ({type(e).__name__})"

    def gpu_tests(self) -> None:
        xml = self.work / "gpu_tests.xml"
        # every test module that uses the marker (collecting only those keeps the step short); -m gpu selects
        files = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                       if "mark.gpu" in p.read_text(errors="replace"))
        per_test = ["--timeout", "150"] if importlib.util.find_spec("pytest_timeout") else []
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", *per_test,
               f"--junitxml={xml}", *(files or ["tests"])]
        step = self.run("gpu_tests", cmd, self.limit("gpu_tests"))
        if xml.is_file():
            for case in ET.parse(xml).getroot().iter("testcase"):
                outcome, message = "passed", ""
                for tag in ("failure", "error", "skipped"):
                    node = case.find(tag)
                    if node is not None:
                        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                        message = (node.get("message") or "")[:300]
                        break
                self.tests.append({"id": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                                   "seconds": float(case.get("time") or 0), "message": message})
        counts = {o: sum(t["outcome"] == o for t in self.tests) for o in ("passed", "failed", "error", "skipped")}
        self.info["gpu_tests"] = counts
        ok = step.get("status") == "ok" and counts["passed"] > 0 and not counts["failed"] and not counts["error"]
        verdict = "skipped (dry run)" if self.dry_run else ("pass" if ok else "fail")
        self.figure("gpu tests", "tests marked gpu: passed / failed+errors / skipped",
                    f"{counts['passed']} / {counts['failed'] + counts['error']} / {counts['skipped']}", "",
                    "all pass, none fails", verdict)

    def presets(self) -> None:
        if self.remaining() < 5:  # (nothing to run: skip loading torch and Lightning for the preset table)
            self.steps.append({"name": "presets", "status": "skipped", "reason": "no time left in the check's limit",
                               "seconds": 0.0})
            return
        from presets import PRESETS  # torch and Lightning load here, not before the arguments are checked

        folder = self.work / "presets"
        folder.mkdir()
        script = str(HERE / "presets.py")
        if self.dry_run:  # one process for all (tiny sizes, the imports once)
            self.run("presets (all, dry run)", [sys.executable, script, "--all", "--dry-run", "--json",
                                                str(folder / "all.json")], self.limit("preset"))
        else:
            for name in PRESETS:
                self.run(f"preset:{name}", [sys.executable, script, name, "--json", str(folder / f"{name}.json")],
                         self.limit("preset"))
        results = {}
        for path in sorted(folder.glob("*.json")):
            for r in json.loads(path.read_text()):
                results[r["preset"]] = r
        for name in PRESETS:
            self._preset_figures(name, results.get(name))

    def _preset_figures(self, name: str, r: dict[str, Any] | None) -> None:
        section = f"preset {name}"
        if r is None or not r.get("ok"):
            why = "did not finish (timeout or crash: see check.log)" if r is None else r.get("error", "")[:300]
            self.figure(section, "training steps", None, "", "a few steps run", f"fail: {why}")
            return
        ran = r["steps"] >= 1
        note = "; ".join(x for x in (r.get("shrunk"), r.get("note"), r.get("precision")) if x)
        self.figure(section, "steps per second", r["steps_per_s"], "steps/s",
                    f"reported: median of {r['timed_steps']} steps after warm-up ({note})", "info" if ran else "fail")
        if "peak_reserved_gib" not in r:
            self.figure(section, "peak GPU memory", None, "GiB", "measured on CUDA only", "skipped (no CUDA)")
            return
        budget = r.get("budget_gib")
        limit = budget if budget is not None else r["device_total_gib"]
        what = f"<= the preset's budget {budget:g} GiB" if budget is not None else \
            f"fits the card ({r['device_total_gib']:.0f} GiB; no budget stated by the preset)"
        self.figure(section, "peak GPU memory (reserved by the allocator)", r["peak_reserved_gib"], "GiB", what,
                    "pass" if r["peak_reserved_gib"] <= limit else "fail")
        if "estimate_gib" in r:
            ratio = r["peak_allocated_gib"] / r["estimate_gib"]
            self.figure(section, "peak allocated / memory model estimate", ratio, "x",
                        f"<= 1.10 (estimate {r['estimate_gib']:.2f} GiB, allocated {r['peak_allocated_gib']:.2f} GiB)",
                        "pass" if ratio <= 1.10 else "fail")

    def bench(self) -> None:
        out = self.work / "bench.json"
        cmd = [sys.executable, str(HERE / "bench.py"), "--json", str(out)] + (["--dry-run"] if self.dry_run else [])
        self.run("bench", cmd, self.limit("bench"))
        results = json.loads(out.read_text()) if out.is_file() else {}
        for section in ("mixer", "phase2", "qlora"):
            r = results.get(section)
            if r is None or r.get("error"):
                why = "did not run (timeout: see check.log)" if r is None else r["error"][:300]
                self.figure(f"bench {section}", "section", None, "", "runs", f"fail: {why}")
            for f in (r or {}).get("figures", []):
                self.figure(f"bench {section}", f["name"], f["value"], f["unit"], f["target"], f["verdict"])

    def main_job(self) -> None:
        cwd = self.work / "main_job"
        cwd.mkdir()
        cache = (cwd / "glyph_vit") if self.dry_run else (REPO / "data" / "glyph_vit")
        cmd = [sys.executable, "-m", "cli", "fit", "--config", str(REPO / "configs" / "sema_nested.yaml"),
               "--model.pretrain.cache_dir", str(cache)]
        if self.dry_run:  # the suite's tiny continual sizes
            cmd += ["--trainer.accelerator", "cpu", "--data.image_size", "16", "--data.epochs_per_task", "1",
                    "--data.glyph_classes", "4", "--data.glyph_images_per_class", "8", "--data.init_cls", "2",
                    "--data.increment", "2", "--model.num_classes", "4", "--model.img_size", "16",
                    "--model.backbone_kwargs", "{depth: 1, embed_dim: 32, num_heads: 2, global_pool: avg}",
                    "--model.pretrain.classes", "4", "--model.pretrain.images_per_class", "4",
                    "--model.pretrain.steps", "2", "--model.pretrain.batch_size", "8",
                    "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
                    "--trainer.enable_progress_bar", "false"]
        else:
            cmd += ["--trainer.accelerator", "gpu", "--trainer.devices", "1"]
        step = self.run("main_job", cmd, self.limit("main_job"), cwd=cwd)
        log = self.work / "main_job.log"
        built = log.is_file() and "[glyph backbone] building" in log.read_text(errors="replace")
        results = list(cwd.glob("runs/**/results.json"))
        done = step.get("status") == "ok" and bool(results)
        self.figure("main job", "sema_nested.yaml fit, wall time", step.get("seconds"), "s",
                    f"reported (CPU: {MAIN_JOB_CPU_S:g} s with the backbone cached); glyph backbone "
                    f"{'built in this run' if built else 'from the cache'}", "info" if done else
                    f"fail: {step.get('status')}")
        if results:
            metrics = json.loads(results[0].read_text())
            keep = {k: metrics[k] for k in ("avg_incremental_acc", "last_acc", "forgetting") if k in metrics}
            self.info["main_job_results"] = keep or {k: metrics[k] for k in list(metrics)[:6]}

    # ------------------------------------------------------------------------------------------------ summary
    def write(self) -> dict[str, Any]:
        wall = time.time() - self.started
        self.figure("check", "whole check wall time", round(wall, 1), "s", f"<= {DEADLINE_S:g}",
                    "pass" if wall <= DEADLINE_S else "fail")
        bad = [f for f in self.figures if f["verdict"].startswith("fail")]
        bad_steps = [s["name"] for s in self.steps if s["status"] != "ok"]
        verdict = "pass" if not bad and not bad_steps else "fail"
        if self.dry_run:
            verdict = "dry run (CUDA results skipped)" if not bad_steps else "dry run failed"
        summary = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "dry_run": self.dry_run,
                   "verdict": verdict, "wall_s": round(wall, 1), "deadline_s": DEADLINE_S, **self.info,
                   "steps": [{k: v for k, v in s.items() if k != "output_tail"} for s in self.steps],
                   "tests": self.tests, "figures": self.figures}
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        (self.out_dir / "summary.md").write_text(markdown(summary))
        return summary


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.0f}"
    return "-" if value is None else str(value)


def markdown(s: dict[str, Any]) -> str:
    env = s.get("environment", {})
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
    lines = [f"# GPU check {s['date']}{' (dry run)' if s['dry_run'] else ''}: {s['verdict']}", "",
             f"- device: {env.get('device', '?')} (capability {env.get('capability', '-')}, "
             f"{_fmt(env.get('memory_gib'))} GiB); nvidia-smi: {env.get('nvidia_smi', '-')}",
             f"- python {env.get('python', '?')}, CUDA {env.get('torch_cuda', '-')}; {versions}",
             f"- installed from the wheel folder: {s.get('install', {}).get('installed') or 'nothing'}; "
             f"missing: {s.get('install', {}).get('missing') or 'nothing'}; "
             f"problems: {s.get('install', {}).get('problems') or 'none'}",
             f"- wall time {s['wall_s']} s of {s['deadline_s']:g} s", "",
             "| step | status | seconds | limit (s) |", "|---|---|---|---|"]
    for st in s["steps"]:
        lines.append(f"| {st['name']} | {st['status']}{' (' + st['reason'] + ')' if st.get('reason') else ''} "
                     f"| {st.get('seconds', '-')} | {st.get('timeout_s', '-')} |")
    lines += ["", "| section | figure | value | unit | target | verdict |", "|---|---|---|---|---|---|"]
    for f in s["figures"]:
        lines.append(f"| {f['section']} | {f['name']} | {_fmt(f['value'])} | {f['unit']} | {f['target']} "
                     f"| {f['verdict']} |")
    odd = [t for t in s["tests"] if t["outcome"] != "passed"]
    lines += ["", f"Tests marked gpu: {s.get('gpu_tests', {})}" + (" (not passed:)" if odd else ""), ""]
    lines += [f"- {t['id']}: {t['outcome']} {t['message']}" for t in odd[:60]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", nargs="?", default=None, help="where the summary goes (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, nothing installed")
    parser.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for the whole check")
    parser.add_argument("--started", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = args.out_dir or os.environ.get("OUT")
    if not out:
        print("error: no output folder: give OUT_DIR or set $OUT", file=sys.stderr)
        return 2
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    check = Check(out_dir, args.dry_run, args.started or time.time(), args.deadline)
    check.install()
    check.environment()
    check.gpu_tests()
    check.bench()  # bounded sections first; the presets (the least predictable) last, so the deadline cuts only them
    check.main_job()
    check.presets()
    summary = check.write()
    print((out_dir / "summary.md").read_text(), flush=True)
    return 1 if "fail" in summary["verdict"] else 0


if __name__ == "__main__":
    sys.exit(main())
