"""Bad fast-path input (buckets, shared-memory pushes, partial pushes) gets a typed error,
changes nothing, and the server keeps serving (real server process, raw requests)."""

from __future__ import annotations

import os

import pytest
import torch
import zmq

from common.errors import ErrorCode, RemoteError
from common.protocol import Op
from common.transport import Requester

SPECS = [["a", "float64", [4]], ["b", "float64", [2]]]
THETA = {"a": torch.arange(4.0, dtype=torch.float64), "b": torch.ones(2, dtype=torch.float64)}


def expect(code: ErrorCode, req: Requester, op: Op, fields: dict, tensors: dict | None = None) -> None:
    with pytest.raises(RemoteError) as e:
        req.request(op, fields, tensors, timeout_s=30)
    assert e.value.code == code, e.value


@pytest.mark.timeout(120)
def test_fast_path_bad_input(procs):
    server, ep = procs.server(1, "--lr", "0.5")
    ctx = zmq.Context()
    req = Requester(ctx, ep, who="test")
    try:
        reg = {"rank": 0, "world_size": 1, "params": SPECS}
        expect(ErrorCode.SCHEMA_MISMATCH, req, Op.REGISTER, {**reg, "buckets": [["a"]]})  # b missing
        expect(ErrorCode.SCHEMA_MISMATCH, req, Op.REGISTER, {**reg, "buckets": [["a", "b"], ["b"]]})
        expect(ErrorCode.BAD_MESSAGE, req, Op.REGISTER, {**reg, "buckets": [[1]]})
        r = req.request(Op.REGISTER, {**reg, "buckets": [["a"], ["b"]]}, timeout_s=30)
        assert "shm_grad" not in r.fields  # not asked for
        req.request(Op.INIT, {"rank": 0}, THETA, timeout_s=30)
        push = {"rank": 0, "step": 0}
        # shared-memory gradients without a segment
        expect(ErrorCode.STALE_SEGMENT, req, Op.PUSH, {**push, "grads": ["a"]})
        # a key both sent and named absent, or named absent outside the bucket
        expect(ErrorCode.SCHEMA_MISMATCH, req, Op.PUSH, {**push, "absent": ["a"]}, {"a": THETA["a"]})
        expect(ErrorCode.SCHEMA_MISMATCH, req, Op.PUSH, {**push, "absent": ["zz"]}, {"a": THETA["a"]})
        # frames and shared-memory names at once
        expect(ErrorCode.BAD_MESSAGE, req, Op.PUSH, {**push, "grads": ["a"]}, {"a": THETA["a"]})
        # not a whole bucket / an unknown key / a narrow dtype for an integer-free float θ is fine
        expect(ErrorCode.SCHEMA_MISMATCH, req, Op.PUSH, push, {"a": THETA["a"], "zz": THETA["b"]})
        expect(ErrorCode.SCHEMA_MISMATCH, req, Op.PUSH, push, {"b": THETA["a"]})  # wrong shape
        expect(ErrorCode.SCHEMA_MISMATCH, req, Op.PUSH, push, {})
        # nothing was applied by any of that
        assert req.request(Op.PING, {}, timeout_s=30).fields["version"] == 0
        # a bucket at a time works; the step completes when both are in
        assert req.request(Op.PUSH, push, {"b": torch.full((2,), 2.0, dtype=torch.float64)}, timeout_s=30)
        assert req.request(Op.PING, {}, timeout_s=30).fields["version"] == 0
        req.request(Op.PUSH, push, {"a": torch.ones(4, dtype=torch.float16)}, timeout_s=30)  # narrow wire
        theta = req.request(Op.PULL, {"rank": 0, "step": 1}, timeout_s=30).tensors
        assert torch.equal(theta["a"], THETA["a"] - 0.5)
        assert torch.equal(theta["b"], THETA["b"] - 1.0)
        # a replayed bucket is acknowledged and not applied twice
        assert req.request(Op.PUSH, push, {"b": THETA["b"]}, timeout_s=30).fields["applied"] is False
        assert server.proc.poll() is None
    finally:
        req.close()
        ctx.destroy(0)


@pytest.mark.timeout(120)
def test_copies_of_a_registration_share_one_segment_and_a_push_naming_another_is_refused(procs):
    """[Note: idempotent register]: a worker started before its server sends REGISTER several
    times; every copy gets the same answer (the same gradient segment, nothing allocated), and a
    push naming any other segment is refused with STALE_SEGMENT, naming the rank, changing nothing."""
    server, ep = procs.server(1, "--lr", "0.5")
    ctx = zmq.Context()
    req = Requester(ctx, ep, who="test")
    try:
        reg = {"rank": 0, "world_size": 1, "params": SPECS, "shm": True}
        ids = [req.send(Op.REGISTER, reg) for _ in range(4)]  # as a Caller resends while the server starts
        replies = {}
        while len(replies) < len(ids):
            msg = req.receive(30)
            assert msg is not None and msg.op is Op.REPLY, msg
            replies[msg.id] = msg.fields
        first = replies[ids[0]]
        assert all(r == first for r in replies.values())
        assert first["initialized"] is False
        assert os.path.exists(first["shm_grad"])
        req.request(Op.INIT, {"rank": 0}, THETA, timeout_s=30)
        push = {"rank": 0, "step": 0, "grads": ["a", "b"]}
        err = None
        with pytest.raises(RemoteError) as e:
            req.request(Op.PUSH, {**push, "segment": "00" * 16}, timeout_s=30)
        err = e.value
        assert err.code == ErrorCode.STALE_SEGMENT and "rank 0" in str(err) and first["shm_grad"] in str(err)
        assert req.request(Op.PING, {}, timeout_s=30).fields["version"] == 0
        ok = req.request(Op.PUSH, {**push, "segment": first["shm_grad_token"]}, timeout_s=30)
        assert ok.fields["applied"] is True
        again = req.request(Op.REGISTER, reg, timeout_s=30).fields  # a rejoin: the same segment, θ now there
        assert again == {**first, "initialized": True}
        assert req.request(Op.PING, {}, timeout_s=30).fields["version"] == 1
    finally:
        req.close()
        ctx.destroy(0)


def test_a_closed_segment_stays_mapped_while_a_tensor_views_it(tmp_path):
    """[Note: no early unmap] A push still pending in a key group views the gradient segment of a
    worker that has since restarted (and got a new segment): closing the old one must not unmap
    the memory under that view, nor let the new segment be mapped where the view reads."""
    from common.shm import Segment

    old = Segment.create("g0", 64)
    view = old.views([("w", "float64", (8,))], {"w": 0})["w"]
    view.copy_(torch.arange(8.0, dtype=torch.float64))
    old.close()
    new = Segment.create("g0", 64)  # the restarted worker's, the same size
    new.views([("w", "float64", (8,))], {"w": 0})["w"].fill_(-1.0)
    assert torch.equal(view, torch.arange(8.0, dtype=torch.float64))
    assert not os.path.exists(old.path)
    new.close()
