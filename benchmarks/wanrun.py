"""One run of the wan benchmark inside a lab: DDP/gloo over the lab's links, or a zmqps mode.

Both start their processes in the lab's host namespaces (``ip netns exec NS python -m ...``):
DDP's K ranks on hosts ``w0..`` (a file store for the rendezvous, gloo on each host's
``eth0``); zmqps's ``ps-server`` on host ``server`` (a mode of S shards: one on each of
``server``, ``server1``, ...) and K ``ps-worker`` s on ``w0..``, started as a user starts them.
The clock starts when the first process is spawned (DDP's first rank, zmqps's first server)
and stops when every process of the run has exited. Bytes on the wire are each host's ``eth0``
counters, after minus before. Time per step: wall time over steps (start-up included), and for
zmqps the median interval between consecutive ``update`` records of the servers'
``--metrics-log`` s (:func:`update_interval`, start-up excluded).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import Group, child_env, wait_file
from benchmarks.heldout import read_evals
from benchmarks.netlab import Lab
from benchmarks.wanmodes import Mode, server_hosts
from common.config import ServerConfig, WorkerConfig, parse_config

log = logging.getLogger(__name__)

_SKIP = {"model", "data", "epochs", "batch_size", "loss", "seed"}  # the job's own fields


@dataclass(frozen=True)
class Job:
    """The training job every run of the benchmark trains."""

    model: str
    data: str
    test_data: str
    loss: str = "cross_entropy"
    batch: int = 64  # global
    epochs: int = 1
    seed: int = 0
    server_args: tuple[str, ...] = ()  # the optimizer: ps-server's options, also DDP's
    worker_args: tuple[str, ...] = ()
    eval_every: int = 0
    timeout: float = 1800.0
    python: str = sys.executable

    @classmethod
    def from_example(cls, name: str, **over: Any) -> "Job":
        """The job of ``worker.examples.NAME``: its factories and ``PRESETS`` (``over`` wins)."""
        import importlib

        mod = importlib.import_module(f"worker.examples.{name}")
        pre = dict(mod.PRESETS)
        server = {f.name for f in dataclasses.fields(ServerConfig)}
        worker = {f.name for f in dataclasses.fields(WorkerConfig)}
        sargs: list[str] = []
        wargs: list[str] = []
        for key, value in pre.items():
            if key in _SKIP or key in ("workers",):
                continue
            flag = [f"--{key.replace('_', '-')}", str(value)]
            if key in server:
                sargs += flag
            elif key in worker:
                wargs += flag
        job = cls(model=pre.get("model", f"worker.examples.{name}:model"),
                  data=pre.get("data", f"worker.examples.{name}:train_data"),
                  test_data=f"worker.examples.{name}:test_data", loss=pre.get("loss", "cross_entropy"),
                  batch=int(pre.get("batch_size", 64)), epochs=int(pre.get("epochs", 1)), seed=int(pre.get("seed", 0)),
                  server_args=tuple(sargs), worker_args=tuple(wargs))
        return dataclasses.replace(job, **{k: v for k, v in over.items() if v is not None})


@dataclass
class RunResult:
    """What one run measured."""

    label: str
    ok: bool = True
    error: str = ""
    wall_s: float = float("nan")
    family: str = ""  # the mode's label without "/N shards" (zmqps), "" for DDP
    shards: int = 0  # server shards (zmqps), 0 for DDP
    update_s: float | None = None  # median seconds between the servers' update records (zmqps)
    evals: list[dict[str, float]] = field(default_factory=list)  # {"t": s since start, "train_t", "step", "loss"}
    cpu_s: float = float("nan")  # CPU seconds of every process of the run, all hosts together
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # host -> {"tx", "rx"}

    @property
    def final_loss(self) -> float | None:
        return self.evals[-1]["loss"] if self.evals else None

    @property
    def wire_bytes(self) -> int:
        """Bytes sent by every host (each byte on the wire once)."""
        return sum(c["tx"] for c in self.bytes.values())


def update_interval(paths: list[Path]) -> float | None:
    """Median seconds between consecutive ``update`` records of each metrics log, pooled over the logs.

    Under bsp a server updates once per step, so this is the time per step without the start-up
    (under diloco: per round of local steps). None if no log has two updates.
    """
    gaps: list[float] = []
    for path in paths:
        if not path.exists():
            continue
        times = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed server
            if rec.get("ev") == "update":
                times.append(float(rec["t"]))
        gaps += [b - a for a, b in zip(times, times[1:])]
    return statistics.median(gaps) if gaps else None


def _delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {h: {d: after[h][d] - before[h][d] for d in ("tx", "rx")} for h in after}


def _curve(path: Path, t0: float) -> list[dict[str, float]]:
    """Rank 0's eval records as ``t`` (seconds since ``t0``) and ``train_t`` ([Note: training clock])."""
    out, spent = [], 0.0
    for r in read_evals(path):
        if r.get("rank", 0) != 0:
            continue
        out.append({"t": r["t"] - t0, "train_t": r["t"] - t0 - spent, "step": r["step"], "loss": r["heldout_loss"]})
        spent += float(r.get("seconds") or 0.0)
    return out


def children_cpu() -> float:
    """CPU seconds (user + system) of every descendant process this one has reaped so far."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _finish(res: RunResult, group: Group, lab: Lab, before: dict, t0: float, evlog: Path, timeout: float,
            cpu0: float) -> RunResult:
    try:
        group.wait(timeout)
        res.wall_s = time.time() - t0
    except RuntimeError as e:
        res.ok, res.error = False, str(e)
        log.error("%s failed: %s", res.label, str(e).splitlines()[0])
    res.cpu_s = children_cpu() - cpu0
    res.bytes = _delta(before, lab.counters())
    res.evals = _curve(evlog, t0)
    return res


def round_steps(server_args: list[str]) -> int:
    """Steps in a round of local steps (``--inner-steps`` under ``--sync diloco[-async]``), else 0."""
    cfg = parse_config(ServerConfig, server_args, prog="ps-server", environ={})
    return int(getattr(cfg, "inner_steps", 0) or 0) if cfg.sync.startswith("diloco") else 0


def run_ddp(lab: Lab, job: Job, k: int, d: Path) -> RunResult:
    """K DDP/gloo ranks on hosts ``w0..w{K-1}``."""
    d.mkdir(parents=True, exist_ok=True)
    group, evlog = Group(d), d / "eval.jsonl"
    env = child_env(1, {"GLOO_SOCKET_IFNAME": "eth0"})
    before, t0, cpu0 = lab.counters(), time.time(), children_cpu()
    for r in range(k):
        argv = [job.python, "-m", "benchmarks.wan_ddp", "--rank", str(r), "--world", str(k),
                "--init", f"file://{d}/store", "--model", job.model, "--data", job.data, "--loss", job.loss,
                "--batch-size", str(job.batch), "--epochs", str(job.epochs), "--seed", str(job.seed),
                "--eval-data", job.test_data, "--eval-every", str(job.eval_every), "--eval-log", str(evlog),
                "--", *job.server_args]
        group.spawn(f"ddp{r}", lab.wrap(f"w{r}", argv), env)
    return _finish(RunResult("ddp/gloo"), group, lab, before, t0, evlog, job.timeout, cpu0)


def run_zmqps(lab: Lab, job: Job, k: int, mode: Mode, d: Path, worker_evals: bool) -> RunResult:
    """``mode.shards`` ``ps-server`` s on hosts ``server``, ``server1``, ..., K ``ps-worker`` s on ``w0..``.

    ``worker_evals``: ps-worker has --eval-every (else rank 0 runs benchmarks.evalworker).
    """
    d.mkdir(parents=True, exist_ok=True)
    group, evlog = Group(d), d / "eval.jsonl"
    env = child_env(1)
    hosts = server_hosts(mode.shards)
    metrics = [d / ("metrics.jsonl" if i == 0 else f"metrics{i}.jsonl") for i in range(mode.shards)]
    ready = [d / ("ready" if i == 0 else f"ready{i}") for i in range(mode.shards)]
    server_args = ["--workers", str(k), "--shm", "off", *job.server_args, *mode.server]
    res = RunResult(f"zmqps {mode.label}", family=mode.family, shards=mode.shards)
    before, t0, cpu0 = lab.counters(), time.time(), children_cpu()  # the servers' start counts, as DDP's rendezvous does
    for i, host in enumerate(hosts):
        ckpt = d / ("ckpt" if i == 0 else f"ckpt{i}")  # every shard its own folder (README)
        server = [job.python, "-m", "ps", "--bind", f"tcp://{lab.addr[host]}:0", "--ready-file", str(ready[i]),
                  "--checkpoint-dir", str(ckpt), "--metrics-log", str(metrics[i]), *server_args]
        group.spawn("server" if i == 0 else f"server{i}", lab.wrap(host, server), env)
    try:
        endpoint = ",".join(wait_file(path, group) for path in ready)  # the shards, in order, for every worker
    except RuntimeError as e:
        group.stop()
        res.ok, res.error = False, str(e)
        log.error("%s: a server did not start: %s", res.label, str(e).splitlines()[0])
        return res
    for r in range(k):
        evals = ["--eval-every", str(job.eval_every), "--eval-log", str(evlog)] if r == 0 else []
        entry = ["-m", "worker"] if worker_evals or r else ["-m", "benchmarks.evalworker", "--eval-data", job.test_data,
                                                             "--eval-round-steps", str(round_steps(server_args))]
        argv = [job.python, *entry, "--server", endpoint, "--rank", str(r), "--world-size", str(k),
                "--model", job.model, "--data", job.data, "--loss", job.loss, "--batch-size", str(job.batch),
                "--epochs", str(job.epochs), "--seed", str(job.seed), "--shm", "off", "--progress", "off",
                *job.worker_args, *mode.worker, *evals]
        group.spawn(f"worker{r}", lab.wrap(f"w{r}", argv), env)
    group.procs[:] = group.procs[len(hosts):] + group.procs[:len(hosts)]  # the workers first: a failure shows at once
    res = _finish(res, group, lab, before, t0, evlog, job.timeout, cpu0)
    res.update_s = update_interval(metrics)
    return res
