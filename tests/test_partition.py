"""A worker cut off from the server for 10 s (its cable pulled, in network namespaces) carries on by
itself once the network is back; the job ends with the uninterrupted θ."""

from __future__ import annotations

import signal
import time

import pytest

from tests.faultjob import JOB, SERVER, WORLD, assert_final, expected, wait_log, wait_stopped
from tests.netns import Lab, netns_available

pytestmark = [pytest.mark.netns, pytest.mark.timeout(300)]

PARTITION_S = 10.0


def test_partitioned_worker_continues_when_the_network_is_back(procs, tmp_path):
    ok, why = netns_available()
    if not ok:
        pytest.skip(why)
    with Lab(["server", "w0", "w1"]) as lab:
        server, ep = procs.server(WORLD, *SERVER, bind=f"tcp://{lab.addr['server']}:0",
                                  wrap=lambda argv: lab.wrap("server", argv))
        w0 = procs.worker(ep, 0, WORLD, *JOB, wrap=lambda argv: lab.wrap("w0", argv))
        w1 = procs.worker(ep, 1, WORLD, *JOB, env={"PS_FAULT": "stop:after-push:5"},
                          wrap=lambda argv: lab.wrap("w1", argv))
        wait_stopped(w1)  # mid-step: its push of step 5 is out, the reply not yet in
        lab.link("w1", False)
        w1.kill(signal.SIGCONT)
        cut = time.monotonic()
        wait_log(server, r"rank 1 lost: nothing heard", timeout=PARTITION_S)
        time.sleep(max(0.0, PARTITION_S - (time.monotonic() - cut)))
        assert w1.proc.poll() is None and w0.proc.poll() is None  # nobody gave up
        lab.link("w1", True)
        procs.wait_ok([w0, w1, server], timeout=200)
    assert_final(tmp_path / "ckpt", expected())
    assert "rank 1 is back after" in server.log.read_text()
    assert "the connection was re-established" in w1.log.read_text(), w1.output()
