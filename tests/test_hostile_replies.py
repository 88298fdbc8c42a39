"""A worker checks θ from a server whole before it uses any ([Note: checked replies] in ``worker.replies``).

A real client against a hostile server played by the test (a ZeroMQ ROUTER,
``tests.test_inflight.Peer``): an INIT reply (θ_0) or a ``PSClient.pull`` reply missing a key
or a piece, with a key it did not ask for, of a wrong shape or dtype, with changed entries or
shared memory it did not ask for, is a PSError naming the key and the server, and nothing of
it reaches the caller's tensors or module. The step's PULL/PUSH_PULL replies get the same check
(``tests/test_sparse_pulls.py``)."""

from __future__ import annotations

import threading
from typing import Any, Callable

import pytest
import torch
from torch import nn

from common.errors import PSError
from common.protocol import Op
from common.wire import Message
from tests.test_inflight import Answer, Peer, peer  # noqa: F401  (fixture)
from tests.test_sparse_pulls import INITIALIZED, REGISTERED
from worker.client import PSClient
from worker.pieces import PieceMap
from worker.replies import check_theta

pytestmark = pytest.mark.timeout(120)

CHUNK_MB = 48 / (1 << 20)  # 48 bytes: w (6 x 4 float32) goes as two pieces of 3 rows
F32, F64, I64 = torch.float32, torch.float64, torch.int64


class Tiny(nn.Module):
    """Two float32 parameters and an int64 buffer (as BatchNorm's ``num_batches_tracked``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.arange(24, dtype=F32).reshape(6, 4))
        self.b = nn.Parameter(torch.tensor([0.5, -1.0, 2.0]))
        self.register_buffer("n", torch.tensor(7, dtype=I64))


THETA0 = {k: v.detach().clone() for k, v in Tiny().state_dict().items()}
SERVER = {k: v + 100 for k, v in THETA0.items()}  # θ as the server holds it (not the worker's offer)
PIECES = PieceMap.build(THETA0, int(CHUNK_MB * (1 << 20)), 1)
W0, W1 = (p.key for p in PIECES.pieces["w"])


def _frames(theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``theta`` as a server sends it: one frame per piece key."""
    return {p.key: p.of(theta[p.base]).clone() for plist in PIECES.pieces.values() for p in plist}


def _without(key: str) -> dict[str, torch.Tensor]:
    return {k: t for k, t in _frames(SERVER).items() if k != key}


def _with(**extra: torch.Tensor) -> dict[str, torch.Tensor]:
    return {**_frames(SERVER), **extra}


# name -> (the reply's extra fields, its frames, the key the error must name)
BAD: dict[str, tuple[dict[str, Any], dict[str, torch.Tensor], str]] = {
    "a missing key": ({}, _without("b"), "b"),
    "a missing piece": ({}, _without(W1), W1),
    "a missing buffer": ({}, _without("n"), "n"),
    "an extra key": ({}, _with(z=torch.zeros(3)), "z"),
    "a stray part": ({}, _with(**{"b::values": torch.zeros(1)}), "b::values"),
    "a wrong shape": ({}, _with(b=torch.zeros(4)), "b"),
    "a piece of the whole tensor's shape": ({}, _with(**{W0: torch.zeros(6, 4)}), W0),
    "a float64 frame for a float32 parameter": ({}, _with(b=torch.zeros(3, dtype=F64)), "b"),
    "an int tensor for a float parameter": ({}, _with(b=torch.zeros(3, dtype=I64)), "b"),
    "a float for an int buffer": ({}, _with(n=torch.tensor(7.0)), "n"),
    "changed entries not asked for": ({"sparse": ["b"]},
                                      {**_without("b"), "b::indices": torch.tensor([1], dtype=torch.int32),
                                       "b::values": torch.tensor([9.0])}, "b"),
    "shared memory not asked for": ({"shm": True}, {}, W0),
}


def _against(peer: Peer, work: Callable[[PSClient], None], answers: dict[Op, Answer],  # noqa: F811
             timeout: float = 30.0) -> BaseException | None:
    """Run ``work`` with a real client (frames, no heartbeat, ``w`` in two pieces) against ``peer``
    answering with ``answers``; what it raised, if anything."""
    out: dict[str, BaseException] = {}

    def run() -> None:
        client = PSClient(peer.endpoint, 0, 1, timeout=timeout, heartbeat=0, shm="off", chunk_mb=CHUNK_MB)
        try:
            work(client)
        except BaseException as e:  # the test's thread looks at it
            out["error"] = e
        finally:
            client.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    peer.serve({Op.REGISTER: lambda m: (REGISTERED, {}), **answers}, t, timeout)
    assert not t.is_alive(), "the client did not finish"
    return out.get("error")


def _refused(error: BaseException | None, key: str, peer: Peer) -> None:  # noqa: F811
    assert isinstance(error, PSError), error
    assert repr(key) in str(error) and peer.endpoint in str(error), str(error)


def test_a_good_init_reply_in_pieces_is_theta_whole(peer) -> None:  # noqa: F811
    got: dict[str, torch.Tensor] = {}
    error = _against(peer, lambda c: got.update(c.init({k: v.clone() for k, v in THETA0.items()})),
                     {Op.INIT: lambda m: (INITIALIZED, _frames(SERVER))})
    assert error is None
    assert got.keys() == SERVER.keys() and all(torch.equal(got[k], v) and got[k].dtype == v.dtype
                                               for k, v in SERVER.items())


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_init_reply_is_a_ps_error_naming_the_key(peer, case: str) -> None:  # noqa: F811
    fields, frames, key = BAD[case]
    got: dict[str, torch.Tensor] = {}
    error = _against(peer, lambda c: got.update(c.init({k: v.clone() for k, v in THETA0.items()})),
                     {Op.INIT: lambda m: ({**INITIALIZED, **fields}, frames)})
    _refused(error, key, peer)
    assert not got  # no θ at all, never one with uninitialised memory where a piece was missing


@pytest.mark.parametrize("case", ["a missing piece", "a float64 frame for a float32 parameter"])
def test_a_bad_init_reply_leaves_the_module_as_it_was(peer, case: str) -> None:  # noqa: F811
    fields, frames, key = BAD[case]
    model = Tiny()

    def work(c: PSClient) -> None:
        model.load_state_dict(c.init(model))

    error = _against(peer, work, {Op.INIT: lambda m: ({**INITIALIZED, **fields}, frames)})
    _refused(error, key, peer)
    for k, v in model.state_dict().items():
        assert torch.equal(v, THETA0[k]), k


def _pull_into(params: dict[str, torch.Tensor]) -> Callable[[PSClient], None]:
    def work(c: PSClient) -> None:
        c.init({k: v.clone() for k, v in THETA0.items()})
        c.pull_into(params)
    return work


def test_a_good_pull_reply_in_pieces_is_loaded_whole(peer) -> None:  # noqa: F811
    params = {k: v.clone() for k, v in THETA0.items()}
    error = _against(peer, _pull_into(params), {Op.INIT: lambda m: (INITIALIZED, _frames(THETA0)),
                                                Op.PULL: lambda m: ({"version": 0, "loss": None}, _frames(SERVER))})
    assert error is None
    assert all(torch.equal(params[k], v) for k, v in SERVER.items())


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_pull_reply_is_a_ps_error_naming_the_key_and_loads_nothing(peer, case: str) -> None:  # noqa: F811
    fields, frames, key = BAD[case]
    params = {k: v.clone() for k, v in THETA0.items()}
    error = _against(peer, _pull_into(params), {Op.INIT: lambda m: (INITIALIZED, _frames(THETA0)),
                                                Op.PULL: lambda m: ({"version": 0, "loss": None, **fields}, frames)})
    _refused(error, key, peer)
    for k, v in THETA0.items():  # the good keys of the reply were not loaded either
        assert torch.equal(params[k], v), k


def test_a_key_of_this_worker_it_did_not_ask_this_server_for_is_refused() -> None:
    """A bucket's PULL asks for some keys, and another shard owns others: θ of any other key of
    the worker is as bad as θ of no key at all."""
    reply = Message(Op.REPLY, 1, {"version": 0, "loss": None}, {"b": SERVER["b"].clone(), "n": SERVER["n"].clone()})
    with pytest.raises(PSError, match="'n'.*did not ask this server for"):
        check_theta(reply, PIECES, ["b"], "worker 0", "tcp://x:1")
    assert check_theta(reply, PIECES, ["b", "n"], "worker 0", "tcp://x:1").whole.keys() == {"b", "n"}
