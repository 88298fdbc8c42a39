"""The same-host fast path on the worker's side: shared-memory segments (``common.shm``).

When the server offers shared memory and this worker can map it (same host), a shard has two
segments:

* the **gradient segment**, this rank's own, named with its token in the REGISTER reply and
  mapped writable: gradients are copied into it and a push carries only a header naming the
  segment's token ([Note: one segment per registration] in ``ps/fastpath.py``: a push that
  names another segment is refused with STALE_SEGMENT);
* the **θ segment**, one for every worker, named in the INIT reply and mapped **read-only**:
  θ is read where the server keeps it, and CPU parameters can be *views* of it
  (:meth:`SharedTheta.bind`), so a pull costs no copy at all and a stray write faults
  instead of corrupting θ.

A segment is used only when its file is there and its token matches (``Segment.open``): that
is, on the same host as that very server. Otherwise the shard keeps using frames.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch

from common.shm import Segment, layout
from common.wire import Message
from worker.pieces import PieceMap
from worker.shard import Shard
from worker.staging import Stager

log = logging.getLogger(__name__)

Tensors = Mapping[str, torch.Tensor]


def open_grad_segment(shard: Shard, specs: Sequence[Sequence[Any]], stager: Stager) -> None:
    """Map the gradient segment ``shard``'s REGISTER reply names, if any and if it can be mapped.

    ``specs``: the ``params`` the shard was registered with (``[key, dtype, shape]`` each).
    """
    path = shard.info.get("shm_grad")
    if not path:
        return
    flat = [(k, d, tuple(sh)) for k, d, sh in specs]
    offsets, nbytes = layout(flat)
    seg = Segment.open(path, shard.info.get("shm_grad_token", ""), nbytes, writable=True)
    if seg is not None:
        shard.grad_seg = seg
        shard.grad_views = seg.views(flat, offsets)
        stager.register_host(seg.data)


def close_grad_segment(shard: Shard) -> None:
    """Unmap ``shard``'s gradient segment (a new registration gets a new one)."""
    if shard.grad_seg is not None:
        shard.grad_views.clear()
        shard.grad_seg.close()
        shard.grad_seg = None


def map_theta_segment(shard: Shard, reply: Message, pieces: PieceMap, stager: Stager) -> None:
    """Map the θ segment ``shard``'s INIT ``reply`` names (read-only), if it can be mapped."""
    f = reply.fields
    if not f.get("shm_theta"):
        return
    seg = Segment.open(f["shm_theta"], f.get("shm_theta_token", ""), int(f.get("shm_theta_size", -1)),
                       writable=False)
    if seg is None:
        return
    offsets = {k: int(o) for k, o in f.get("shm_offsets", [])}
    flat = pieces.flat(shard.pieces)
    if set(offsets) != {k for k, _d, _s in flat}:
        log.warning("server %s sent θ offsets for other keys: using frames", shard.endpoint)
        seg.close()
        return
    shard.theta_seg = seg
    shard.theta_views = seg.views(flat, offsets)
    stager.register_host(seg.data, read_only=True)  # mapped read-only here


class SharedTheta:
    """θ in the shards' θ segments: parameters bound to it, and copies out of it.

    Attributes:
        bound: parameters (by name) that are views of a θ segment.
    """

    def __init__(self, shards: Sequence[Shard], stager: Stager) -> None:
        self.shards = shards
        self.stager = stager
        self.bound: dict[str, torch.Tensor] = {}

    @property
    def any(self) -> bool:
        """True when some shard's θ is in shared memory."""
        return any(shard.theta_seg is not None for shard in self.shards)

    def bind(self, params: Tensors, pieces: PieceMap) -> int:
        """Make CPU parameters views of the θ segment where possible; returns how many.

        A parameter qualifies when all its pieces sit back to back in one shard's θ
        segment. Bound parameters are read-only mappings: they change when θ does.
        """
        n = 0
        for name, p in params.items():
            plist = pieces.pieces.get(name, [])
            if p.device.type != "cpu" or not plist:
                continue
            shard = self.shards[pieces.owner[plist[0].key]]
            if shard.theta_seg is None or any(pieces.owner[q.key] != pieces.owner[plist[0].key] for q in plist):
                continue
            views = [shard.theta_views[q.key] for q in plist]
            start = views[0].data_ptr()
            nbytes = p.numel() * p.element_size()
            if views[-1].data_ptr() + views[-1].numel() * p.element_size() - start != nbytes:
                continue
            base = shard.theta_seg.data
            off = start - base.data_ptr()
            p.data = base[off:off + nbytes].view(p.dtype).view(p.shape)
            self.bound[name] = p
            n += 1
        return n

    def unbind(self) -> dict[str, torch.Tensor]:
        """Give bound parameters memory of their own again, then unmap the θ segments; returns them.

        Called before rejoining: the new registration's θ segment may be another one.
        """
        bound = dict(self.bound)
        for p in bound.values():
            p.data = p.data.clone()
        self.bound.clear()
        for shard in self.shards:
            if shard.theta_seg is not None:
                shard.theta_views.clear()
                shard.theta_seg.close()
                shard.theta_seg = None
        return bound

    def load(self, params: Tensors, pieces: PieceMap) -> None:
        """Copy θ from the θ segments into ``params`` (not the bound ones; pieces on frames shards untouched)."""
        with torch.no_grad():
            for name, p in params.items():
                if name in self.bound:
                    continue
                for q in pieces.pieces[name]:
                    shard = self.shards[pieces.owner[q.key]]
                    if shard.theta_seg is not None:
                        q.of(p).copy_(shard.theta_views[q.key], non_blocking=True)
            self.stager.sync_h2d()

    def load_whole(self, theta: Tensors, params: Tensors) -> None:
        """Copy whole θ tensors into ``params`` (the bound ones already show θ)."""
        with torch.no_grad():
            for name, p in params.items():
                if name not in self.bound and name in theta:
                    p.copy_(theta[name])

    def copies(self, pieces: PieceMap) -> dict[str, torch.Tensor]:
        """θ as copies out of the θ segments (for callers that asked for tensors).

        Pieces of shards without a θ segment are left uninitialized: the caller has them as frames.
        """
        out = pieces.empty()
        for name, plist in pieces.pieces.items():
            for q in plist:
                shard = self.shards[pieces.owner[q.key]]
                if shard.theta_seg is not None:
                    q.of(out[name]).copy_(shard.theta_views[q.key])
        return out
