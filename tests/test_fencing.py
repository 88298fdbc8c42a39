"""Who may act as a rank: a live lease holds it, a newcomer takes it over once the lease lapses, and
the old holder is then refused; after a shrink, a returning worker joins at a step boundary.

The workers here are PSClients in the test process (real sockets, a real server process), so
the test can stop one's heartbeat, as a hung or cut-off process would.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from common.errors import ErrorCode, PSTimeoutError, RemoteError
from tests import jobs
from tests.faultjob import fork_server
from worker.client import PSClient

pytestmark = pytest.mark.timeout(300)
LEASE = 2.0


def _theta() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in jobs.linear64().named_parameters()}


def _grads(value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in _theta().items()}


def _in_thread(fn, *args):
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_a_held_rank_is_taken_over_only_after_its_lease_and_the_old_holder_is_fenced(forkserver, procs):
    server, ep = fork_server(forkserver, procs, "--lease", str(LEASE), "--log-level", "debug", workers=1)
    old = PSClient(ep, 0, 1, timeout=60, heartbeat=0.3)
    new = PSClient(ep, 0, 1, timeout=60, heartbeat=0.3)
    try:
        old.init(_theta())
        old.push_pull(_grads(1.0), 0)
        t, out = _in_thread(new.init, _theta())
        time.sleep(2 * LEASE)
        assert t.is_alive(), "the rank was taken while its holder's lease was live"
        old._beat.stop()  # the holder hangs: no heartbeat, no request
        t.join(30)
        assert "value" in out, out
        assert new.step == 1  # it continues where the job is
        with pytest.raises(RemoteError) as e:
            old.push_pull(_grads(1.0), 1)
        assert e.value.code == ErrorCode.UNAUTHORIZED
        theta = new.push_pull(_grads(2.0), 1)
        assert new.step == 2
        want = {k: v - 0.01 * 1.0 - 0.01 * 2.0 for k, v in _theta().items()}  # only the holders' pushes
        for k in want:
            assert torch.allclose(theta[k], want[k], rtol=0, atol=1e-12), k
        log = server.log.read_text()
        assert "RANK_HELD" in log and "rank 0: a new connection takes over" in log
        assert new.done()
        assert server.wait(60) == 0
    finally:
        old.close()
        new.close()


def test_after_a_shrink_a_returning_worker_joins_between_steps(forkserver, procs):
    server, ep = fork_server(forkserver, procs, "--lease", str(LEASE), "--on-worker-loss", "shrink")
    a, b = PSClient(ep, 0, 2, timeout=60, heartbeat=0.3), PSClient(ep, 1, 2, timeout=60, heartbeat=0.3)
    c = PSClient(ep, 1, 2, timeout=60, heartbeat=0.3)
    try:
        tb, _ = _in_thread(b.init, _theta())
        a.init(_theta())
        tb.join(30)
        b._beat.stop()  # rank 1 goes silent: it is dropped, step 0 completes with rank 0 alone
        theta = a.push_pull(_grads(1.0), 0)
        assert "rank 1 lost at step 0: continuing with rank(s) [0]" in server.log.read_text()
        for k, v in _theta().items():
            assert torch.allclose(theta[k], v - 0.01, rtol=0, atol=1e-12)
        c.init(_theta())  # rank 1 again (a restarted process): it joins at the next step
        assert c.step == 1
        ta, out = _in_thread(a.push_pull, _grads(1.0), 1)
        theta_c = c.push_pull(_grads(3.0), 1)  # step 1 is reduced over both ranks again
        ta.join(30)
        for k, v in _theta().items():
            assert torch.allclose(theta_c[k], v - 0.01 - 0.01 * 2.0, rtol=0, atol=1e-12)
            assert torch.equal(out["value"][k], theta_c[k])
    finally:
        for x in (a, b, c):
            x.close()


def test_a_peer_alive_but_stuck_fails_the_wait_clearly_instead_of_hanging(forkserver, procs):
    """Rank 1 keeps its lease (heartbeats) but never pushes: the server holds the step without end,
    so rank 0's wait ends after the server's declared hold plus its timeout, naming the step."""
    server, ep = fork_server(forkserver, procs, "--rejoin-deadline", "1")
    a, b = PSClient(ep, 0, 2, timeout=1.5, heartbeat=0.2), PSClient(ep, 1, 2, timeout=60, heartbeat=0.2)
    try:
        tb, _ = _in_thread(b.init, _theta())
        a.init(_theta())
        tb.join(30)
        t0 = time.monotonic()
        with pytest.raises(PSTimeoutError) as e:
            a.push_pull(_grads(1.0), 0)
        waited = time.monotonic() - t0
        assert 2.5 - 0.5 <= waited < 30, waited  # hold 1 s + timeout 1.5 s, not the 1.5 s of silence
        assert e.value.op == "push_pull" and ep in str(e.value)
        assert "worker 0 at step 0: the server answers but made no progress" in str(e.value)
        assert server.poll() is None  # nothing is lost: rank 1 holds its lease
    finally:
        a.close()
        b.close()
