"""Peer links over real ZeroMQ sockets (in one process): self-describing messages, early
arrivals, and every way a neighbour can go wrong surfacing as a typed error within the timeout."""

from __future__ import annotations

import re
import time

import pytest
import torch
import zmq
from torch import nn

from common.errors import PSTimeoutError, StageError, StageTimeoutError
from common.protocol import Op
from common.wire import encode
from worker.pipeline.links import Neighbour, PeerLinks, Place
from worker.pipeline.packing import PackError, flatten, unflatten
from worker.pipeline.schedule import gpipe
from worker.pipeline.stage import StageExecutor
from worker.pipeline.staging import PinnedStager

BIND = "tcp://127.0.0.1:0"


@pytest.fixture
def pair(zctx):
    """Stage 0 and stage 1 of a two-stage pipeline, linked (timeout 0.5 s)."""
    s0 = PeerLinks(zctx, Place(0, 2, 0, 0), BIND, None, 0.5, 4)
    s1 = PeerLinks(zctx, Place(1, 2, 0, 1), BIND, None, 0.5, 4)
    s0.connect(None, Neighbour(1, 1, s1.endpoint))
    s1.connect(Neighbour(0, 0, s0.endpoint), None)
    try:
        yield s0, s1
    finally:
        s0.close()
        s1.close()


def test_tensors_cross_with_their_own_dtype_and_shape_in_any_order(pair):
    s0, s1 = pair
    s1.begin_step(0, 2)
    a = (torch.randn(3, 5, dtype=torch.float64), torch.arange(3))
    b = (torch.randn(2, 5, dtype=torch.float64), torch.arange(2))
    s0.send(Op.ACTIVATION, 0, 1, *flatten(b))  # microbatch 1 first: it waits in the inbox
    s0.send(Op.ACTIVATION, 0, 0, *flatten(a))
    got0 = s1.recv(Op.ACTIVATION, 0, 0, "1F0")
    got1 = s1.recv(Op.ACTIVATION, 0, 1, "1F1")
    for got, want in ((got0, a), (got1, b)):
        value = unflatten(got.pack, got.tensors)
        assert isinstance(value, tuple) and len(value) == 2
        assert value[0].dtype == torch.float64 and value[1].dtype == torch.int64
        assert torch.equal(value[0], want[0]) and torch.equal(value[1], want[1])
    s0.begin_step(0, 2)
    s1.send(Op.GRADIENT, 0, 0, "tuple", {"0": torch.ones(3, 5, dtype=torch.float64)})
    assert torch.equal(s0.recv(Op.GRADIENT, 0, 0, "0B0").tensors["0"], torch.ones(3, 5, dtype=torch.float64))


def test_a_silent_neighbour_is_a_typed_timeout_naming_stage_microbatch_and_action(pair):
    _, s1 = pair
    s1.begin_step(4, 2)
    t0 = time.monotonic()
    with pytest.raises(StageTimeoutError) as info:
        s1.recv(Op.ACTIVATION, 4, 1, "1F1")
    assert time.monotonic() - t0 < 5
    msg = str(info.value)
    assert "stage 1 (rank 1), step 4, microbatch 1, action 1F1" in msg
    assert "no activation from stage 0 (rank 0" in msg
    assert isinstance(info.value, PSTimeoutError) and isinstance(info.value, TimeoutError)
    assert (info.value.stage, info.value.micro, info.value.action) == (1, 1, "1F1")


def test_an_abort_from_a_neighbour_stops_the_wait_at_once(pair):
    s0, s1 = pair
    s1.begin_step(0, 4)
    s0.abort("RuntimeError: out of memory", 0, 2, "0F2")
    with pytest.raises(StageError, match=r"action 1F0: stage 0 \(rank 0\) failed at step 0 action 0F2: "
                                         r"RuntimeError: out of memory"):
        s1.recv(Op.ACTIVATION, 0, 0, "1F0")


def test_messages_from_strangers_twice_or_out_of_time_are_rejected(zctx, pair):
    s0, s1 = pair
    stranger = PeerLinks(zctx, Place(0, 2, 2, 4), BIND, None, 0.5, 4)  # stage 0 of replica 2
    stranger.connect(None, Neighbour(1, 1, s1.endpoint))
    try:
        s1.begin_step(0, 2)
        stranger.send(Op.ACTIVATION, 0, 0, "tensor", {"0": torch.zeros(1)})
        with pytest.raises(StageError, match=r"from stage 0 \(rank 4\), but it may come only from stage 0 \(rank 0"):
            s1.recv(Op.ACTIVATION, 0, 0, "1F0")
    finally:
        stranger.close()
    s0.send(Op.ACTIVATION, 0, 1, "tensor", {"0": torch.zeros(1)})
    s0.send(Op.ACTIVATION, 0, 1, "tensor", {"0": torch.zeros(1)})
    with pytest.raises(StageError, match="microbatch 1 from stage 0 .* arrived twice"):
        s1.recv(Op.ACTIVATION, 0, 0, "1F0")
    s0.send(Op.ACTIVATION, 7, 0, "tensor", {"0": torch.zeros(1)})
    with pytest.raises(StageError, match="step 7 .* cannot come now"):
        s1.recv(Op.ACTIVATION, 0, 0, "1F0")
    s0.send(Op.ACTIVATION, 0, 2, "tensor", {"0": torch.zeros(1)})  # this step has only 2 microbatches
    with pytest.raises(StageError, match="microbatch 2 .* cannot come now"):
        s1.recv(Op.ACTIVATION, 0, 0, "1F0")


def test_a_malformed_message_is_a_typed_error(zctx, pair):
    _, s1 = pair
    s1.begin_step(0, 1)
    raw = zctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(s1.endpoint)
    try:
        frames = encode(Op.ACTIVATION, {"stage": 0, "rank": 0, "step": 0, "micro": 0},
                        {"0": torch.zeros(4, dtype=torch.float64)})
        raw.send_multipart([frames[0], b"\0" * 7])  # 7 bytes for a tensor that needs 32
        with pytest.raises(StageError, match="action 1F0: bad message from a neighbour: BAD_TENSOR"):
            s1.recv(Op.ACTIVATION, 0, 0, "1F0")
    finally:
        raw.close()


@pytest.mark.parametrize("delta,expect", [
    (torch.zeros(4, 4, dtype=torch.float64), r"'0': float64\[4, 4\]"),
    (torch.zeros(4, 5, dtype=torch.float32), r"'0': float32\[4, 5\]"),
])
def test_a_delta_that_does_not_match_the_sent_activation_is_a_typed_error(pair, delta, expect):
    s0, s1 = pair
    ex = StageExecutor(nn.Linear(10, 5).double(), s0.me, s0, PinnedStager(torch.device("cpu")),
                       nn.functional.mse_loss, torch.device("cpu"))
    s1.send(Op.GRADIENT, 0, 0, "tensor", {"0": delta})  # early: waits in stage 0's inbox
    with pytest.raises(StageError) as info:
        ex.run(0, gpipe(2, 1).for_stage(0), [torch.randn(4, 10, dtype=torch.float64)], None, [4])
    msg = str(info.value)
    assert "stage 0 (rank 0), step 0, microbatch 0, action 0B0" in msg
    assert "δ from stage 1 does not match the activation this stage sent: expected '0': float64[4, 5]" in msg
    assert re.search(expect, msg)
    # The activation did go out, self-described: float64 [4, 5].
    got = s1.recv(Op.ACTIVATION, 0, 0, "1F0")
    assert got.pack == "tensor" and got.tensors["0"].shape == (4, 5)


def test_packing_rejects_what_cannot_cross():
    assert unflatten(*flatten({"h": torch.zeros(2), "m": torch.ones(1)})).keys() == {"h", "m"}
    assert isinstance(unflatten(*flatten([torch.zeros(1), torch.zeros(2)])), list)
    for bad in ((torch.zeros(1), 3), ((torch.zeros(1),),), (), {1: torch.zeros(1)}, "text"):
        with pytest.raises(PackError):
            flatten(bad)
    with pytest.raises(PackError, match="needs tensors named 0..1"):
        unflatten("tuple", {"1": torch.zeros(1), "0": torch.zeros(1)})
    with pytest.raises(PackError, match="unknown pack"):
        unflatten("set", {"0": torch.zeros(1)})


def test_cpu_staging_is_zero_copy():
    stager = PinnedStager(torch.device("cpu"))
    t = torch.randn(3, 4)
    assert stager.to_host({"0": t})["0"].data_ptr() == t.data_ptr()
    assert stager.to_device({"0": t})["0"] is t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_staging_goes_through_reused_pinned_buffers(zctx, pair):
    s0, s1 = pair
    stager = PinnedStager(torch.device("cuda"))
    x = torch.randn(256, 64, device="cuda", dtype=torch.float64)  # 128 KiB: over zmq.COPY_THRESHOLD, really tracked
    host = stager.to_host({"0": x})
    assert host["0"].is_pinned() and host["0"].device.type == "cpu" and torch.equal(host["0"].cuda(), x)
    s1.begin_step(0, 1)
    stager.track(s0.send(Op.ACTIVATION, 0, 0, "tensor", host, track=True))
    got = s1.recv(Op.ACTIVATION, 0, 0, "1F0")
    back = PinnedStager(torch.device("cuda")).to_device(got.tensors)["0"]
    torch.cuda.synchronize()
    assert back.device.type == "cuda" and torch.equal(back, x)
    for _ in range(5):  # once ZeroMQ released the send, the same pinned buffer is used again
        stager.track(s0.send(Op.ACTIVATION, 0, 0, "tensor", stager.to_host({"0": x}), track=True))
        time.sleep(0.05)
    assert stager.allocated <= 2
