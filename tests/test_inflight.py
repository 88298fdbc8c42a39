"""Several requests in flight on one connection: the client's Caller and the server's parking rules.

The Caller is tested against a real ROUTER socket played by the test (so the order and the fate of
every reply are under the test's control); the parking rules against a real server process.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Mapping

import pytest
import torch
import zmq

from common.errors import ErrorCode, RemoteError
from common.protocol import Op
from common.transport import Requester
from common.wire import Message, decode, encode, error_frames
from tests.procs import Procs
from worker.client import PSClient
from worker.retry import Caller, RetryPolicy

pytestmark = pytest.mark.timeout(60)

Answer = Callable[[Message], "tuple[dict, dict[str, torch.Tensor] | None]"]
"""How a test's server answers one request: the reply's fields and frames."""


class Peer:
    """A ROUTER the test answers by hand; ``restart`` drops every connection and binds again."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self._bind("tcp://127.0.0.1:0")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def _bind(self, ep: str) -> zmq.Socket:
        s = self.ctx.socket(zmq.ROUTER)
        s.linger = 0
        s.bind(ep)
        return s

    def recv(self, n: int, timeout: float = 10.0) -> list[tuple[bytes, object]]:
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            assert self.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))), f"got {len(out)} of {n}"
            ident, *frames = self.sock.recv_multipart()
            out.append((ident, decode(frames)))
        return out

    def reply(self, ident: bytes, req_id: int, fields: dict) -> None:
        self.sock.send_multipart([ident, *encode(Op.REPLY, fields, None, req_id)])

    def answer(self, ident: bytes, req_id: int, op: Op, version: int) -> None:
        """A reply that fits ``op``'s reply schema, told apart from the others by ``version``."""
        fields = {"applied": True, "version": version} if op is Op.PUSH else {"version": version, "loss": None}
        self.reply(ident, req_id, fields)

    def serve(self, answers: Mapping[Op, Answer], worker: threading.Thread, timeout: float) -> list[Message]:
        """Answer each request by its op's ``answers`` (fields and frames, given the request) until
        the ``worker`` thread ends or ``timeout`` passes; returns the requests, in order."""
        seen: list[Message] = []
        deadline = time.monotonic() + timeout
        while worker.is_alive() and time.monotonic() < deadline:
            if not self.sock.poll(50):
                continue
            ident, m = self.recv(1)[0]
            seen.append(m)
            fields, frames = answers[m.op](m)
            self.sock.send_multipart([ident, *encode(Op.REPLY, fields, frames, m.id)])
        worker.join(1)
        return seen

    def restart(self) -> None:
        self.sock.close(0)
        time.sleep(0.2)
        self.sock = self._bind(self.endpoint)

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def peer():
    p = Peer()
    yield p
    p.close()


@pytest.fixture
def caller(peer):
    ctx = zmq.Context()
    req = Requester(ctx, peer.endpoint, who="worker 0", identity=b"w0-test")
    c = Caller(req, ctx, "worker 0", RetryPolicy(deadline_s=10, backoff_s=60))
    yield c
    c.close()
    req.close()
    ctx.term()


def test_replies_in_any_order_reach_their_calls(peer, caller):
    a = caller.start(Op.PULL, {"rank": 0, "step": 1}, step=0)
    b = caller.start(Op.PULL, {"rank": 0, "step": 2}, step=1)
    c = caller.start(Op.PUSH, {"rank": 0, "step": 3}, step=1)
    (ia, ma), (ib, mb), (ic, mc) = peer.recv(3)
    assert [m.fields.get("step") for m in (ma, mb)] == [1, 2]
    peer.answer(ic, mc.id, Op.PUSH, 103)
    peer.sock.send_multipart([ib, *error_frames(ErrorCode.BAD_STEP, "no", mb.id)])
    peer.answer(ia, ma.id, Op.PULL, 101)
    assert caller.finish(a).fields["version"] == 101  # b's error and c's reply arrived first: kept
    with pytest.raises(RemoteError) as e:
        caller.finish(b)
    assert e.value.code is ErrorCode.BAD_STEP
    assert caller.finish(c).fields["version"] == 103
    assert caller.resends == 0


def test_after_a_reconnect_every_unanswered_call_is_sent_again_in_order(peer, caller):
    calls = [caller.start(Op.PUSH if i % 2 == 0 else Op.PULL, {"rank": 0, "step": i}, step=i) for i in range(4)]
    first = peer.recv(4)
    peer.answer(first[1][0], first[1][1].id, Op.PULL, 1)  # call 1 is answered before the server goes
    assert caller.finish(calls[1]).fields["version"] == 1
    peer.restart()  # the rest were lost with the connection
    done: dict[int, object] = {}

    def wait() -> None:
        done[0] = caller.finish(calls[0])

    t = threading.Thread(target=wait)
    t.start()
    again = peer.recv(3)
    assert [m.fields["step"] for _i, m in again] == [0, 2, 3]  # first-sent order; the answered one is not
    assert [m.op for _i, m in again] == [Op.PUSH, Op.PUSH, Op.PULL]
    for ident, m in reversed(again):
        peer.answer(ident, m.id, m.op, m.fields["step"])
    t.join(10)
    assert done[0].fields["version"] == 0  # type: ignore[attr-defined]
    assert [caller.finish(c).fields["version"] for c in calls[2:]] == [2, 3]
    assert caller.resends == 3


def test_a_reply_to_the_first_send_also_answers_the_call(peer, caller):
    c = caller.start(Op.PULL, {"rank": 0, "step": 1}, step=0)
    ((ident, m),) = peer.recv(1)
    peer.restart()
    done: dict[int, object] = {}
    t = threading.Thread(target=lambda: done.setdefault(0, caller.finish(c)))
    t.start()
    ((ident2, m2),) = peer.recv(1, timeout=15)  # sent again on the new connection
    assert m2.id != m.id
    peer.answer(ident2, m.id, Op.PULL, 77)  # e.g. the server answered the first copy after all
    t.join(10)
    assert done[0].fields["version"] == 77  # type: ignore[attr-defined]


THETA = {"w": torch.arange(6, dtype=torch.float64).reshape(2, 3)}


@pytest.fixture
def job(tmp_path):
    procs = Procs(tmp_path)
    try:
        server, endpoint = procs.server(1)
        client = PSClient(endpoint, rank=0, world_size=1, timeout=30, shm="off")
        client.init(THETA)
        yield server, client
        client.close()
    finally:
        procs.cleanup()


def _wait(req: Requester, ids: set[int], timeout: float = 10.0) -> dict[int, object]:
    got: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(got) < len(ids):
        msg = req.receive(0.1)
        if msg is not None and msg.id in ids:
            got[msg.id] = msg
    return got


def test_a_repeated_parked_request_supersedes_the_first_and_others_stay(job):
    server, client = job
    req = client._req
    first = req.send(Op.PULL, {"rank": 0, "step": 1})
    repeat = req.send(Op.PULL, {"rank": 0, "step": 1})  # what a client resends after a reconnect
    other = req.send(Op.PULL, {"rank": 0, "step": 2})  # another request in flight: stays parked
    time.sleep(0.3)
    push = req.send(Op.PUSH, {"rank": 0, "step": 0}, {"w": torch.ones(2, 3, dtype=torch.float64)})
    got = _wait(req, {first, repeat, push})
    assert set(got) == {repeat, push}, got  # the superseded one is never answered
    push2 = req.send(Op.PUSH, {"rank": 0, "step": 1}, {"w": torch.ones(2, 3, dtype=torch.float64)})
    got = _wait(req, {other, push2})
    assert set(got) == {other, push2}
    assert torch.equal(got[other].tensors["w"], THETA["w"] - 0.01 - 0.01)  # θ after both steps (SGD, lr 0.01)  # type: ignore[attr-defined]


def test_a_connection_may_park_only_so_many_requests(job):
    server, client = job
    req = client._req
    cap = 2 * 1 + 16  # one key group
    ids = [req.send(Op.PULL, {"rank": 0, "step": 10 + i}) for i in range(cap)]
    over = req.send(Op.PULL, {"rank": 0, "step": 999})
    got = _wait(req, {over})
    assert got[over].op is Op.ERROR and got[over].fields["code"] == ErrorCode.TOO_LARGE, got  # type: ignore[attr-defined]
    assert "requests waiting" in got[over].fields["message"]  # type: ignore[attr-defined]
    assert not _wait(req, set(ids), timeout=0.5)  # the parked ones are still parked
    assert server.proc.poll() is None
    assert client.ping()["version"] == 0  # a PING is never refused


def test_an_older_copy_of_a_parked_request_never_supersedes_the_newer_one(job):
    """[Note: an older copy never supersedes] in ``ps/parking.py``: a copy of an earlier request that
    arrives after its repeat (delayed, duplicated, or sent to the server's previous process) used
    to take the repeat's place, and the client, waiting for the repeat's answer, got none (the
    nemesis's diloco-async seed 1671: a worker's DONE was answered under an abandoned id)."""
    from common.wire import encode as wire_encode

    server, client = job
    req = client._req
    first = req.send(Op.PULL, {"rank": 0, "step": 1})
    repeat = req.send(Op.PULL, {"rank": 0, "step": 1})
    time.sleep(0.2)
    req.sock.send_multipart(wire_encode(Op.PULL, {"rank": 0, "step": 1}, None, first), copy=False)  # late copy
    time.sleep(0.2)
    push = req.send(Op.PUSH, {"rank": 0, "step": 0}, {"w": torch.ones(2, 3, dtype=torch.float64)})
    got = _wait(req, {first, repeat, push}, timeout=3.0)
    assert set(got) == {repeat, push}, got
    assert server.proc.poll() is None
