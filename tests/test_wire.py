"""The wire codec: round trips for every dtype and odd shape; every validation rule."""

from __future__ import annotations

import msgpack
import pytest
import torch

from common import PROTOCOL_VERSION
from common.dtypes import WIRE_DTYPES
from common.errors import ErrorCode, ProtocolError
from common.protocol import Op
from common.wire import WireLimits, decode, encode

SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (2, 3), (4, 1, 5), (70000,)]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, dtype=dtype)


@pytest.mark.parametrize("name", sorted(WIRE_DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_every_dtype_and_shape(name: str, shape: tuple[int, ...]) -> None:
    t = _sample(WIRE_DTYPES[name], shape)
    msg = decode(encode(Op.PUSH, {"rank": 0, "step": 3}, {"g": t}, req_id=9))
    assert msg.op is Op.PUSH and msg.id == 9 and msg.fields == {"rank": 0, "step": 3}
    out = msg.tensors["g"]
    assert out.dtype == t.dtype and out.shape == t.shape
    assert torch.equal(out, t)


def test_bfloat16_travels_as_its_bit_pattern() -> None:
    t = torch.tensor([1.0, -2.5, 3.140625, float("inf")], dtype=torch.bfloat16)
    frames = encode(Op.PUSH, {"rank": 0, "step": 0}, {"x": t})
    assert bytes(frames[1]) == t.view(torch.int16).numpy().tobytes()
    assert torch.equal(decode(frames).tensors["x"].view(torch.int16), t.view(torch.int16))


def test_non_contiguous_and_many_tensors_keep_order() -> None:
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    tensors = {"t": base.t(), "s": base[:, ::2], "z": torch.zeros(())}
    msg = decode(encode(Op.PUSH, {"rank": 1, "step": 0}, tensors))
    assert list(msg.tensors) == ["t", "s", "z"]
    for k, v in tensors.items():
        assert torch.equal(msg.tensors[k], v)


def test_large_frames_are_views_of_the_tensor_not_copies() -> None:
    t = torch.randn(1 << 16)
    frames = encode(Op.PUSH, {"rank": 0, "step": 0}, {"g": t})
    t[0] = 42.0  # the frame must see this: it is the tensor's own memory
    assert decode(frames).tensors["g"][0].item() == 42.0


def test_received_tensor_views_the_frame() -> None:
    frames = encode(Op.PUSH, {"rank": 0, "step": 0}, {"g": torch.zeros(4)})
    buf = bytearray(bytes(frames[1]))
    frames[1] = buf
    out = decode(frames).tensors["g"]
    buf[0:4] = torch.tensor([7.0]).numpy().tobytes()
    assert out[0].item() == 7.0


def test_cuda_tensor_must_be_staged_first() -> None:
    t = torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match="staged"):
        encode(Op.PUSH, {"rank": 0, "step": 0}, {"g": t})


def test_dtype_outside_the_list_cannot_be_sent() -> None:
    with pytest.raises(ProtocolError) as e:
        encode(Op.PUSH, {"rank": 0, "step": 0}, {"g": torch.zeros(2, dtype=torch.complex64)})
    assert e.value.code is ErrorCode.BAD_TENSOR


# ------------------------------------------------------------------------- rejections
def _header(**over):
    h = {"v": PROTOCOL_VERSION, "op": "push", "id": 1, "rank": 0, "step": 0, "tensors": [["g", "float32", [2]]]}
    h.update(over)
    return {k: v for k, v in h.items() if v is not ...}


def _frames(header, *payload):
    return [msgpack.packb(header), *payload]


GOOD = bytes(8)

REJECTIONS = [
    ("empty", [], ErrorCode.BAD_MESSAGE),
    ("not msgpack", [b"\xc1\xff\x00"], ErrorCode.BAD_MESSAGE),
    ("not a map", [msgpack.packb([1, 2])], ErrorCode.BAD_MESSAGE),
    ("wrong version", _frames(_header(v=99), GOOD), ErrorCode.BAD_VERSION),
    ("no version", _frames(_header(v=...), GOOD), ErrorCode.BAD_VERSION),
    ("unknown op", _frames(_header(op="steal"), GOOD), ErrorCode.UNKNOWN_OP),
    ("op not a string", _frames(_header(op=3), GOOD), ErrorCode.UNKNOWN_OP),
    ("bad id", _frames(_header(id=-1), GOOD), ErrorCode.BAD_MESSAGE),
    ("bad version keeps its id", _frames(_header(v=2, id=77), GOOD), ErrorCode.BAD_VERSION),
    ("missing field", _frames(_header(step=...), GOOD), ErrorCode.BAD_MESSAGE),
    ("field of wrong type", _frames(_header(step="3"), GOOD), ErrorCode.BAD_MESSAGE),
    ("bool is not int", _frames(_header(rank=True), GOOD), ErrorCode.BAD_MESSAGE),
    ("unknown field", _frames(_header(evil=1), GOOD), ErrorCode.BAD_MESSAGE),
    ("non-finite number", _frames(_header(loss=float("nan")), GOOD), ErrorCode.BAD_MESSAGE),
    ("unknown dtype", _frames(_header(tensors=[["g", "float128", [2]]]), GOOD), ErrorCode.BAD_TENSOR),
    ("negative dim", _frames(_header(tensors=[["g", "float32", [-2]]]), GOOD), ErrorCode.BAD_TENSOR),
    ("shape not ints", _frames(_header(tensors=[["g", "float32", [2.0]]]), GOOD), ErrorCode.BAD_TENSOR),
    ("too many dims", _frames(_header(tensors=[["g", "float32", [1] * 17]]), bytes(4)), ErrorCode.BAD_TENSOR),
    ("duplicate name", _frames(_header(tensors=[["g", "float32", [1]], ["g", "float32", [1]]]), bytes(4), bytes(4)),
     ErrorCode.BAD_TENSOR),
    ("spec not a triple", _frames(_header(tensors=[["g", "float32"]]), GOOD), ErrorCode.BAD_TENSOR),
    ("frame too short", _frames(_header(), bytes(7)), ErrorCode.BAD_TENSOR),
    ("frame too long", _frames(_header(), bytes(9)), ErrorCode.BAD_TENSOR),
    ("huge declared shape", _frames(_header(tensors=[["g", "float64", [2**40, 2**40]]]), GOOD), ErrorCode.BAD_TENSOR),
    ("zero-sized but absurd shape", _frames(_header(tensors=[["g", "float32", [0, 2**63]]])), ErrorCode.BAD_TENSOR),
    ("absurd shape with a zero", _frames(_header(tensors=[["g", "float32", [2**31, 2**31, 0]]])),
     ErrorCode.BAD_TENSOR),
    ("dtype not a string", _frames(_header(tensors=[["g", ["float32"], [2]]]), GOOD), ErrorCode.BAD_TENSOR),
    ("missing frame", _frames(_header()), ErrorCode.BAD_MESSAGE),
    ("extra frame", _frames(_header(), GOOD, GOOD), ErrorCode.BAD_MESSAGE),
    ("bool bytes not 0/1", _frames(_header(tensors=[["b", "bool", [2]]]), b"\x01\x07"), ErrorCode.BAD_TENSOR),
    ("extension type", [msgpack.packb({"v": 1, "op": "ping", "id": 1, "x": msgpack.ExtType(5, b"boom")})],
     ErrorCode.BAD_MESSAGE),
    ("binary value", [msgpack.packb({"v": 1, "op": "ping", "id": 1, "rank": b"\x00"}, use_bin_type=True)],
     ErrorCode.BAD_MESSAGE),
    ("non-string key", [msgpack.packb({"v": 1, "op": "reply", "id": 1, "x": {1: 2}})],
     ErrorCode.BAD_MESSAGE),
    ("deep nesting", [msgpack.packb({"v": 1, "op": "reply", "id": 1, "x": [[[[[[[[[[1]]]]]]]]]]})],
     ErrorCode.BAD_MESSAGE),
]


@pytest.mark.parametrize("frames,code", [(f, c) for _, f, c in REJECTIONS], ids=[n for n, _, _ in REJECTIONS])
def test_each_rule_rejects_with_its_code(frames, code) -> None:
    with pytest.raises(ProtocolError) as e:
        decode(frames)
    assert e.value.code is code


def test_error_keeps_the_request_id_for_the_reply() -> None:
    with pytest.raises(ProtocolError) as e:
        decode(_frames(_header(id=77, step="x"), GOOD))
    assert e.value.req_id == 77


def test_size_caps() -> None:
    limits = WireLimits(max_header_bytes=64, max_message_bytes=100, max_tensors=2)
    with pytest.raises(ProtocolError) as e:
        decode([msgpack.packb({"v": 1, "op": "ping", "id": 1, "pad": "x" * 100})], limits)
    assert e.value.code is ErrorCode.TOO_LARGE
    with pytest.raises(ProtocolError) as e:
        decode(_frames(_header(tensors=[["g", "uint8", [200]]]), bytes(200)), limits)
    assert e.value.code is ErrorCode.TOO_LARGE
    specs = [[f"t{i}", "uint8", [1]] for i in range(3)]
    with pytest.raises(ProtocolError) as e:
        decode(_frames({"v": 1, "op": "push", "id": 1, "rank": 0, "step": 0, "tensors": specs}, b"a", b"b", b"c"),
               WireLimits(max_tensors=2))
    assert e.value.code is ErrorCode.TOO_LARGE


def test_pickle_payload_is_just_bytes() -> None:
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickle executed')",))

    with pytest.raises(ProtocolError):
        decode([pickle.dumps(Boom())])


def test_replies_are_checked_against_their_schema() -> None:
    """A reply to a request holds exactly the fields ``common.protocol.REPLIES`` lists for it."""
    from common.protocol import Op
    from common.wire import check_reply

    check_reply(Op.PUSH, {"applied": True, "version": 3})
    check_reply(Op.PULL, {"version": 3, "loss": None, "shm": True})
    for bad in ({"applied": True}, {"applied": "yes", "version": 3}, {"applied": True, "version": 3, "extra": 1}):
        with pytest.raises(ProtocolError):
            check_reply(Op.PUSH, bad)


def _bomb(nbytes: int) -> bytes:
    """A ping whose header is ``nbytes`` of empty arrays: one byte each on the wire, 56 in Python."""
    inner = [[] for _ in range(60000)]
    return msgpack.packb({"v": PROTOCOL_VERSION, "op": "ping", "id": 1, "x": [inner] * (nbytes // 60000)})


def test_a_msgpack_bomb_stops_at_the_value_budget() -> None:
    """4 MiB of empty arrays (fits every length and size cap) would be ~4 M Python lists, ~300 MB,
    before any rule looked at them; the budget stops msgpack after ``max_objects`` of them."""
    import tracemalloc

    head = _bomb(4_000_000)
    assert len(head) <= WireLimits().max_header_bytes
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError) as e:
            decode([head])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.code is ErrorCode.TOO_LARGE and "too many values" in str(e.value)
    assert peak < 120 << 20, f"decoding the bomb took {peak >> 20} MiB"


def test_a_large_honest_header_fits_the_budget() -> None:
    """A REGISTER of 20,000 tensors (a header over the budget's threshold) still decodes, and
    the tight caps of a known θ leave room for every value a message about it can hold."""
    from ps.limits import schema_limits

    specs = {f"layer{i}.weight": ("float32", (64, 64, 3, 3)) for i in range(20000)}
    fields = {"v": PROTOCOL_VERSION, "op": "register", "id": 1, "rank": 0, "world_size": 1,
              "specs": [[n, d, list(s)] for n, (d, s) in specs.items()], "buckets": [list(specs)]}
    head = msgpack.packb(fields)
    assert len(head) > 64 << 10
    tight = schema_limits(specs, WireLimits())
    assert tight.max_objects < WireLimits().max_objects
    for limits in (WireLimits(), tight):
        try:
            decode([head], limits)
        except ProtocolError as e:  # the schema may refuse the made-up fields; never the budget
            assert "too many values" not in str(e), e
