"""Everything the server sends: replies (θ as frames, or named in shared memory) and errors.

Replies carry θ's own memory zero-copy; the tracker of each send goes to the store, which
clones a tensor before updating it while a send may still read it ([Note: copy on write] in
``ps.store``). A reply's fields are checked against its schema (``common.protocol.REPLIES``)
before they leave, like every request is checked when it arrives.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import zmq

from common.compression.framing import part_name
from common.errors import ErrorCode
from common.protocol import Op
from common.transport import send_zero_copy
from common.wire import check_reply, encode, error_frames
from ps.metrics import ServerMetrics
from ps.store import ParameterStore


class Outbox:
    """Sends on the server's ROUTER socket (set :attr:`sock` once bound)."""

    def __init__(self, store: ParameterStore, metrics: ServerMetrics) -> None:
        self.store = store
        self.metrics = metrics
        self.sock: zmq.Socket | None = None

    def send(self, ident: bytes, frames: list[Any], track: bool = False) -> zmq.MessageTracker | None:
        """Send ``frames`` to connection ``ident`` (zero copy; ``track``: a tracker of every frame)."""
        assert self.sock is not None
        self.metrics.sent(sum(memoryview(f).nbytes for f in frames))
        return send_zero_copy(self.sock, [ident, *frames], track)

    def reply(self, ident: bytes, op: Op, req_id: int, fields: Mapping[str, Any] | None = None,
              keys: tuple[str, ...] = (), shm: bool = False, have: int | None = None) -> None:
        """Answer request ``req_id`` (of ``op``), with θ of ``keys`` as frames or, with ``shm`` and θ in
        shared memory, named only (the worker reads the segment). ``have``: the version the worker
        holds; keys the step from it changed in few entries go as those entries ([Note: sparse pulls])."""
        fields = dict(fields or {})
        if shm and keys and self.store.shared:
            fields["shm"] = True
            keys = ()
        sparse: dict[str, torch.Tensor] = {}
        if have is not None and keys:
            keys, changed = self.store.sparse_view(keys, have)
            if changed:
                fields["sparse"] = list(changed)
                sparse = {part_name(k, part): t for k, parts in changed.items() for part, t in parts.items()}
        check_reply(op, fields)
        tensors = {**self.store.view(keys), **sparse} if keys or sparse else None
        tracker = self.send(ident, encode(Op.REPLY, fields, tensors, req_id), track=bool(keys))
        self.store.track(keys, tracker)

    def error(self, ident: bytes, code: ErrorCode, text: str, req_id: int) -> None:
        """An ERROR reply: nothing was changed by the request."""
        self.send(ident, error_frames(code, text, req_id))
