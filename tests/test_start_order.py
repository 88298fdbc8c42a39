"""Processes started the way deployments start them: workers before the server.

systemd, compose and Kubernetes start every process at once; a worker that comes up first
resends REGISTER until the server answers, and every copy reaches the server. The copies
must get one answer ([Note: idempotent register]): with shared memory on (the default), the
server used to allocate a new gradient segment per copy while the worker wrote into the one
named by the first answer, and θ ended 4.4e-2 away from the math.
"""

from __future__ import annotations

import re
import socket
import time

import pytest
from safetensors.torch import load_file

from tests.jobs import class_data64, mlp64
from tests.procs import Procs
from tests.reference import replay

JOB = ("--model", "tests.jobs:mlp64", "--data", "tests.jobs:class_data64", "--loss", "cross_entropy",
       "--batch-size", "60", "--epochs", "2", "--heartbeat", "0.3", "--progress", "off")


def _free_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("shm", ["auto", "off"])
def test_workers_started_before_the_server_train_exactly(procs: Procs, shm: str) -> None:
    ep = _free_endpoint()
    workers = [procs.worker(ep, k, 2, *JOB, "--shm", shm, "--log-level", "debug") for k in range(2)]
    deadline = time.monotonic() + 120
    # the first line of the wait names the server; the resends themselves are debug-level
    while not all(re.search(rf"INFO .*waiting for the server at {ep}: no answer to register of step 0", w.output())
                  and re.search(r"DEBUG .*sending register of step 0 again", w.output()) for w in workers):
        assert time.monotonic() < deadline, "the workers never resent REGISTER"
        assert all(w.proc.poll() is None for w in workers), [w.output() for w in workers]
        time.sleep(0.1)
    server, _ = procs.server(2, "--shm", shm, "--log-level", "debug", bind=ep)
    procs.wait_ok([*workers, server], timeout=240)
    got = load_file(str(procs.tmp / "ckpt" / "final.safetensors"))
    want = replay(mlp64, class_data64, 2, batch=60, epochs=2, loss="cross_entropy")
    for k in want:
        assert (got[k] - want[k]).abs().max().item() <= 1e-9, k
    log = server.output(200_000)
    logs = "".join(w.output(200_000) for w in workers)
    assert "not usable here" not in logs
    assert not re.search(r"(INFO|WARNING|ERROR) .*(again|re-registered|Errno)", logs), logs  # a healthy start
    assert re.search(rf"INFO .*the server at {ep} answered after \d+s", logs)
    if shm == "auto":
        assert "a copy of its registration, answered as before" in log  # the copies did arrive
