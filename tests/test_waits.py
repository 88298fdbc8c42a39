"""What a worker says while it waits, and what a healthy run does not say.

A worker pointed at no server says once, after a short silence, which endpoint it waits for
and for what, then how long so far at a modest interval, and fails with an error naming the
endpoint; its resends are routine (debug level). A worker on another machine than the server
cannot map the server's shared memory, which is normal and not worth a line.
"""

from __future__ import annotations

import logging
import re
import socket
import sys
import time
from typing import Iterator

import pytest
import torch

from common.errors import PSTimeoutError
from common.protocol import Op
from common.shm import Segment
from common.transport import Requester
from tests.procs import Procs
from worker.client import PSClient
from worker.retry import Caller, RetryPolicy


@pytest.fixture
def dead_endpoint() -> Iterator[str]:
    """A TCP port that refuses connections: bound by this test (so nobody else takes it), never listening."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"tcp://127.0.0.1:{s.getsockname()[1]}"


def test_a_wait_for_an_absent_server_is_one_line_naming_it_then_an_error(caplog, dead_endpoint: str) -> None:
    caplog.set_level(logging.INFO)
    t0 = time.monotonic()
    with PSClient(dead_endpoint, 0, 1, timeout=5, heartbeat=0) as ps:
        with pytest.raises(PSTimeoutError) as e:
            ps.init({"w": torch.zeros(2)})
    took = time.monotonic() - t0
    assert 5 <= took < 15
    assert dead_endpoint in str(e.value) and "register" in str(e.value)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert lines and f"waiting for the server at {dead_endpoint}" in lines[0], lines
    assert "no answer to register of step 0 for 3s" in lines[0] and "giving up after 5s" in lines[0]
    assert len(lines) == 1, lines  # resends are debug-level; the next report would be 15 s later


def test_the_worker_command_names_the_absent_server_and_fails(procs: Procs, dead_endpoint: str) -> None:
    child = procs.spawn("worker", [sys.executable, "-m", "worker", "--server", dead_endpoint, "--rank", "0",
                                   "--world-size", "1", "--timeout", "5"])
    assert child.wait(60) == 1, child.output()
    lines = child.output().strip().splitlines()
    assert len(lines) == 2, lines
    assert f"waiting for the server at {dead_endpoint}" in lines[0]
    assert "ERROR" in lines[1] and f"register to {dead_endpoint} timed out after 5s" in lines[1]


def test_a_long_wait_is_reported_again_at_an_interval(caplog, dead_endpoint: str, zctx) -> None:
    caplog.set_level(logging.INFO)
    req = Requester(zctx, dead_endpoint, who="worker 0", identity=b"w0-wait")
    caller = Caller(req, zctx, "worker 0", RetryPolicy(deadline_s=4.5, report_after_s=1.0, report_every_s=1.0))
    try:
        with pytest.raises(PSTimeoutError):
            caller.call(Op.PING, {})
    finally:
        caller.close()
        req.close()
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert f"waiting for the server at {dead_endpoint}: no answer to ping of step 0 for 1s" in lines[0], lines
    again = [ln for ln in lines[1:] if f"still waiting for the server at {dead_endpoint}" in ln]
    assert len(again) == len(lines) - 1 and 2 <= len(again) <= 4, lines
    assert re.search(r"[34]s without an answer \(ping of step 0; giving up at 4s\)", again[-1]), again


def test_shared_memory_of_a_server_elsewhere_is_not_worth_a_line(caplog) -> None:
    caplog.set_level(logging.INFO)
    assert Segment.open("/dev/shm/zmqps-another-host-1-0123abcd-g0", "00" * 16, 68, writable=True) is None
    assert not [r for r in caplog.records if r.levelno >= logging.INFO], caplog.text
