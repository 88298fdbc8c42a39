"""The server's side of the same-host fast path: θ and each worker's gradients in shared memory.

Enabled by ``--shm auto`` (the default) with ``--sync bsp``, once a worker asks for it at
REGISTER. θ itself is then moved into one segment (the optimizer updates it in place there) and every worker that asks at REGISTER
gets a gradient segment of its own. Workers on another host cannot open them and keep using
frames; both kinds mix freely. See ``common/shm.py`` for the segment format and the
[Note: who writes when] that makes this safe in bsp.

[Note: one segment per registration] A worker started before its server sends REGISTER again
and again while the server starts; every copy reaches the server. The gradient segment belongs
to the registration, not to the message: a REGISTER from the same connection with the same
layout gets the segment it already has (the same path and token, nothing allocated), so
whichever copy's reply the worker acts on, both sides name one segment. A new connection
(a restarted worker) gets a new segment and token: a process that was stopped and resumed
can never write into the gradients of the one that replaced it. Every shared-memory push
names its segment's token (``segment``); a push naming another one is refused with
STALE_SEGMENT, naming the rank and both segments, and changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from common.config import ServerConfig
from common.dtypes import dtype_name
from common.errors import ErrorCode, ProtocolError
from common.shm import Segment, layout, remove_stale

log = logging.getLogger(__name__)

SpecMap = Mapping[str, tuple[str, tuple[int, ...]]]


@dataclass
class _GradSegment:
    """A rank's gradient segment, and the registration it was made for."""

    seg: Segment
    views: dict[str, torch.Tensor]
    identity: bytes
    layout: list[tuple[str, str, tuple[int, ...]]]

    def fields(self) -> dict[str, Any]:
        """What the REGISTER reply tells the worker."""
        return {"shm_grad": self.seg.path, "shm_grad_token": self.seg.token}


class FastPath:
    """Segments owned by the server: θ's and one per registered rank for its gradients."""

    def __init__(self, cfg: ServerConfig, shared_memory: bool = True) -> None:
        """``shared_memory``: the training rule allows it (``StepEngine.shared_memory``: bsp's)."""
        self.enabled = cfg.shm != "off" and shared_memory
        if self.enabled:
            stale = remove_stale()
            if stale:
                log.warning("removed %d shared-memory segment(s) left by a server that was killed: %s",
                            len(stale), ", ".join(stale[:3]))
        self.theta: Segment | None = None
        self.theta_offsets: dict[str, int] = {}
        self._grads: dict[int, _GradSegment] = {}

    @property
    def wanted(self) -> bool:
        """Some worker asked for the fast path (θ then moves into a segment at start)."""
        return bool(self._grads)

    def register(self, rank: int, specs: SpecMap, identity: bytes = b"") -> dict[str, Any]:
        """The gradient segment of ``rank`` laid out as ``specs`` (in order); the reply's fields.

        The same connection (``identity``) with the same layout keeps its segment
        ([Note: one segment per registration]); anything else gets a new one.
        """
        if not self.enabled:
            return {}
        flat = [(k, d, tuple(s)) for k, (d, s) in specs.items()]
        old = self._grads.get(rank)
        if old is not None and old.identity == identity and old.layout == flat:
            return old.fields()
        if old is not None:
            del self._grads[rank]
            old.seg.close()
        offsets, nbytes = layout(flat)
        try:
            seg = Segment.create(f"g{rank}", nbytes)
        except (OSError, OverflowError, ValueError) as e:  # the size is the worker's to say: a full tmpfs, or absurd
            log.warning("rank %d: no shared memory for its %d bytes of gradients (%s): it sends frames", rank, nbytes, e)
            return {}
        entry = self._grads[rank] = _GradSegment(seg, seg.views(flat, offsets), identity, flat)
        log.info("rank %d: gradients in shared memory %s (%d bytes)", rank, seg.path, nbytes)
        return entry.fields()

    def alloc_theta(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """θ's storage: views of a new segment, filled with ``tensors``."""
        flat = [(k, dtype_name(t.dtype), tuple(t.shape)) for k, t in tensors.items()]
        self.theta_offsets, nbytes = layout(flat)
        self.theta = Segment.create("theta", nbytes)
        views = self.theta.views(flat, self.theta_offsets)
        for k, t in tensors.items():
            views[k].copy_(t)
        log.info("θ in shared memory %s (%d bytes)", self.theta.path, nbytes)
        return views

    def theta_fields(self, keys: Iterable[str]) -> dict[str, Any]:
        """Reply fields that let a worker map θ: path, token and the offsets of ``keys``."""
        if self.theta is None:
            return {}
        return {"shm_theta": self.theta.path, "shm_theta_token": self.theta.token,
                "shm_theta_size": int(self.theta.data.numel()),
                "shm_offsets": [[k, self.theta_offsets[k]] for k in keys]}

    def grads(self, rank: int, keys: Iterable[str], token: str | None) -> dict[str, torch.Tensor]:
        """Views of ``rank``'s gradients for ``keys`` (read by the reduction, never written).

        Raises:
            ProtocolError: STALE_SEGMENT when ``token`` is not the token of the segment this
                server gave ``rank`` ([Note: one segment per registration]).
        """
        entry = self._grads.get(rank)
        if entry is None:
            raise ProtocolError(ErrorCode.STALE_SEGMENT, f"rank {rank} pushed from shared memory "
                                                         f"(segment {token or '?'}) but holds no segment here")
        if token != entry.seg.token:
            raise ProtocolError(ErrorCode.STALE_SEGMENT,
                                f"rank {rank} pushed from shared-memory segment {token or '(none named)'} but its "
                                f"segment is {entry.seg.path} ({entry.seg.token}): nothing applied")
        unknown = [k for k in keys if k not in entry.views]
        if unknown:
            raise ProtocolError(ErrorCode.SCHEMA_MISMATCH, f"keys not in rank {rank}'s segment: {unknown[:5]}")
        return {k: entry.views[k] for k in keys}

    def forget(self, rank: int) -> None:
        """Remove ``rank``'s gradient segment (it left the job)."""
        entry = self._grads.pop(rank, None)
        if entry is not None:
            entry.seg.close()

    def close(self) -> None:
        """Remove every segment (mappings held by workers stay valid until they unmap)."""
        for entry in self._grads.values():
            entry.seg.close()
        self._grads.clear()
        if self.theta is not None:
            self.theta.close()
