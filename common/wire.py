"""Every byte on the wire: encoding and validated decoding of zmqps messages.

A message is ``[header, frame_1, ..., frame_n]``: the header is a msgpack map with ``v``,
``op``, ``id``, the op's fields (see :data:`common.protocol.SCHEMA`) and ``tensors``, a
list of ``[name, dtype, shape]``; frame i holds tensor i's raw bytes. Tensors never go
inside msgpack and nothing is ever unpickled.

[Note: zero copy] :func:`encode` returns views of the tensors' memory, so a caller that
sends with ``copy=False`` hands the tensor's own bytes to ZeroMQ (pyzmq still copies frames
under ``zmq.COPY_THRESHOLD`` = 64 KiB, which is cheaper for small ones). The frame keeps
the tensor alive; the sender must not write into that tensor until ZeroMQ has released it
(track the send, or swap the storage - see ``ps.store``). :func:`decode` returns tensors
that are views of the received frames (``torch.frombuffer``), not copies.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import msgpack
import numpy as np
import torch

from common import PROTOCOL_VERSION
from common.dtypes import ITEMSIZE, dtype_name, torch_dtype
from common.errors import ErrorCode, ProtocolError
from common.protocol import (ANY, BOOL, INT, NUM, NUM_OR_NIL, OPS_BY_VALUE, REPLIES, RESERVED, SCHEMA, SPECS, STR,
                             STRLIST, Op)

# Frames from ZeroMQ are writable; read-only frames (bytes, in tests and tools) are viewed too.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

Frame = Any  # bytes, memoryview, or zmq.Frame: anything exposing the buffer protocol


@dataclass(frozen=True)
class WireLimits:
    """Caps applied to every decoded message."""

    max_header_bytes: int = 4 << 20
    max_tensors: int = 65536
    max_name_len: int = 1024
    max_ndim: int = 16
    max_message_bytes: int = 8 << 30
    max_depth: int = 8  # nesting depth of header values
    max_map_len: int = 1024  # entries of any map in a header
    max_objects: int = 1 << 20  # values in all the arrays and maps of a header, together


DEFAULT_LIMITS = WireLimits()
MAX_TENSOR_BYTES = 1 << 50
"""No shape may describe more than this (1 PiB, even with a zero dimension): torch itself fails
on sizes near 2**63, with errors that are not a protocol's to raise."""


@dataclass
class Message:
    """A decoded, validated message."""

    op: Op
    id: int
    fields: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        """A header field, or ``default`` when absent."""
        return self.fields.get(name, default)


def tensor_buffer(t: torch.Tensor) -> memoryview | bytes:
    """The raw bytes of a CPU tensor as a zero-copy view (contiguous copy only if needed)."""
    if t.device.type != "cpu":
        raise ValueError(f"tensor on {t.device} must be staged to host memory before sending")
    if t.numel() == 0:
        return b""
    flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def encode(op: Op, fields: Mapping[str, Any] | None = None,
           tensors: Mapping[str, torch.Tensor] | None = None, req_id: int = 0) -> list[Frame]:
    """Encode one message as a list of frames (header first).

    Args:
        op: the message kind.
        fields: the op's header fields.
        tensors: named CPU tensors, sent in insertion order.
        req_id: request id; a reply carries the id of its request.
    """
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": op.value, "id": req_id}
    if fields:
        header.update(fields)
    specs: list[list[Any]] = []
    frames: list[Frame] = []
    for name, t in (tensors or {}).items():
        specs.append([name, dtype_name(t.dtype), list(t.shape)])
        frames.append(tensor_buffer(t))
    header["tensors"] = specs
    return [msgpack.packb(header, use_bin_type=True), *frames]


def error_frames(code: ErrorCode, message: str, req_id: int = 0) -> list[Frame]:
    """Frames of an ERROR reply."""
    return encode(Op.ERROR, {"code": int(code), "message": message[:2000]}, req_id=req_id)


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(ErrorCode.BAD_MESSAGE, f"msgpack extension type {code} is not allowed")


def _bad(msg: str, code: ErrorCode = ErrorCode.BAD_MESSAGE) -> ProtocolError:
    return ProtocolError(code, msg)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_plain(x: Any, depth: int, limits: WireLimits) -> None:
    """Header values are plain data: nil, bool, int, float, str, and lists/maps of those."""
    if depth > limits.max_depth:
        raise _bad("header nested too deeply")
    if x is None or isinstance(x, (bool, int, float, str)):
        return
    if isinstance(x, list):
        for item in x:
            _check_plain(item, depth + 1, limits)
        return
    if isinstance(x, dict):
        for k, v in x.items():
            if not isinstance(k, str):
                raise _bad("header map keys must be strings")
            _check_plain(v, depth + 1, limits)
        return
    raise _bad(f"header value of type {type(x).__name__} is not allowed")


def _check_kind(op: Op, name: str, kind: str, value: Any, limits: WireLimits) -> None:
    ok = {
        INT: _is_int(value),
        NUM: (_is_int(value) or isinstance(value, float)),
        NUM_OR_NIL: value is None or _is_int(value) or isinstance(value, float),
        STR: isinstance(value, str),
        BOOL: isinstance(value, bool),
        STRLIST: isinstance(value, list) and all(isinstance(s, str) for s in value),
        SPECS: isinstance(value, list),
        ANY: True,
    }[kind]
    if not ok:
        raise _bad(f"{op.value}: field {name!r} must be {kind}, got {type(value).__name__}")
    if kind == SPECS:
        _check_specs(value, limits)
    if kind == NUM and isinstance(value, float) and not math.isfinite(value):
        raise _bad(f"{op.value}: field {name!r} must be finite")


def _check_specs(specs: Any, limits: WireLimits) -> list[tuple[str, str, tuple[int, ...], int]]:
    """Validate a ``[[name, dtype, shape], ...]`` list; return (name, dtype, shape, nbytes)."""
    if not isinstance(specs, list):
        raise _bad("'tensors' must be a list")
    if len(specs) > limits.max_tensors:
        raise _bad(f"{len(specs)} tensors exceed the cap of {limits.max_tensors}", ErrorCode.TOO_LARGE)
    out = []
    seen: set[str] = set()
    for spec in specs:
        if not (isinstance(spec, list) and len(spec) == 3):
            raise _bad("each tensor entry must be [name, dtype, shape]", ErrorCode.BAD_TENSOR)
        name, dtype, shape = spec
        if not isinstance(name, str) or not name or len(name) > limits.max_name_len:
            raise _bad(f"bad tensor name {str(name)[:80]!r}", ErrorCode.BAD_TENSOR)
        if name in seen:
            raise _bad(f"tensor {name!r} listed twice", ErrorCode.BAD_TENSOR)
        seen.add(name)
        torch_dtype(dtype)
        if (not isinstance(shape, list) or len(shape) > limits.max_ndim
                or not all(_is_int(d) and d >= 0 for d in shape)):
            raise _bad(f"tensor {name!r}: shape must be a list of at most {limits.max_ndim} "
                       f"non-negative ints, got {str(shape)[:80]}", ErrorCode.BAD_TENSOR)
        if math.prod(max(d, 1) for d in shape) * ITEMSIZE[dtype] > MAX_TENSOR_BYTES:  # [0, 2**63] too
            raise _bad(f"tensor {name!r}: shape {str(shape)[:80]} is beyond any tensor's size", ErrorCode.BAD_TENSOR)
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        out.append((name, dtype, tuple(shape), nbytes))
    return out


BUDGET_FROM_BYTES = 64 << 10
"""Headers larger than this are unpacked under :class:`_Budget`; a smaller one cannot hold
enough values to matter, and the hot path's headers stay free of the per-container call."""


class _Budget:
    """[Note: msgpack bombs] Counts the values msgpack builds and stops it past a budget.

    One header byte can become a Python object of 50-70 bytes (an empty array is one byte, a
    list is 56), so a 4 MiB header of empty arrays costs ~300 MB and a second of the loop
    before any rule could look at it. The caps on array and map lengths bound each container,
    not how many there are; this bounds their sum while they are built (msgpack calls the
    hooks as each container completes), so the work done on a bomb stops at ``limit``."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def _take(self, n: int) -> None:
        self.left -= n + 1
        if self.left < 0:
            raise _bad("header holds too many values", ErrorCode.TOO_LARGE)

    def _list(self, value: list[Any]) -> list[Any]:
        self._take(len(value))
        return value

    def _map(self, value: dict[str, Any]) -> dict[str, Any]:
        self._take(2 * len(value))
        return value

    def hooks(self) -> dict[str, Any]:
        """Keyword arguments for :func:`msgpack.unpackb`."""
        return {"list_hook": self._list, "object_hook": self._map}


def decode(frames: Sequence[Frame], limits: WireLimits = DEFAULT_LIMITS) -> Message:
    """Decode and fully validate one message; raise :class:`ProtocolError` on any violation.

    Nothing is applied anywhere before this returns, so a rejected message changes no state.
    """
    if not frames:
        raise _bad("empty message")
    head = memoryview(frames[0])
    if head.nbytes > limits.max_header_bytes:
        raise _bad(f"header of {head.nbytes} bytes exceeds the cap of {limits.max_header_bytes}",
                   ErrorCode.TOO_LARGE)
    total = sum(memoryview(f).nbytes for f in frames)
    if total > limits.max_message_bytes:
        raise _bad(f"message of {total} bytes exceeds the cap of {limits.max_message_bytes}",
                   ErrorCode.TOO_LARGE)
    hooks = _Budget(limits.max_objects).hooks() if head.nbytes > BUDGET_FROM_BYTES else {}
    try:
        header = msgpack.unpackb(head, raw=False, strict_map_key=True, use_list=True,
                                 ext_hook=_no_ext, timestamp=0, max_bin_len=0, max_ext_len=0,
                                 max_str_len=limits.max_header_bytes, max_map_len=limits.max_map_len,
                                 max_array_len=max(limits.max_tensors, limits.max_ndim, 3), **hooks)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises several unrelated types for corrupt input
        text = str(e)
        if "max_bin_len" in text or "max_ext_len" in text:
            raise _bad("header holds a binary value or an extension type: not allowed") from None
        code = ErrorCode.TOO_LARGE if "exceeds max_" in text else ErrorCode.BAD_MESSAGE
        raise _bad(f"header is not valid msgpack: {type(e).__name__}: {text}", code) from None
    if not isinstance(header, dict):
        raise _bad("header must be a msgpack map")
    _check_plain(header, 0, limits)
    req_id = header.get("id", 0)
    if not _is_int(req_id) or not 0 <= req_id < 2**63:
        raise _bad("'id' must be an int in [0, 2**63)")
    try:
        if header.get("v") != PROTOCOL_VERSION:
            raise _bad(f"protocol version {header.get('v')!r} is not {PROTOCOL_VERSION}", ErrorCode.BAD_VERSION)
        op = OPS_BY_VALUE.get(header.get("op")) if isinstance(header.get("op"), str) else None
        if op is None:
            raise _bad(f"unknown op {str(header.get('op'))[:80]!r}", ErrorCode.UNKNOWN_OP)
        return _decode_body(op, req_id, header, frames, limits)
    except ProtocolError as e:
        e.req_id = req_id
        raise
    except (TypeError, ValueError, RuntimeError, KeyError, IndexError, OverflowError) as e:
        # a value no rule above foresaw (torch or numpy refused it): a protocol error all the same
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"undecodable message: {type(e).__name__}: {str(e)[:200]}",
                            req_id) from None


def check_reply(request: Op, fields: Mapping[str, Any], limits: WireLimits = DEFAULT_LIMITS) -> None:
    """``fields`` of a REPLY to a ``request`` hold what :data:`common.protocol.REPLIES` says, and
    nothing else; else :class:`ProtocolError` (``BAD_MESSAGE``) naming the field."""
    schema = REPLIES.get(request)
    if schema is None:
        return
    _check_fields(request, f"reply to {request.value}", schema, fields, limits)


def _check_fields(op: Op, what: str, schema: tuple[Mapping[str, str], Mapping[str, str]],
                  fields: Mapping[str, Any], limits: WireLimits) -> None:
    """Every required field of ``schema`` is in ``fields``, every other field is an optional one
    (or matches the wildcard ``*``), each of its kind; else BAD_MESSAGE naming ``what``."""
    required, optional = schema
    for name, kind in required.items():
        if name not in fields:
            raise _bad(f"{what}: missing field {name!r}")
        _check_kind(op, name, kind, fields[name], limits)
    for name, value in fields.items():
        if name in required:
            continue
        kind = optional.get(name, optional.get("*"))
        if kind is None:
            raise _bad(f"{what}: unknown field {name!r}")
        _check_kind(op, name, kind, value, limits)


def _decode_body(op: Op, req_id: int, header: dict[str, Any], frames: Sequence[Frame],
                 limits: WireLimits) -> Message:
    fields = {k: v for k, v in header.items() if k not in RESERVED}
    _check_fields(op, op.value, SCHEMA[op], fields, limits)
    specs = _check_specs(header.get("tensors", []), limits)
    if len(frames) != 1 + len(specs):
        raise _bad(f"header lists {len(specs)} tensors but {len(frames) - 1} frames follow")
    for (name, dtype, _shape, nbytes), frame in zip(specs, frames[1:]):
        got = memoryview(frame).nbytes
        if got != nbytes:
            raise _bad(f"tensor {name!r}: frame has {got} bytes, shape x itemsize needs {nbytes}",
                       ErrorCode.BAD_TENSOR)
        if dtype == "bool" and nbytes and np.frombuffer(frame, dtype=np.uint8).max() > 1:
            raise _bad(f"tensor {name!r}: bool bytes must be 0 or 1", ErrorCode.BAD_TENSOR)
    tensors: dict[str, torch.Tensor] = {}
    for (name, dtype, shape, nbytes), frame in zip(specs, frames[1:]):
        td = torch_dtype(dtype)
        if nbytes == 0:
            tensors[name] = torch.empty(shape, dtype=td)
        else:
            tensors[name] = torch.frombuffer(frame, dtype=td).reshape(shape)
    return Message(op=op, id=req_id, fields=fields, tensors=tensors)
