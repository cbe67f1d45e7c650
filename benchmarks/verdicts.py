"""Targets that can fail: every benchmark section records (target, measured value, verdict) here; the script prints
the table at the end and, with ``--check``, exits non-zero when a measured target is missed. A target that needs
hardware this run does not have (a GPU) is recorded with ``ok=None`` and printed as "not measured"."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Verdicts:
    rows: list[tuple[str, str, str, bool | None]] = field(default_factory=list)

    def add(self, section: str, target: str, measured: str, ok: bool | None) -> None:
        self.rows.append((section, target, measured, ok))
        print(f"[{section}] target: {target} | measured: {measured} | {self.word(ok)}", flush=True)

    @staticmethod
    def word(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "MISSED")

    def table(self) -> str:
        lines = ["| section | target | measured | verdict |", "|---|---|---|---|"]
        lines += [f"| {s} | {t} | {m} | {self.word(ok)} |" for s, t, m, ok in self.rows]
        return "\n".join(lines)

    def exit_code(self, check: bool) -> int:
        """1 when ``check`` and a measured target was missed, else 0."""
        return int(check and any(ok is False for *_, ok in self.rows))
