"""Shared machinery: child processes, alternating repetitions, ratios, the machine's description.

[Note: fairness] Every contender runs in the same invocation, in alternation (A B A B ...,
starting with a different one each repetition), with the same thread settings, and each
repetition yields one ratio; the reported number is the median of those ratios. A machine
shared with other work slows both sides of a pair alike, so the ratio is far steadier than
either time.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from common.procfs import status_bytes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "runs" / "bench"


def child_env(threads: int | None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a benchmark child: the repo importable, no PS_* leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PS_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env.update(extra or {})
    return env


class Group:
    """Child processes started together and always stopped together."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []
        self.peak_rss: dict[str, int] = {}
        self.rss_series: list[tuple[float, int]] = []  # (perf_counter, resident bytes) of the first child
        self.cpu_series: list[tuple[float, float]] = []  # (perf_counter, CPU seconds used) of the first child

    def spawn(self, name: str, argv: Sequence[str], env: dict[str, str]) -> subprocess.Popen:
        log = self.logdir / f"{len(self.procs):02d}-{name}.log"
        fh = open(log, "wb")
        p = subprocess.Popen(list(argv), stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                             start_new_session=True)
        fh.close()
        self.procs.append((name, p, log))
        return p

    def wait(self, timeout: float) -> None:
        """Every child exits 0 within ``timeout``; otherwise stop them all and raise with logs.

        Records each child's peak RSS (bytes) in :attr:`peak_rss`: the last ``VmHWM`` sampled
        (every 20 ms) before it exited. Not ``ru_maxrss``: Linux carries a process's peak over
        ``exec``, so a child's starts at its parent's, this benchmark process's, size.
        """
        deadline = time.monotonic() + timeout
        try:
            for name, p, log in self.procs:
                while p.returncode is None:
                    for other, q, _ in self.procs:
                        if q.returncode is None:
                            hwm = status_bytes("VmHWM", q.pid)
                            if hwm:
                                self.peak_rss[other] = max(hwm, self.peak_rss.get(other, 0))
                    pid, status = os.waitpid(p.pid, os.WNOHANG)
                    if pid:
                        p.returncode = os.waitstatus_to_exitcode(status)
                        break
                    rss = status_bytes("VmRSS", self.procs[0][1].pid)
                    if rss:
                        self.rss_series.append((time.perf_counter(), rss))
                    cpu = _cpu_seconds(self.procs[0][1].pid)
                    if cpu is not None:
                        self.cpu_series.append((time.perf_counter(), cpu))
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{name} still running after {timeout:.0f}s:\n{log.read_text()[-3000:]}")
                    time.sleep(0.02)
                if p.returncode != 0:
                    raise RuntimeError(f"{name} exited {p.returncode}:\n{log.read_text()[-3000:]}")
        finally:
            self.stop()

    def stop(self) -> None:
        for _name, p, _log in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a running process has used (None where /proc is missing)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def wait_file(path: Path, group: Group, timeout: float = 120.0) -> str:
    """The stripped contents of ``path`` once a child has written it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        for name, p, log in group.procs:
            if p.poll() not in (None, 0):
                raise RuntimeError(f"{name} exited {p.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    group.stop()
    raise RuntimeError(f"{path} was not written within {timeout:.0f}s")


@dataclass
class Pairing:
    """Alternating repetitions of named contenders, each returning a dict of metrics."""

    contenders: dict[str, Callable[[], dict[str, float]]]
    reps: int
    results: dict[str, list[dict[str, float]]] = field(default_factory=dict)

    def run(self, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> None:
        names = list(self.contenders)
        for rep in range(self.reps):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                m = self.contenders[name]()
                self.results.setdefault(name, []).append(m)
                log(f"rep {rep + 1}/{self.reps} {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in m.items()))

    def ratio(self, num: str, den: str, metric: str) -> float:
        """Median over repetitions of ``num[metric] / den[metric]``."""
        pairs = zip(self.results[num], self.results[den])
        return statistics.median(a[metric] / b[metric] for a, b in pairs)

    def median(self, name: str, metric: str) -> float:
        return statistics.median(m[metric] for m in self.results[name])


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": str(os.cpu_count())}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["load"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        pass
    import torch
    import zmq

    info.update(torch=torch.__version__, pyzmq=zmq.__version__, libzmq=zmq.zmq_version())
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def save(name: str, payload: dict) -> Path:
    """Write ``runs/bench/NAME-<time>.json`` and return its path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def tmpdir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=f"zmqps-bench-{prefix}-")


def step_stats(times: Sequence[float], warmup: int) -> float:
    """Median step time (s) from per-step end timestamps, skipping ``warmup`` steps."""
    d = [b - a for a, b in zip(times[:-1], times[1:])][warmup:]
    return statistics.median(d) if d else float("nan")
