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
from tests.procs import Child
from tests.reference import replay

TOL = 1e-9
WORLD, BATCH, EPOCHS, STEPS = 2, 100, 2, 20
JOB = ("--model", "tests.jobs:linear64", "--data", "tests.jobs:data64", "--batch-size", str(BATCH),
       "--epochs", str(EPOCHS), "--heartbeat", "0.3", "--progress", "off")
"""Worker options of the job (the harness adds --server, --rank, --world-size and --timeout 60)."""
SERVER = ("--lease", "1.5")
"""Server options: a short lease, so a loss is noticed quickly."""


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


def state(child: Child) -> str:
    """The process state letter from /proc (R, S, T for stopped, Z...); "" once it is gone."""
    try:
        return Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def wait_stopped(child: Child, timeout: float = 90.0) -> None:
    """Wait until ``child`` stopped itself (an armed ``stop:`` fault fired)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if state(child) == "T":
            return
        if child.proc.poll() is not None:
            raise AssertionError(f"{child.name} exited {child.proc.returncode} before its fault:\n{child.output()}")
        time.sleep(0.05)
    raise AssertionError(f"{child.name} did not reach its fault in {timeout}s:\n{child.output()}")


def wait_log(child: Child, pattern: str, timeout: float = 30.0) -> re.Match[str]:
    """Wait until ``child``'s log has a line matching ``pattern``; return the match."""
    deadline = time.monotonic() + timeout
    rx = re.compile(pattern)
    while True:
        m = rx.search(child.log.read_text(errors="replace"))
        if m:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"no /{pattern}/ in {child.name}'s log after {timeout}s:\n{child.output()}")
        time.sleep(0.1)


def error_lines(child: Child) -> list[str]:
    """The ERROR lines of a child's log."""
    return [line for line in child.log.read_text(errors="replace").splitlines() if " ERROR " in line]
