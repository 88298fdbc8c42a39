"""The client API from a custom loop, its timeouts, and the server's checkpoints."""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from common.errors import PSTimeoutError, RemoteError
from tests.clients import run_ranks
from tests.jobs import data64, linear64
from tests.procs import Procs
from tests.reference import replay
from worker.client import PSClient


_SEED_LOCK = threading.Lock()


def _custom_loop(endpoint: str, rank: int, world: int, out: dict, steps: int = 20) -> None:
    """A user's own loop: init, then push_pull or push+pull alternately, then done."""
    with _SEED_LOCK:  # the global RNG: the two client threads must not interleave their seeded draws
        torch.manual_seed(0)
        model = linear64()
        torch.manual_seed(0)
        x, y = data64().tensors
    lo = rank * 1000 // world
    b = 100 // world
    with PSClient(endpoint, rank, world, timeout=60) as ps:
        theta = ps.init(dict(model.named_parameters()))
        for step in range(ps.step, steps):
            with torch.no_grad():
                for k, p in model.named_parameters():
                    p.copy_(theta[k])
            model.zero_grad()
            t = step % 10
            rows = slice(lo + t * b, lo + (t + 1) * b)
            F.mse_loss(model(x[rows]), y[rows]).backward()
            grads = {k: p.grad for k, p in model.named_parameters()}
            if step % 2:
                theta = ps.push_pull(grads, step)
            else:
                assert ps.push(grads, step) is True
                assert ps.push(grads, step) is False  # a replay is acknowledged, not applied twice
                theta = ps.pull()
        out[rank] = {k: v.clone() for k, v in theta.items()}
        ps.done()


def test_custom_loop_with_two_clients_matches_the_math(procs: Procs) -> None:
    server, endpoint = procs.server(2)
    out: dict = {}
    run_ranks(lambda r: _custom_loop(endpoint, r, 2, out), 2, timeout=120)
    assert server.wait(60) == 0, server.output()
    want = replay(linear64, data64, 2, batch=100, epochs=2, shuffle=False)
    final = load_file(str(procs.tmp / "ckpt" / "final.safetensors"))
    for k in want:
        assert (out[0][k] - want[k]).abs().max() <= 1e-9
        assert torch.equal(out[0][k], out[1][k])
        assert torch.equal(final[k], out[0][k])


def test_no_server_fails_with_a_typed_timeout() -> None:
    t0 = time.monotonic()
    with PSClient("tcp://127.0.0.1:1", rank=0, world_size=1, timeout=1.5) as ps:
        with pytest.raises(PSTimeoutError) as e:
            ps.init({"w": torch.zeros(2)})
    assert time.monotonic() - t0 < 10
    assert e.value.op == "register" and "tcp://127.0.0.1:1" in str(e.value)
    assert isinstance(e.value, TimeoutError)


def test_worker_cli_pointed_at_no_server_exits_nonzero_naming_the_server(procs: Procs) -> None:
    w = procs.worker("tcp://127.0.0.1:1", 0, 1, "--timeout", "2")
    assert w.wait(60) == 1
    assert "PSTimeoutError" in w.output() and "tcp://127.0.0.1:1" in w.output()
    (line,) = [x for x in w.output().splitlines() if " ERROR " in x]  # one line: peer, operation, step
    assert "register to tcp://127.0.0.1:1 timed out after 2s (worker 0 at step 0: no sign of life" in line


def test_wrong_world_size_is_refused(procs: Procs) -> None:
    _, endpoint = procs.server(2)
    with PSClient(endpoint, rank=0, world_size=3, timeout=30) as ps:
        with pytest.raises(RemoteError, match="BAD_RANK"):
            ps.init({"w": torch.zeros(2)})


def test_checkpoints_every_n_and_resume_on_restart(procs: Procs) -> None:
    ckpt = procs.tmp / "ck"
    server, endpoint = procs.server(1, "--checkpoint-every", "3", ckpt=ckpt)
    with PSClient(endpoint, 0, 1, timeout=60) as ps:
        ps.init({"w": torch.zeros(2, dtype=torch.float64)})
        for step in range(7):
            ps.push_pull({"w": torch.ones(2, dtype=torch.float64)}, step)
        ps.done()
    assert server.wait(60) == 0
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["ckpt-000000003.safetensors", "ckpt-000000006.safetensors",
                     "ckpt-000000007.safetensors", "final.safetensors"]
    assert torch.allclose(load_file(str(ckpt / "final.safetensors"))["w"], torch.full((2,), -0.07, dtype=torch.float64))
    # a new server on the same directory refuses the finished job unless asked to resume it
    # (tests/test_used_folder.py); asked, it resumes at step 7 with the same θ
    refused = procs.spawn("server again", [sys.executable, "-m", "ps", "--workers", "1", "--bind", "tcp://127.0.0.1:0",
                                           "--checkpoint-dir", str(ckpt)])
    assert refused.wait(60) == 2 and "holds a finished job" in refused.output()
    server2, endpoint2 = procs.server(1, "--resume", "always", ckpt=ckpt)
    with PSClient(endpoint2, 0, 1, timeout=60) as ps:
        theta = ps.init({"w": torch.zeros(2, dtype=torch.float64)})
        assert ps.step == 7
        assert torch.equal(theta["w"], load_file(str(ckpt / "final.safetensors"))["w"])
        ps.done()
    assert server2.wait(60) == 0


def test_server_on_a_busy_port_fails_clearly(procs: Procs) -> None:
    _, endpoint = procs.server(1)
    import sys

    second = procs.spawn("server2", [sys.executable, "-m", "ps", "--workers", "1", "--bind", endpoint,
                                     "--checkpoint-dir", str(procs.tmp / "c2")])
    assert second.wait(60) == 1
    assert "cannot serve on" in second.output() and "Address already in use" in second.output()
