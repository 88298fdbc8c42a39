"""The server's side of the same-host fast path: θ and each worker's gradients in shared memory.

Enabled by ``--shm auto`` (the default) with ``--sync bsp``, once a worker asks for it at
REGISTER. θ itself is then moved into one segment (the optimizer updates it in place there) and every worker that asks at REGISTER
gets a gradient segment of its own. Workers on another host cannot open them and keep using
frames; both kinds mix freely. See ``common/shm.py`` for the segment format and the
[Note: who writes when] that makes this safe in bsp.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping

import torch

from common.config import ServerConfig
from common.dtypes import dtype_name
from common.errors import ErrorCode, ProtocolError
from common.shm import Segment, layout, remove_stale

log = logging.getLogger(__name__)

SpecMap = Mapping[str, tuple[str, tuple[int, ...]]]


class FastPath:
    """Segments owned by the server: θ's and one per registered rank for its gradients."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.enabled = cfg.shm != "off" and cfg.sync == "bsp"
        if self.enabled:
            stale = remove_stale()
            if stale:
                log.warning("removed %d shared-memory segment(s) left by a server that was killed: %s",
                            len(stale), ", ".join(stale[:3]))
        self.theta: Segment | None = None
        self.theta_offsets: dict[str, int] = {}
        self._grads: dict[int, tuple[Segment, dict[str, torch.Tensor]]] = {}

    @property
    def wanted(self) -> bool:
        """Some worker asked for the fast path (θ then moves into a segment at start)."""
        return bool(self._grads)

    def register(self, rank: int, specs: SpecMap) -> dict[str, Any]:
        """A gradient segment for ``rank`` laid out as ``specs`` (in order); the reply's fields."""
        if not self.enabled:
            return {}
        old = self._grads.pop(rank, None)
        if old is not None:
            old[0].close()
        flat = [(k, d, s) for k, (d, s) in specs.items()]
        offsets, nbytes = layout(flat)
        seg = Segment.create(f"g{rank}", nbytes)
        self._grads[rank] = (seg, seg.views(flat, offsets))
        log.info("rank %d: gradients in shared memory %s (%d bytes)", rank, seg.path, nbytes)
        return {"shm_grad": seg.path, "shm_grad_token": seg.token}

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

    def grads(self, rank: int, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Views of ``rank``'s gradients for ``keys`` (read by the reduction, never written)."""
        entry = self._grads.get(rank)
        if entry is None:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"rank {rank} pushed from shared memory it was not given")
        views = entry[1]
        unknown = [k for k in keys if k not in views]
        if unknown:
            raise ProtocolError(ErrorCode.SCHEMA_MISMATCH, f"keys not in rank {rank}'s segment: {unknown[:5]}")
        return {k: views[k] for k in keys}

    def close(self) -> None:
        """Remove every segment (mappings held by workers stay valid until they unmap)."""
        for seg, _views in self._grads.values():
            seg.close()
        self._grads.clear()
        if self.theta is not None:
            self.theta.close()
