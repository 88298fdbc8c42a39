"""Zero-copy sends of θ and copy on write: a message still in flight keeps the θ it was sent with.

``send_multipart(track=True)`` tracks only the last frame, and a small last frame (a bias) is
copied and reports done at once; ``common.transport.send_zero_copy`` tracks every frame. Over
inproc the receiver's frames are the sender's memory, so a write into θ before the receiver
reads shows up in what it reads unless the store cloned θ first.
"""

from __future__ import annotations

import pytest
import torch
import zmq

from common.config import ServerConfig
from common.protocol import Op
from common.transport import send_zero_copy
from common.wire import decode, encode
from ps.store import ParameterStore

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pair():
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind("inproc://tracking")
    push = ctx.socket(zmq.PUSH)
    push.connect("inproc://tracking")
    yield push, pull
    push.close(0)
    pull.close(0)
    ctx.term()


def _store() -> ParameterStore:
    st = ParameterStore(ServerConfig(workers=1, optimizer="sgd", lr=1.0))
    st.initialize({"w": torch.zeros(1 << 20, dtype=torch.float64), "b": torch.zeros(1, dtype=torch.float64)})
    return st


def _send_theta_then_update(push, pull, tracked: bool) -> torch.Tensor:
    st = _store()
    keys = ("w", "b")
    frames = encode(Op.REPLY, None, st.view(keys))
    if tracked:
        tracker = send_zero_copy(push, frames)
    else:
        tracker = push.send_multipart(frames, copy=False, track=True)
    st.track(keys, tracker)
    st.apply({k: torch.ones_like(p) for k, p in st.params.items()})  # θ ← θ - 1 while the reply is unread
    got = decode(pull.recv_multipart(copy=False)).tensors["w"].clone()
    assert torch.equal(st.params["w"], torch.full_like(got, -1.0))
    return got


def test_the_combined_tracker_waits_for_every_frame(pair):
    push, pull = pair
    big, small = torch.zeros(1 << 18).numpy(), b"tail"
    t = send_zero_copy(push, [memoryview(big), small])
    assert not t.done  # the big frame is queued, unread
    last_only = push.send_multipart([memoryview(big), small], copy=False, track=True)
    assert last_only.done  # pyzmq's own tracker: the copied tail only, done at once
    pull.recv_multipart()
    pull.recv_multipart()
    t.wait(10)
    assert t.done


def test_a_reply_in_flight_keeps_the_theta_it_was_sent_with(pair):
    push, pull = pair
    got = _send_theta_then_update(push, pull, tracked=True)
    assert torch.equal(got, torch.zeros_like(got))


def test_tracking_the_last_frame_only_lets_the_update_tear_the_reply(pair):
    push, pull = pair
    got = _send_theta_then_update(push, pull, tracked=False)
    assert torch.equal(got, torch.full_like(got, -1.0))  # the bug this guards against
