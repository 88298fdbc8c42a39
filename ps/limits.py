"""Message caps derived from the registered schema.

Before θ exists the server applies the generic caps of :class:`common.wire.WireLimits`. Once
θ's names, dtypes and shapes are known, no valid message can be larger than one that carries
every tensor of θ (compressed ones with their indices: [Note: compressed pushes] in
``common/compression/framing.py``), so the caps shrink to that, and every message is checked
against the tight caps before it is decoded further. ZeroMQ itself drops a frame over the cap
the socket was bound with (``ZMQ_MAXMSGSIZE``, copied to every connection when the socket
binds): ``--max-frame-mb``, or θ's largest frame (:func:`largest_frame`) where a restarted
server knows θ when it binds ([Note: frame cap] in ``ps.server``).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Mapping

import torch

from common.compression.codecs import index_dtype
from common.dtypes import ITEMSIZE
from common.wire import WireLimits

SLACK = 16
HEADER_SLACK = 64 << 10
"""Room for a header's own fields besides the tensor list (ids, steps, loss, a key list)."""
OBJECT_SLACK = 1 << 16
"""Values a header may hold besides those about θ's tensors (a pipeline's peer table...)."""


def schema_limits(specs: Mapping[str, tuple[str, tuple[int, ...]]], base: WireLimits) -> WireLimits:
    """The caps of ``base`` tightened to what a message about θ (``{name: (dtype, shape)}``) can need."""
    if not specs:
        return base
    data = sum(_most_bytes(dtype, shape) for dtype, shape in specs.values())
    # a header lists each tensor once ([name, dtype, shape]), or compressed as two parts
    # (name::values, name::indices) and a [name, codec] entry, and may list the names again ("keys")
    listing = sum(4 * len(name.encode()) + 48 + 20 * len(shape) for name, (_, shape) in specs.items())
    header = min(base.max_header_bytes, HEADER_SLACK + 2 * listing)
    # counts get a little slack, so a message that is only slightly off (one extra key, one more
    # dimension) is refused with the precise SCHEMA_MISMATCH rather than TOO_LARGE
    return replace(base,
                   max_header_bytes=header,
                   max_tensors=min(base.max_tensors, 2 * len(specs) + SLACK),
                   max_name_len=min(base.max_name_len, max(len(n) for n in specs) + 4 * SLACK),
                   max_ndim=min(base.max_ndim, max(len(s) for _, s in specs.values()) + SLACK // 4),
                   # a tensor's [name, dtype, shape] listing, its name in key, bucket and absent
                   # lists, an alias pair: well under 16 values plus its dimensions
                   max_objects=min(base.max_objects,
                                   OBJECT_SLACK + sum(24 + 2 * len(shape) for _, shape in specs.values())),
                   max_message_bytes=min(base.max_message_bytes, header + data))


def largest_frame(specs: Mapping[str, tuple[str, tuple[int, ...]]], limits: WireLimits) -> int:
    """The largest single frame a valid message can have (the header, or θ's largest tensor)."""
    biggest = max((max(ITEMSIZE[dtype], _index_bytes(shape)) * math.prod(shape) for dtype, shape in specs.values()),
                  default=0)
    return max(limits.max_header_bytes, biggest)


def _index_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of one flat index of a compressed tensor of ``shape`` (its ``indices`` part)."""
    return torch.empty(0, dtype=index_dtype(math.prod(shape))).element_size()


def _most_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    """The most bytes a push of one tensor can take: dense, or every entry sent as value + index."""
    return (ITEMSIZE[dtype] + _index_bytes(shape)) * math.prod(shape)
