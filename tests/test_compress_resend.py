"""A compressed push is encoded once per step: a resend after a lost connection, and the same step
pushed again after a rejoin, carry the same bytes, and the residual advances once. The gradient
segment a same-host worker holds is bypassed. The server is played by the test (``Peer``)."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from common.compression import Compressor
from common.protocol import Op
from tests.test_inflight import Peer, caller, peer  # noqa: F401  (fixtures)
from worker.pieces import Layout, PieceMap
from worker.staging import Stager
from worker.stepio import StepIO

pytestmark = pytest.mark.timeout(60)


def _push(io: StepIO, layout: Layout, g: torch.Tensor) -> None:
    io.begin(layout, 0, step=0, samples=1.0, loss=None, pull=False)
    io.push_bucket(0, {"w": g})


def _finish(io: StepIO, peer: Peer, resend: bool) -> list:
    """Answer the push (after dropping the connection once, with ``resend``); the messages seen."""
    seen = []
    done = threading.Event()
    t = threading.Thread(target=lambda: (io.finish(want_theta=False), done.set()))
    ((ident, m),) = peer.recv(1)
    seen.append(m)
    if resend:
        peer.restart()
        t.start()
        ((ident, m),) = peer.recv(1)
        seen.append(m)
    else:
        t.start()
    peer.answer(ident, m.id, Op.PUSH, 1)
    t.join(10)
    assert done.is_set()
    return seen


def test_resent_and_recomputed_pushes_carry_one_encoding(peer, caller) -> None:  # noqa: F811
    g = torch.arange(12, dtype=torch.float64).reshape(3, 4) - 5.5
    tensors = {"w": g}
    layout = Layout(PieceMap.build(tensors, 1 << 20, 1), [["w"]], frozenset())
    comp = Compressor("topk:0.25")
    shard = SimpleNamespace(caller=caller, grad_seg=object(), theta_seg=None, grad_views={})  # a segment: unused
    io = StepIO([shard], Stager(), SimpleNamespace(bound={}, any=False), None, comp)
    _push(io, layout, g)
    seen = _finish(io, peer, resend=True)
    assert caller.resends == 1
    first = seen[0]
    assert first.fields["compressed"] == [["w", "topk"]] and "grads" not in first.fields
    assert set(first.tensors) == {"w::values", "w::indices"}
    residual = comp.residual("w").clone()
    want = g.reshape(-1).clone()
    want[first.tensors["w::indices"].long()] = 0
    assert torch.equal(residual, want)
    io.reset()  # a rejoin: the step is recomputed and pushed again
    _push(io, layout, g)
    seen += _finish(io, peer, resend=False)
    for m in seen[1:]:
        assert m.fields["compressed"] == first.fields["compressed"]
        assert all(torch.equal(m.tensors[k], first.tensors[k]) for k in first.tensors)
    assert torch.equal(comp.residual("w"), residual)  # advanced once
