"""One run of the wan benchmark inside a lab: DDP/gloo over the lab's links, or a zmqps mode.

Both start their processes in the lab's host namespaces (``ip netns exec NS python -m ...``):
DDP's K ranks on hosts ``w0..`` (a file store for the rendezvous, gloo on each host's
``eth0``); zmqps's ``ps-server`` on host ``server`` and K ``ps-worker`` s on ``w0..``, started as
a user starts them. The clock starts when the first worker is spawned (a zmqps server is
started and listening before, as a deployed one would be) and stops when every process of
the run has exited. Bytes on the wire are each host's ``eth0`` counters, after minus before.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import Group, child_env, wait_file
from benchmarks.heldout import read_evals
from benchmarks.netlab import Lab
from benchmarks.wanmodes import Mode
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
    evals: list[dict[str, float]] = field(default_factory=list)  # {"t": s since start, "step", "loss"}
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # host -> {"tx", "rx"}

    @property
    def final_loss(self) -> float | None:
        return self.evals[-1]["loss"] if self.evals else None

    @property
    def wire_bytes(self) -> int:
        """Bytes sent by every host (each byte on the wire once)."""
        return sum(c["tx"] for c in self.bytes.values())


def _delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    return {h: {d: after[h][d] - before[h][d] for d in ("tx", "rx")} for h in after}


def _curve(path: Path, t0: float) -> list[dict[str, float]]:
    return [{"t": r["t"] - t0, "step": r["step"], "loss": r["heldout_loss"]}
            for r in read_evals(path) if r.get("rank", 0) == 0]


def _finish(res: RunResult, group: Group, lab: Lab, before: dict, t0: float, evlog: Path, timeout: float) -> RunResult:
    try:
        group.wait(timeout)
        res.wall_s = time.time() - t0
    except RuntimeError as e:
        res.ok, res.error = False, str(e)
        log.error("%s failed: %s", res.label, str(e).splitlines()[0])
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
    before, t0 = lab.counters(), time.time()
    for r in range(k):
        argv = [job.python, "-m", "benchmarks.wan_ddp", "--rank", str(r), "--world", str(k),
                "--init", f"file://{d}/store", "--model", job.model, "--data", job.data, "--loss", job.loss,
                "--batch-size", str(job.batch), "--epochs", str(job.epochs), "--seed", str(job.seed),
                "--eval-data", job.test_data, "--eval-every", str(job.eval_every), "--eval-log", str(evlog),
                "--", *job.server_args]
        group.spawn(f"ddp{r}", lab.wrap(f"w{r}", argv), env)
    return _finish(RunResult("ddp/gloo"), group, lab, before, t0, evlog, job.timeout)


def run_zmqps(lab: Lab, job: Job, k: int, mode: Mode, d: Path, worker_evals: bool) -> RunResult:
    """``ps-server`` on host ``server``, K ``ps-worker`` s on ``w0..``; ``worker_evals``: ps-worker has --eval-every."""
    d.mkdir(parents=True, exist_ok=True)
    group, evlog, ready = Group(d), d / "eval.jsonl", d / "ready"
    env = child_env(1)
    server = [job.python, "-m", "ps", "--bind", f"tcp://{lab.addr['server']}:0", "--workers", str(k),
              "--ready-file", str(ready), "--checkpoint-dir", str(d / "ckpt"),
              "--metrics-log", str(d / "metrics.jsonl"),
              "--shm", "off", *job.server_args, *mode.server]
    res = RunResult(f"zmqps {mode.label}")
    before, t0 = lab.counters(), time.time()  # the server's start counts, as DDP's rendezvous does
    group.spawn("server", lab.wrap("server", server), env)
    try:
        endpoint = wait_file(ready, group)
    except RuntimeError as e:
        group.stop()
        res.ok, res.error = False, str(e)
        log.error("%s: the server did not start: %s", res.label, str(e).splitlines()[0])
        return res
    for r in range(k):
        evals = ["--eval-every", str(job.eval_every), "--eval-log", str(evlog)] if r == 0 else []
        entry = ["-m", "worker"] if worker_evals or r else ["-m", "benchmarks.evalworker", "--eval-data", job.test_data,
                                                             "--eval-round-steps", str(round_steps(server[3:]))]
        argv = [job.python, *entry, "--server", endpoint, "--rank", str(r), "--world-size", str(k),
                "--model", job.model, "--data", job.data, "--loss", job.loss, "--batch-size", str(job.batch),
                "--epochs", str(job.epochs), "--seed", str(job.seed), "--shm", "off", "--progress", "off",
                *job.worker_args, *mode.worker, *evals]
        group.spawn(f"worker{r}", lab.wrap(f"w{r}", argv), env)
    group.procs.append(group.procs.pop(0))  # wait for the workers first: a failed one is seen at once
    return _finish(res, group, lab, before, t0, evlog, job.timeout)
