"""A server refuses every bad compressed push from a registered worker with a typed error and
changes nothing ([Note: compressed pushes]); hostile variations never fail it internally."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.compression import Encoded, pack
from common.errors import ErrorCode, RemoteError
from common.protocol import Op
from tests.procs import Procs
from worker.client import PSClient

THETA = {"w": torch.arange(6, dtype=torch.float64).reshape(2, 3), "b": torch.tensor([0.5], dtype=torch.float64)}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A server of two workers, both initialized; rank 1 never pushes, so nothing is applied."""
    procs = Procs(tmp_path_factory.mktemp("compressed"))
    clients: list[PSClient] = []
    try:
        _server, endpoint = procs.server(2)
        clients = [PSClient(endpoint, rank=r, world_size=2, timeout=30) for r in range(2)]
        threads = [threading.Thread(target=c.init, args=(THETA,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        yield clients[0]
    finally:
        for c in clients:
            c.close()
        procs.cleanup()


def _push(values=(5.0, -1.0), idx=(1, 4), vdtype=torch.float64, idtype=torch.int32) -> tuple[dict, dict]:
    indices = torch.tensor(idx, dtype=torch.int64).to(idtype)  # hostile dtypes wrap around, as bytes would
    enc = Encoded("topk", {"values": torch.tensor(values, dtype=torch.float64).to(vdtype), "indices": indices})
    field, tensors = pack({"b": torch.ones(1, dtype=torch.float64)}, {"w": enc})
    return {"rank": 0, "step": 0, "samples": 1.0, "compressed": field}, tensors


def _unchanged(client: PSClient) -> None:
    assert client.ping()["version"] == 0
    got = client.pull(step=0)
    assert all(torch.equal(got[k], v) for k, v in THETA.items())


CASES = {
    "values' dtype": lambda: _push(vdtype=torch.float32),
    "indices' dtype": lambda: _push(idtype=torch.float64),
    "index out of range": lambda: _push(idx=(1, 6)),
    "negative index": lambda: _push(idx=(-1, 4)),
    "duplicate index": lambda: _push(idx=(4, 4)),
    "more values than indices": lambda: _push(values=(1.0, 2.0, 3.0)),
    "more entries than the tensor": lambda: _push(values=(1.0,) * 7, idx=tuple(range(7))),
    "unknown codec": lambda: ({**_push()[0], "compressed": [["w", "zip"]]}, _push()[1]),
    "unknown key": lambda: ({**_push()[0], "compressed": [["w", "topk"], ["z", "topk"]]}, _push()[1]),
    "not a list": lambda: ({**_push()[0], "compressed": "w"}, _push()[1]),
    "sent dense too": lambda: (_push()[0], {**_push()[1], "w": torch.zeros(2, 3, dtype=torch.float64)}),
    "missing part": lambda: (_push()[0], {k: v for k, v in _push()[1].items() if k != "w::indices"}),
    "with shared-memory grads": lambda: ({**_push()[0], "grads": ["w"]}, _push()[1]),
    "powersgd factors that do not fit": lambda: _lowrank(torch.ones(2, 1, dtype=torch.float64),
                                                         torch.ones(2, 1, dtype=torch.float64)),
    "powersgd of a vector": lambda: _lowrank(torch.ones(1, 1, dtype=torch.float64),
                                             torch.ones(1, 1, dtype=torch.float64), key="b"),
}


def _lowrank(p: torch.Tensor, q: torch.Tensor, key: str = "w") -> tuple[dict, dict]:
    dense = {k: torch.ones_like(v) for k, v in THETA.items() if k != key}
    field, tensors = pack(dense, {key: Encoded("powersgd", {"p": p, "q": q})})
    return {"rank": 0, "step": 0, "samples": 1.0, "compressed": field}, tensors


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_compressed_push_is_refused_and_changes_nothing(pair: PSClient, case: str) -> None:
    fields, tensors = CASES[case]()
    with pytest.raises(RemoteError) as e:
        pair._req.request(Op.PUSH, fields, tensors, timeout_s=10)
    assert e.value.code in (ErrorCode.BAD_MESSAGE, ErrorCode.SCHEMA_MISMATCH), e.value
    _unchanged(pair)


def test_a_good_powersgd_push_is_taken(pair: PSClient) -> None:
    fields, tensors = _lowrank(torch.ones(2, 1, dtype=torch.float64), torch.ones(3, 1, dtype=torch.float64))
    assert pair._req.request(Op.PUSH, fields, tensors, timeout_s=10).fields["applied"] in (True, False)
    _unchanged(pair)  # rank 1 has not pushed: staged, not applied


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(seed=st.integers(0, 2**32))
def test_hostile_compressed_pushes_never_fail_the_server(pair: PSClient, seed: int) -> None:
    """Random counts, indices, dtypes and codec entries: an error or an acknowledgement, never INTERNAL;
    a valid one is staged (rank 1 never pushes), so θ stays θ_0."""
    rng = random.Random(seed)
    k = rng.choice([0, 1, 2, 6, 7])
    idx = [rng.choice([-2**31, -1, 0, 1, 3, 5, 6, 2**31 - 1]) for _ in range(rng.choice([k, k + 1, max(k - 1, 0)]))]
    if rng.random() < 0.5:
        idx = sorted(set(i for i in idx if 0 <= i < 6))
        k = len(idx) if rng.random() < 0.8 else k
    fields, tensors = _push(values=[rng.uniform(-1, 1) for _ in range(k)], idx=idx,
                            vdtype=rng.choice([torch.float64, torch.float64, torch.float32, torch.int64]),
                            idtype=rng.choice([torch.int32, torch.int64, torch.int16, torch.uint8, torch.float32]))
    if rng.random() < 0.2:
        fields["compressed"] = rng.choice([[["w", "topk"], ["b", "topk"]], [["w", 1]], [[]], [["w", "topk", 3]],
                                           [["b", "topk"]], None, {}])
    try:
        reply = pair._req.request(Op.PUSH, fields, tensors, timeout_s=10)
        assert reply.fields["applied"] in (True, False)
    except RemoteError as e:
        assert e.code is not ErrorCode.INTERNAL, e
    _unchanged(pair)
