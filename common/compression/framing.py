"""How compressed tensors travel in a PUSH: a header field and one frame per part.

[Note: compressed pushes] A PUSH (or PUSH_PULL) whose tensors are partly compressed lists them
in its header field ``compressed``: ``[[key, codec], ...]``. Key ``key``'s parts travel as
ordinary tensors of the message (listed in ``tensors``, one raw frame each) named
``key::part``, e.g. ``fc.weight::values`` (θ's dtype, shape [k]) and ``fc.weight::indices``
(int32, or int64 from 2**31 entries on, shape [k], strictly increasing) for ``topk``;
``fc.weight::p`` ([n, r]) and ``fc.weight::q`` ([m, r], θ's dtype) for ``powersgd``. Every other tensor
is a dense one, as without compression. So the message stays "a msgpack header + raw frames,
every frame described in the header", and ``common.wire`` checks the frames as always.

The receiver (:func:`expand`) checks the whole field before anything is decoded: a list of
``[str, str]`` pairs, each key once, registered, not a buffer (buffer values never travel
compressed), not also sent dense; a known codec with exactly its parts; no part named like a
registered key and no frame that is neither a key nor a listed part; and the parts themselves
(:func:`common.compression.codecs.check`: dtypes, counts, index range, no duplicates). Then
each key is decoded to a dense tensor, so what follows (the tensor checks, the rank-ordered
reduction) sees exactly what a dense push would have carried.
"""

from __future__ import annotations

from typing import AbstractSet, Any, Mapping

import torch

from common.compression.codecs import PARTS, Encoded, check, decompress
from common.dtypes import torch_dtype
from common.errors import ErrorCode, ProtocolError

SEP = "::"
"""Between a key and its part in a frame's name."""

FIELD = "compressed"
"""The PUSH/PUSH_PULL header field listing the compressed keys and their codecs."""


def part_name(key: str, part: str) -> str:
    """The frame name of ``key``'s ``part``."""
    return f"{key}{SEP}{part}"


def pack(dense: Mapping[str, torch.Tensor], encoded: Mapping[str, Encoded]) -> tuple[list[list[str]],
                                                                                     dict[str, torch.Tensor]]:
    """The ``compressed`` field and the tensors of a push: ``dense`` ones, then ``encoded``'s parts."""
    tensors = dict(dense)
    field = []
    for key, enc in encoded.items():
        field.append([key, enc.codec])
        for part in PARTS[enc.codec]:
            tensors[part_name(key, part)] = enc.parts[part]
    return field, tensors


def _bad(text: str, code: ErrorCode = ErrorCode.BAD_MESSAGE) -> ProtocolError:
    return ProtocolError(code, f"compressed push: {text}")


def expand(tensors: Mapping[str, torch.Tensor], field: Any, specs: Mapping[str, tuple[str, tuple[int, ...]]],
           buffers: AbstractSet[str]) -> dict[str, torch.Tensor]:
    """The dense tensors a push's ``tensors`` and ``compressed`` ``field`` stand for.

    Args:
        tensors: the message's tensors (dense ones and parts).
        field: the header's ``compressed`` value, as received.
        specs: θ's ``{key: (dtype, shape)}``.
        buffers: the keys that are buffers (never compressed).

    Raises:
        ProtocolError: BAD_MESSAGE or SCHEMA_MISMATCH naming the first problem; nothing decoded.
    """
    if not isinstance(field, list) or not field:
        raise _bad("'compressed' must be a non-empty list of [key, codec]")
    codecs: dict[str, str] = {}
    for entry in field:
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(x, str) for x in entry)):
            raise _bad(f"each entry must be [key, codec], got {str(entry)[:80]}")
        key, codec = entry
        if key in codecs:
            raise _bad(f"{key!r} is listed twice")
        if key not in specs:
            raise _bad(f"{key[:80]!r} is not a registered key", ErrorCode.SCHEMA_MISMATCH)
        if key in buffers:
            raise _bad(f"{key!r} is a buffer: its value travels dense", ErrorCode.SCHEMA_MISMATCH)
        if key in tensors:
            raise _bad(f"{key!r} is sent both dense and compressed")
        if codec not in PARTS:
            raise _bad(f"{key!r}: unknown codec {codec[:40]!r} (known: {sorted(PARTS)})")
        codecs[key] = codec
    parts = {part_name(k, p): (k, p) for k, c in codecs.items() for p in PARTS[c]}
    clash = [n for n in parts if n in specs]
    if clash:
        raise _bad(f"part names {clash[:3]} are registered keys")
    stray = [n for n in tensors if n not in specs and n not in parts]
    if stray:
        raise _bad(f"frames {stray[:3]} are neither keys nor parts of a listed key", ErrorCode.SCHEMA_MISMATCH)
    missing = [n for n in parts if n not in tensors]
    if missing:
        raise _bad(f"parts {missing[:3]} are missing")
    out: dict[str, torch.Tensor] = {}
    for key, codec in codecs.items():
        dtype_name, shape = specs[key]
        dtype = torch_dtype(dtype_name)
        mine = {p: tensors[part_name(key, p)] for p in PARTS[codec]}
        why = check(codec, mine, tuple(shape), dtype)
        if why is not None:
            raise _bad(f"{key!r}: {why}")
        out[key] = decompress(Encoded(codec, mine), tuple(shape), dtype)
    dense = {k: t for k, t in tensors.items() if k not in parts}
    return {**dense, **out}
