"""Garbage never kills the server: it answers with an error and θ does not change.

One real server process; a legitimate worker (rank 0 of 1) initializes θ, then a raw DEALER
socket throws generated messages at it (random frames, random msgpack, near-valid headers
with wrong sizes, unknown ops and dtypes, huge declared shapes). Afterwards the server still
answers and θ and its version are exactly what they were.
"""

from __future__ import annotations

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.errors import ErrorCode, RemoteError
from common.protocol import Op
from common.wire import decode, encode
from tests.procs import Procs
from worker.client import PSClient

THETA = {"w": torch.arange(6, dtype=torch.float64).reshape(2, 3), "b": torch.tensor([0.5], dtype=torch.float64)}

scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True),
                   st.text(max_size=20), st.binary(max_size=20))
value = st.recursive(scalar, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                     max_leaves=12)
dtype = st.sampled_from(["float32", "float64", "bfloat16", "int8", "bool", "uint8", "float128", "complex64", "", 7])
shape = st.lists(st.integers(-3, 2**40), max_size=5) | st.sampled_from([[2, 3], [1], [], [2**62, 2**62]])
spec = st.tuples(st.sampled_from(["w", "b", "x", "", "w" * 2000]), dtype, shape).map(list)
OPS = [op.value for op in Op if op is not Op.DONE] + ["steal", "", "PUSH"]


@st.composite
def near_valid(draw) -> list[bytes]:
    header = {"v": draw(st.sampled_from([1, 1, 1, 2, "1", None])), "op": draw(st.sampled_from(OPS)),
              "id": draw(st.integers(-1, 2**64 - 1))}
    for name in draw(st.lists(st.sampled_from(["rank", "step", "samples", "loss", "keys", "params",
                                               "world_size", "micro", "stage", "code", "message"]), max_size=5)):
        header[name] = draw(value)
    if draw(st.booleans()):
        header["rank"] = draw(st.sampled_from([0, 1, -1, 2**40]))
    specs = draw(st.lists(spec, max_size=3))
    header["tensors"] = specs
    frames = [msgpack.packb(header, use_bin_type=True)]
    n = len(specs) + draw(st.sampled_from([0, 0, 0, -1, 1]))
    frames += [draw(st.binary(max_size=64)) for _ in range(max(n, 0))]
    return frames


garbage = st.one_of(
    st.lists(st.binary(max_size=200), min_size=1, max_size=4),
    st.builds(lambda v: [msgpack.packb(v, use_bin_type=True)], value),
    near_valid(),
)


@pytest.fixture(scope="module")
def live_server(tmp_path_factory):
    procs = Procs(tmp_path_factory.mktemp("garbage"))
    try:
        server, endpoint = procs.server(1)
        client = PSClient(endpoint, rank=0, world_size=1, timeout=30)
        client.init(THETA)
        yield server, endpoint, client
        client.close()
    finally:
        procs.cleanup()


def _theta(client: PSClient) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in client.pull(step=0).items()}


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=garbage)
def test_garbage_gets_an_error_and_changes_nothing(live_server, frames) -> None:
    server, endpoint, client = live_server
    ctx = zmq.Context.instance()
    sock = getattr(test_garbage_gets_an_error_and_changes_nothing, "_sock", None)
    if sock is None:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        test_garbage_gets_an_error_and_changes_nothing._sock = sock  # type: ignore[attr-defined]
    sock.send_multipart(frames)
    if sock.poll(5000):
        reply = decode(sock.recv_multipart())
        assert reply.op in (Op.ERROR, Op.REPLY)
    assert server.proc.poll() is None, server.output()


def test_after_the_garbage_theta_and_version_are_unchanged(live_server) -> None:
    server, endpoint, client = live_server
    assert server.proc.poll() is None, server.output()
    status = client.ping()
    assert status["version"] == 0
    got = _theta(client)
    for k, v in THETA.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("case,code", [
    ("wrong shape", ErrorCode.SCHEMA_MISMATCH),
    ("wrong dtype", ErrorCode.SCHEMA_MISMATCH),
    ("missing key", ErrorCode.SCHEMA_MISMATCH),
    ("extra key", ErrorCode.SCHEMA_MISMATCH),
    ("future step", ErrorCode.BAD_STEP),
    ("unregistered rank", ErrorCode.NOT_REGISTERED),
    ("negative samples", ErrorCode.BAD_MESSAGE),
    ("infinite samples", ErrorCode.BAD_MESSAGE),
    ("non-positive total", ErrorCode.BAD_MESSAGE),
    ("total without samples", ErrorCode.BAD_MESSAGE),
])
def test_semantic_errors_are_typed_and_change_nothing(live_server, case, code) -> None:
    server, endpoint, client = live_server
    grads = {k: torch.ones_like(v) for k, v in THETA.items()}
    fields = {"rank": 0, "step": 0}
    if case == "wrong shape":
        grads["w"] = torch.ones(3, 2, dtype=torch.float64)
    elif case == "wrong dtype":
        grads["w"] = grads["w"].float()
    elif case == "missing key":
        del grads["b"]
    elif case == "extra key":
        grads["z"] = torch.ones(1, dtype=torch.float64)
    elif case == "future step":
        fields["step"] = 5
    elif case == "unregistered rank":
        fields["rank"] = 7
    elif case == "negative samples":
        fields["samples"] = -1.0
    elif case == "infinite samples":
        fields["samples"] = float("inf")
    elif case == "non-positive total":
        fields.update(samples=1.0, total=0.0)
    elif case == "total without samples":
        fields["total"] = 2.0
    with pytest.raises(RemoteError) as e:
        client._req.request(Op.PUSH, fields, grads, timeout_s=10)
    assert e.value.code is code, e.value
    assert client.ping()["version"] == 0
    got = _theta(client)
    assert all(torch.equal(got[k], v) for k, v in THETA.items())


def test_oversized_frame_is_dropped_by_zmq_and_server_lives(tmp_path) -> None:
    procs = Procs(tmp_path)
    try:
        server, endpoint = procs.server(1, "--max-frame-mb", "1")
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send_multipart(encode(Op.PUSH, {"rank": 0, "step": 0}, {"g": torch.zeros(1 << 19)}))  # 2 MiB
        assert not sock.poll(1000), "a frame over ZMQ_MAXMSGSIZE must never reach the handler"
        sock.close()
        with PSClient(endpoint, 0, 1, timeout=20) as client:
            client.init(THETA)
            assert client.ping()["version"] == 0
        assert server.proc.poll() is None
    finally:
        procs.cleanup()
