"""The job the fault tests run, its uninterrupted result, and helpers to inject and observe faults.

The job is the seed's example in float64 (``tests.jobs:linear64`` on ``tests.jobs:data64``), two
workers, shuffled, 2 epochs of 10 steps; its final θ must equal :func:`expected` within
:data:`TOL` whatever is killed, restarted or cut off on the way.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors.torch import load_file

from tests import jobs
from tests.forkserver import ForkedChild, ForkServer
from tests.procs import Child, Procs
from tests.reference import replay

AnyChild = Child | ForkedChild

TOL = 1e-9
WORLD, BATCH, EPOCHS, STEPS = 2, 100, 2, 20
JOB = ("--model", "tests.jobs:linear64", "--data", "tests.jobs:data64", "--batch-size", str(BATCH),
       "--epochs", str(EPOCHS), "--heartbeat", "0.3", "--progress", "off")
"""Worker options of the job (the harness adds --server, --rank, --world-size and --timeout 60)."""
SERVER = ("--lease", "1.5")
"""Server options: a short lease, so a loss is noticed quickly."""


def fork_server(fs: ForkServer, procs: Procs, *args: str, env: dict[str, str] | None = None,
                bind: str = "tcp://127.0.0.1:0", workers: int = WORLD, timeout: float = 60.0) -> tuple[ForkedChild, str]:
    """``ps-server`` for the job, forked from the fork server (no torch import to wait for); return it
    and the endpoint it reported. Checkpoints go to ``procs.tmp / "ckpt"``."""
    n = len(procs.children) + 1
    ready = procs.tmp / f"ready-{n}"
    argv = ["--bind", bind, "--workers", str(workers), "--ready-file", str(ready),
            "--checkpoint-dir", str(procs.tmp / "ckpt"), *args]
    child = fs.spawn("server", "ps", argv, procs.tmp / f"{n:02d}-server.log", env=env)
    procs.children.append(child)  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    while not (ready.exists() and ready.read_text().strip()):
        if child.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the server did not listen (status {child.poll()}):\n{child.output()}")
        time.sleep(0.02)
    return child, ready.read_text().strip()


def fork_worker(fs: ForkServer, procs: Procs, endpoint: str, rank: int, *args: str,
                env: dict[str, str] | None = None) -> ForkedChild:
    """``ps-worker`` rank ``rank`` of the job (options :data:`JOB`, then ``args``), forked."""
    n = len(procs.children) + 1
    argv = ["--server", endpoint, "--rank", str(rank), "--world-size", str(WORLD), "--timeout", "60", *JOB, *args]
    child = fs.spawn(f"worker {rank}", "worker", argv, procs.tmp / f"{n:02d}-worker_{rank}.log", env=env)
    procs.children.append(child)  # type: ignore[arg-type]
    return child


def dropout64() -> torch.nn.Module:
    """A float64 MLP with dropout: its gradients depend on the random state of each step."""
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Dropout(0.5),
                               torch.nn.Linear(16, 1)).double()


def expected(ranks: Callable[[int], Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """Final θ of the job computed in one process (``ranks``: see :func:`tests.reference.replay`)."""
    return replay(jobs.linear64, jobs.data64, WORLD, batch=BATCH, epochs=EPOCHS, ranks=ranks)


def assert_final(ckpt: Path, want: dict[str, torch.Tensor], tol: float = TOL) -> None:
    """``final.safetensors`` in ``ckpt`` holds ``want`` within ``tol`` (max abs difference)."""
    got = load_file(str(ckpt / "final.safetensors"))
    assert set(got) == set(want)
    for k in want:
        diff = (got[k] - want[k]).abs().max().item()
        assert diff <= tol, f"{k}: |distributed - reference| = {diff:.3g} > {tol:g}"


def exited(child: AnyChild) -> int | None:
    """The exit status of either kind of child, or None while it runs."""
    return child.poll() if isinstance(child, ForkedChild) else child.proc.poll()


def state(child: AnyChild) -> str:
    """The process state letter from /proc (R, S, T for stopped, Z...); "" once it is gone."""
    try:
        return Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def wait_stopped(child: AnyChild, timeout: float = 90.0) -> None:
    """Wait until ``child`` stopped itself (an armed ``stop:`` fault fired)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state(child) == "T":
            return
        if exited(child) is not None:
            raise AssertionError(f"{child.name} exited {exited(child)} before its fault:\n{child.output()}")
        time.sleep(0.05)
    raise AssertionError(f"{child.name} did not reach its fault in {timeout}s:\n{child.output()}")


def wait_log(child: AnyChild, pattern: str, timeout: float = 30.0) -> re.Match[str]:
    """Wait until ``child``'s log has a line matching ``pattern``; return the match."""
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while True:
        m = rx.search(child.output(tail=10**8))  # the log may not exist yet: a forked child creates it
        if m:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"no /{pattern}/ in {child.name}'s log after {timeout}s:\n{child.output()}")
        time.sleep(0.1)


def error_lines(child: AnyChild) -> list[str]:
    """The ERROR lines of a child's log."""
    return [line for line in child.output(tail=10**8).splitlines() if " ERROR " in line]
