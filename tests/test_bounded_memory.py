"""Nothing a peer sends makes the server allocate without bound (a real server process).

* A peer that floods PINGs and never reads its replies: the server's queue for it is capped
  (``common.transport.ROUTER_HWM``), so its resident set stays put and it keeps serving others.
* A REGISTER that asks for a gradient segment the machine cannot hold: no segment, no file left
  behind, the worker is told to send frames.
* Every connection, whenever it is made, has the frame cap: ``--max-frame-mb`` (64 MiB), or θ's
  largest tensor where a restarted server knows θ when it binds. A larger frame is refused by
  ZeroMQ before it is read (``ZMQ_MAXMSGSIZE``), not read whole; a worker whose piece would be
  larger is refused at REGISTER with a line naming ``--chunk-mb``.
"""

from __future__ import annotations

import glob
import time

import pytest
import torch
import zmq

from common.errors import PSError
from common.procfs import status_bytes
from common.protocol import Op
from common.shm import shm_dir
from common.transport import Requester
from common.wire import encode
from worker.client import PSClient

pytestmark = pytest.mark.timeout(120)
MiB = 1 << 20


def _rss(child, field: str = "VmRSS") -> int:
    rss = status_bytes(field, child.pid)
    assert rss is not None
    return rss


def _peak(child) -> int:
    """The server's peak resident set: a frame read whole and freed again leaves its mark here."""
    return _rss(child, "VmHWM")


def test_a_ping_flood_that_is_never_read_costs_the_server_a_bounded_queue(procs) -> None:
    server, ep = procs.server(1)
    ctx = zmq.Context()
    try:
        flood = ctx.socket(zmq.DEALER)
        flood.setsockopt(zmq.SNDHWM, 0)
        flood.setsockopt(zmq.RCVHWM, 1)  # reads nothing
        flood.connect(ep)
        ping = encode(Op.PING, {}, None, 1)
        time.sleep(0.5)
        before = _rss(server)
        t0 = time.monotonic()
        sent = 0
        while time.monotonic() - t0 < 4.0:
            for _ in range(1000):
                flood.send_multipart(ping, zmq.NOBLOCK)
            sent += 1000
        time.sleep(1.0)
        grown = _rss(server) - before
        assert sent > 50_000
        assert grown < 48 * MiB, f"server grew {grown / MiB:.0f} MiB for {sent} unread PINGs"
        other = Requester(ctx, ep, who="other")
        assert other.request(Op.PING, {}, timeout_s=30).fields["workers"] == 1  # still serving
        other.close()
        flood.close(0)
    finally:
        ctx.destroy(0)


def test_a_gradient_segment_the_machine_cannot_hold_is_refused_cleanly(procs) -> None:
    server, ep = procs.server(2, "--max-frame-mb", str(1 << 30))  # past the frame cap's own refusal
    before = set(glob.glob(f"{shm_dir()}/zmqps-*"))
    ctx = zmq.Context()
    try:
        req = Requester(ctx, ep, who="greedy")
        reply = req.request(Op.REGISTER, {"rank": 0, "world_size": 2, "shm": True,
                                          "params": [["huge", "float32", [1 << 47]]]}, timeout_s=30)
        assert "shm_grad" not in reply.fields  # frames, not an 512 TiB file
        time.sleep(0.2)
        left = set(glob.glob(f"{shm_dir()}/zmqps-*")) - before
        assert not left, left
        assert "no shared memory for its" in server.output()
        assert req.request(Op.PING, {}, timeout_s=30).fields["registered"] == 1
    finally:
        ctx.destroy(0)


def test_a_restarted_server_refuses_frames_larger_than_theta_before_reading_them(procs, tmp_path) -> None:
    ckpt = tmp_path / "ckpt"
    server, ep = procs.server(1, ckpt=ckpt)
    with PSClient(ep, rank=0, world_size=1, timeout=30) as ps:
        ps.init({"w": torch.zeros(16, dtype=torch.float64)})  # θ_0 is checkpointed
    server.kill()
    server.proc.wait(10)
    server, ep = procs.server(1, ckpt=ckpt)
    assert "resumed from" in server.output()
    _send_big_frame(server, ep, 0)


def _send_big_frame(server, ep: str, version: int) -> None:
    """A connection opened now sends one 512 MiB frame: it must be dropped before it is read."""
    ctx = zmq.Context()
    try:
        time.sleep(0.5)
        before = _peak(server)
        big = ctx.socket(zmq.DEALER)
        big.connect(ep)
        big.send_multipart(encode(Op.PING, {}, None, 1)[:1] + [b"\0" * (512 * MiB)])
        time.sleep(3.0)
        grown = _peak(server) - before
        assert grown < 256 * MiB, f"server grew {grown / MiB:.0f} MiB: the 512 MiB frame was read"
        ok = Requester(ctx, ep, who="other")
        assert ok.request(Op.PING, {}, timeout_s=30).fields["version"] == version
        big.close(0)
        ok.close()
    finally:
        ctx.destroy(0)


def test_a_connection_made_after_theta_exists_has_the_frame_cap_too(procs) -> None:
    # 65d49a7 tightened ZMQ_MAXMSGSIZE once θ existed, which reaches no connection the listener
    # accepts later: a fresh server read a 512 MiB (up to 4 GiB) frame whole
    server, ep = procs.server(1)
    with PSClient(ep, rank=0, world_size=1, timeout=30) as ps:
        ps.init({"w": torch.zeros(16, dtype=torch.float64)})
        _send_big_frame(server, ep, 0)
        ps.push_pull({"w": torch.ones(16, dtype=torch.float64)}, 0)  # the worker's own connection still works
        _send_big_frame(server, ep, 1)


def test_a_piece_larger_than_the_frame_cap_is_refused_at_register_naming_the_options(procs) -> None:
    server, ep = procs.server(1, "--max-frame-mb", "1")
    big = {"w": torch.zeros(2, 1 << 17, dtype=torch.float64)}  # 2 MiB, two rows of 1 MiB
    with pytest.raises(PSError, match=r"frame cap of 1 MiB.*--chunk-mb.*--max-frame-mb"):
        with PSClient(ep, rank=0, world_size=1, timeout=30, chunk_mb=0) as ps:  # one 2 MiB frame
            ps.init(big)
    with PSClient(ep, rank=0, world_size=1, timeout=30, chunk_mb=1) as ps:  # two pieces of 1 MiB
        theta = ps.init(big)
        assert torch.equal(theta["w"], big["w"])
    assert server.proc.poll() is None
