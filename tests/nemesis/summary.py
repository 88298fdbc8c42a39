"""Totals over many nemesis runs, as a plain-text table."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field

from tests.nemesis.runner import NemesisFailure, Result

KINDS = ("kill", "restart", "stop", "start-kill", "unplanned-restart", "retired", "skipped")


@dataclass
class Summary:
    """Schedules run, faults by kind, θ comparisons and failures, by mode and in total."""

    runs: Counter[str] = field(default_factory=Counter)
    passed: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    proxy_by_op: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    theta: Counter[str] = field(default_factory=Counter)
    once: Counter[str] = field(default_factory=Counter)
    max_delta: float = 0.0
    failures: list[tuple[int, str, str, str]] = field(default_factory=list)
    """(seed, mode, kind, what) of each failed run."""

    def _faults(self, r: Result) -> None:
        for k, n in r.faults.items():
            if k.startswith("proxy:"):
                _, kind, op = k.split(":", 2)
                self.faults[f"proxy-{kind}"] += n
                self.proxy_by_op[kind][op] += n
            else:
                self.faults[k] += n

    def add(self, r: Result) -> None:
        """A passing run."""
        self.runs[r.mode] += 1
        self.passed[r.mode] += 1
        self._faults(r)
        if r.theta_compared:
            self.theta[r.mode] += 1
            self.max_delta = max(self.max_delta, r.max_delta or 0.0)
        if r.exactly_once:
            self.once[r.mode] += 1

    def add_failure(self, e: NemesisFailure) -> None:
        """A failed run (its faults count too)."""
        self.runs[e.schedule.mode] += 1
        if e.result is not None:
            self._faults(e.result)
            if e.result.theta_compared:
                self.theta[e.schedule.mode] += 1
        hint = f"[{e.hints[0].split(' ')[0]}] " if e.hints else ""
        self.failures.append((e.schedule.seed, e.schedule.mode, e.kind, hint + e.what.splitlines()[0][:160]))

    def table(self) -> str:
        """The summary as text."""
        modes = sorted(self.runs)
        lines = [f"{'mode':<14} {'runs':>5} {'passed':>6} {'failed':>6} {'θ compared':>10} {'exactly-once':>12}"]
        for m in modes:
            lines.append(f"{m:<14} {self.runs[m]:>5} {self.passed[m]:>6} {self.runs[m] - self.passed[m]:>6} "
                         f"{self.theta[m]:>10} {self.once[m]:>12}")
        total = sum(self.runs.values())
        lines.append(f"{'total':<14} {total:>5} {sum(self.passed.values()):>6} {len(self.failures):>6} "
                     f"{sum(self.theta.values()):>10} {sum(self.once.values()):>12}")
        lines.append(f"max |Δθ| over passing θ comparisons: {self.max_delta:.3g}")
        lines.append("process faults: " + ", ".join(f"{k}={self.faults[k]}" for k in KINDS))
        for kind in ("duplicate", "delay", "reorder"):
            ops = self.proxy_by_op.get(kind, Counter())
            lines.append(f"proxy {kind}: {sum(ops.values())} ("
                         + ", ".join(f"{op}={n}" for op, n in sorted(ops.items())) + ")")
        if self.failures:
            by_hint = Counter(what.split("] ")[0].lstrip("[") if what.startswith("[") else "?"
                              for _, _, _, what in self.failures)
            lines.append("failures by first hint: " + ", ".join(f"{h}={n}" for h, n in by_hint.most_common()))
            lines.append("failures:")
            for seed, mode, kind, what in self.failures:
                lines.append(f"  seed {seed:>4} {mode:<14} {kind:<8} {what}")
        return "\n".join(lines)
