"""Starting pipeline jobs for the tests: a server and P x R stage workers, as real processes.

The processes come from the fork server (:mod:`tests.forkserver`) and are registered with a
:class:`tests.procs.Procs`, which stops every one of them when the test ends.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tests.forkserver import ForkedChild, ForkServer
from tests.procs import Procs


@dataclass
class Job:
    """One pipeline job's processes and where its server writes θ."""

    name: str
    server: ForkedChild
    ready: Path
    ckpt: Path
    stages: list[ForkedChild]


def start_server(fs: ForkServer, procs: Procs, name: str, world: int, args: Sequence[str] = ()) -> Job:
    """Fork ``ps-server`` for ``world`` workers on a port the OS picks (not waiting for it)."""
    ready, ckpt = procs.tmp / f"{name}.ready", procs.tmp / f"{name}-ckpt"
    argv = ["--bind", "tcp://127.0.0.1:0", "--workers", str(world), "--ready-file", str(ready),
            "--checkpoint-dir", str(ckpt), *args]
    server = fs.spawn(f"{name} server", "ps", argv, procs.tmp / f"{name}-server.log")
    procs.children.append(server)  # type: ignore[arg-type]
    return Job(name, server, ready, ckpt, [])


def endpoint(job: Job, timeout: float = 60.0) -> str:
    """The endpoint the job's server reported, once it listens."""
    deadline = time.monotonic() + timeout
    while not (job.ready.exists() and job.ready.read_text().strip()):
        if job.server.poll() is not None:
            raise AssertionError(f"{job.name}: server exited {job.server.poll()}:\n{job.server.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{job.name}: server did not listen within {timeout}s:\n{job.server.output()}")
        time.sleep(0.02)
    return job.ready.read_text().strip()


def start_stages(fs: ForkServer, procs: Procs, job: Job, world: int, args: Sequence[str],
                 timeout: float = 60.0) -> list[ForkedChild]:
    """Fork ``ps-worker --mode pipeline`` for ranks 0..world-1 of ``job``."""
    ep = endpoint(job)
    for k in range(world):
        argv = ["--server", ep, "--rank", str(k), "--world-size", str(world), "--timeout", str(timeout),
                "--mode", "pipeline", "--progress", "off", "--device", "cpu", *args]
        child = fs.spawn(f"{job.name} worker {k}", "worker", argv, procs.tmp / f"{job.name}-worker-{k}.log")
        procs.children.append(child)  # type: ignore[arg-type]
        job.stages.append(child)
    return job.stages


def stage_stats(log_text: str) -> dict:
    """A stage's own accounting, from its last ``stage stats`` log line."""
    m = re.findall(r"stage stats (\{.*\})", log_text)
    assert m, f"no stage stats in the log:\n{log_text[-2000:]}"
    return json.loads(m[-1])
