"""One run of each contender: zmqps (a server + K workers), DDP/gloo (K workers), compute only.

Each returns ``{"step_ms": ..., "run_s": ...}``: the median step time (steps after the
warm-up, averaged over ranks) and the whole run, from spawning the workers until every
process of the run (the zmqps server included, which writes ``final.safetensors``) exited.
A zmqps server is started and reports its endpoint before the clock starts, as a deployed
parameter server would already be running.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness import Group, child_env, step_stats, tmpdir, wait_file
from common.procfs import status_bytes


@dataclass
class Job:
    """The training job every contender runs."""

    model: str = "benchmarks.jobs:mlp19m"
    data: str = "benchmarks.jobs:data19m"
    workers: int = 2
    batch: int = 32  # per worker
    steps: int = 40
    lr: float = 0.01
    threads: int = 1
    device: str = "cpu"
    warmup: int = 5
    timeout: float = 600.0
    server_args: list[str] = field(default_factory=list)
    worker_args: list[str] = field(default_factory=list)
    servers: int = 1  # server shards
    env: dict[str, str] = field(default_factory=dict)
    measure_rss: bool = False

    @property
    def rows(self) -> int:
        return self.batch * self.workers * self.steps

    def env_for(self, role: str) -> dict[str, str]:
        return child_env(self.threads, {"ZMQPS_BENCH_ROWS": str(self.rows), **self.env})


def _collect(outs: list[Path], warmup: int) -> float:
    return statistics.mean(step_stats(json.loads(p.read_text())["times"], warmup) for p in outs)


def run_peer(job: Job, kind: str) -> dict[str, float]:
    """``kind`` = ``ddp`` or ``compute``."""
    with tmpdir(kind) as tmp:
        d = Path(tmp)
        g = Group(d)
        outs = [d / f"out{k}.json" for k in range(job.workers)]
        t0 = time.perf_counter()
        for k in range(job.workers):
            g.spawn(f"{kind}{k}", [sys.executable, "-m", "benchmarks.peers", kind, "--rank", str(k),
                                   "--world", str(job.workers), "--init", f"file://{d}/rdzv",
                                   "--model", job.model, "--data", job.data, "--loss", "cross_entropy",
                                   "--batch-size", str(job.batch * job.workers), "--lr", str(job.lr),
                                   "--device", job.device, "--out", str(outs[k])], job.env_for("worker"))
        g.wait(job.timeout)
        run_s = time.perf_counter() - t0
        return {"step_ms": 1000 * _collect(outs, job.warmup), "run_s": run_s}


def run_zmqps(job: Job) -> dict[str, float]:
    """A server (or ``job.servers`` shards) and K workers."""
    with tmpdir("zmqps") as tmp:
        d = Path(tmp)
        g = Group(d)
        endpoints = []
        for s in range(job.servers):
            ready = d / f"ready{s}"
            g.spawn(f"server{s}", [sys.executable, "-m", "ps", "--bind", "tcp://127.0.0.1:0",
                                   "--workers", str(job.workers), "--ready-file", str(ready),
                                   "--checkpoint-dir", str(d / f"ckpt{s}"), "--lr", str(job.lr),
                                   "--log-level", "warning", *job.server_args], job.env_for("server"))
            endpoints.append(wait_file(ready, g))
        idle_rss = status_bytes("VmRSS", g.procs[0][1].pid) or 0
        outs = [d / f"out{k}.json" for k in range(job.workers)]
        t0 = time.perf_counter()
        for k in range(job.workers):
            g.spawn(f"worker{k}", [sys.executable, "-m", "benchmarks.zworker", "--bench-out", str(outs[k]),
                                   "--server", ",".join(endpoints), "--rank", str(k),
                                   "--world-size", str(job.workers), "--model", job.model, "--data", job.data,
                                   "--loss", "cross_entropy", "--batch-size", str(job.batch * job.workers),
                                   "--epochs", "1", "--device", job.device, "--progress", "off",
                                   "--log-level", "warning", "--timeout", "300", *job.worker_args],
                    job.env_for("worker"))
        g.wait(job.timeout)
        run_s = time.perf_counter() - t0
        out = {"step_ms": 1000 * _collect(outs, job.warmup), "run_s": run_s}
        # the server's CPU per step: its CPU seconds per second of wall time while the steps after
        # the warm-up ran (from /proc samples), times the mean step time
        times = json.loads(outs[0].read_text())["times"]
        lo, hi = times[min(job.warmup, len(times) - 1)], times[-1]
        inside = [(t, c) for t, c in g.cpu_series if lo <= t <= hi]
        if len(inside) >= 2 and len(times) - 1 > job.warmup:
            busy = (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])
            out["server_cpu_ms_per_step"] = 1000 * busy * (hi - lo) / (len(times) - 1 - job.warmup)
        if job.measure_rss:
            out["server_peak_rss"] = float(g.peak_rss.get("server0", 0))
            out["server_idle_rss"] = float(idle_rss)
            # steady state: samples taken while the steps ran (perf_counter is one clock for all
            # processes of a Linux host), from the end of the warm-up to the last step
            times = json.loads(outs[0].read_text())["times"]
            lo, hi = times[min(job.warmup, len(times) - 1)], times[-1]
            inside = [r for t, r in g.rss_series if lo <= t <= hi]
            out["server_median_rss"] = float(statistics.median(inside)) if inside else 0.0
        return out
