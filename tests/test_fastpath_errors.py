"""Bad fast-path input (buckets, shared-memory pushes, partial pushes) gets a typed error,
changes nothing, and the server keeps serving (real server process, raw requests)."""

from __future__ import annotations

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
        expect(ErrorCode.BAD_MESSAGE, req, Op.PUSH, {**push, "grads": ["a"]})
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
