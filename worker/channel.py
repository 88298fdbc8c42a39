"""How a worker's tensors travel: pieces over one or more server shards, frames or shared memory.

:class:`Channel` is the engine under :class:`worker.client.PSClient`. It splits every
tensor into pieces (``common.partition``), sends each piece to the shard that owns it, and
moves the bytes either as ZeroMQ frames (zero-copy) or, when the server offered shared
memory and this worker can map it (same host), through segments: gradients are copied into
this worker's gradient segment and only a header travels; θ is read where the server keeps
it, and CPU parameters can be *views* of it (:meth:`bind`), so a pull costs no copy at all.

Gradients go out bucket by bucket (:meth:`push_bucket`), each as soon as it is ready, and
the step ends with :meth:`finish` (one PUSH_PULL or PULL per shard, then every reply).

Every request goes through the shard's :class:`worker.retry.Caller`, so it rides out lost
connections and server restarts like any call of the client, with several in flight at once;
each shard has its own heartbeat (each server keeps its own lease on this worker).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import zmq

from common.dtypes import dtype_name
from common.errors import PSError
from common.partition import Piece, assign_shards, piece_nbytes, pieces_of
from common.protocol import Op
from common.shm import Segment, layout
from common.transport import USE_DEFAULT, Requester
from common.wire import Message
from worker.heartbeat import Heartbeat
from worker.retry import Call, Caller, RetryPolicy
from worker.staging import Stager

log = logging.getLogger(__name__)

Tensors = Mapping[str, torch.Tensor]
WIRE = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class ShardsApart(PSError):
    """The server shards answered INIT at different steps: one restarted from an older checkpoint."""

    def __init__(self, rank: int | None, by_endpoint: Mapping[str, int], versions: Mapping[int, int],
                 target: int | None) -> None:
        super().__init__(f"worker {rank}: the server shards are at different steps "
                         + ", ".join(f"{ep} at {v}" for ep, v in by_endpoint.items()))
        self.versions = dict(versions)
        self.target = target  # the newest step every shard can go back to; None: there is none


@dataclass
class Shard:
    """One server: its requester and caller, its pieces, and its shared-memory segments (if any)."""

    req: Requester
    caller: Caller
    address: str = ""  # the endpoint as given (with any ``#curve=`` key)
    beat: Heartbeat | None = None
    info: dict[str, Any] = field(default_factory=dict)  # its REGISTER reply
    pieces: list[Piece] = field(default_factory=list)
    grad_seg: Segment | None = None
    grad_views: dict[str, torch.Tensor] = field(default_factory=dict)
    theta_seg: Segment | None = None
    theta_views: dict[str, torch.Tensor] = field(default_factory=dict)


class Channel:
    """Pieces, shards and the fast path for one worker (see the module docstring)."""

    def __init__(self, ctx: zmq.Context, servers: Sequence[str], rank: int | None, timeout: float,
                 chunk_mb: float = 1.0, shm: str = "auto", wire_dtype: str = "auto", who: str | None = None,
                 heartbeat: float = 1.0, curve: Any = USE_DEFAULT) -> None:
        if not servers:
            raise PSError("no server endpoint given")
        self.ctx = ctx
        self.rank = rank
        self.chunk_bytes = int(chunk_mb * (1 << 20))
        self.want_shm = shm != "off"
        self.wire = WIRE.get(wire_dtype)
        self.heartbeat_s = heartbeat
        self.curve = curve
        self.identity = f"w{'?' if rank is None else rank}-{os.getpid()}-{uuid.uuid4().hex[:8]}".encode()
        name = f"worker {who if who is not None else rank}"
        self.shards = []
        for ep in servers:
            req = Requester(ctx, ep, who=name, identity=self.identity, curve=curve)
            self.shards.append(Shard(req, Caller(req, ctx, name, RetryPolicy(deadline_s=timeout)), address=ep))
        self.pieces: dict[str, list[Piece]] = {}  # base name -> its pieces
        self._piece: dict[str, tuple[str, Piece]] = {}  # piece key -> (base name, piece)
        self.owner: dict[str, int] = {}  # piece key -> shard
        self.specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.buckets: list[list[str]] = []
        self.buffers: frozenset[str] = frozenset()
        self._absent: dict[int, set[str]] = {}  # bucket -> its piece keys with nothing to push this step
        self.stager = Stager()
        self._owner_thread = threading.get_ident()
        self._pending: list[tuple[int, Call]] = []  # (shard, call) of pushes awaiting replies
        self._queued: list[int] = []  # buckets staged from another thread, not yet sent
        self._sent: set[int] = set()
        self._pulls: list[tuple[int, Call]] = []  # (shard, call) of θ pulls in flight
        self._pulled: set[int] = set()  # shards whose θ (shared memory) a PUSH_PULL already asked for
        self.pull_each = True  # pull θ bucket by bucket (set False to push without pulling)
        self._step: dict[str, Any] = {}
        self._total: float | None = None  # the step's samples over every worker (pre-scaling)
        self.bound: dict[str, torch.Tensor] = {}  # parameters that are views of the θ segment
        self.applied = True  # every push of the last finished step was applied (not a replay)

    # ------------------------------------------------------------------ set-up
    def register(self, tensors: Tensors, buckets: Sequence[Sequence[str]] | None, fields: Mapping[str, Any],
                 rank: int | None, world_size: int, step: int = 0, buffers: Sequence[str] = (),
                 aliases: Mapping[str, str] | None = None) -> dict[str, Any]:
        """REGISTER every piece with its shard; set up gradient segments the servers offer.

        Without ``rank``, the first shard assigns one (kept in :attr:`rank`) and the other
        shards are registered with it. Starts each shard's heartbeat. Called again when the
        client rejoins: the segments of the old registration are dropped. Returns the first
        shard's reply fields. ``buffers``: the tensors that are buffers (pushed as values,
        never scaled or narrowed); ``aliases``: other names of tied tensors (alias -> name).
        """
        self.buffers = frozenset(buffers)
        pieces = pieces_of(tensors, self.chunk_bytes)
        self.pieces, self.owner = {}, {}
        for shard in self.shards:
            shard.pieces = []
            if shard.grad_seg is not None:
                shard.grad_views.clear()
                shard.grad_seg.close()
                shard.grad_seg = None
        self.specs = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
        for p in pieces:
            self.pieces.setdefault(p.base, []).append(p)
        self._piece = {p.key: (p.base, p) for p in pieces}
        sizes = {p.key: piece_nbytes(p, tensors[p.base]) for p in pieces}
        self.owner = assign_shards(sizes, len(self.shards)) if len(self.shards) > 1 else {p.key: 0 for p in pieces}
        for p in pieces:
            self.shards[self.owner[p.key]].pieces.append(p)
        self.buckets = [list(b) for b in buckets] if buckets else [list(tensors)]
        calls: list[tuple[int, Call | None, list[list[Any]], dict[str, Any]]] = []
        for s, shard in enumerate(self.shards):
            specs = [[p.key, dtype_name(tensors[p.base].dtype), list(p.of(tensors[p.base]).shape)] for p in shard.pieces]
            if not specs:
                raise PSError(f"server shard {s} ({shard.req.endpoint}) would own no key: use fewer shards")
            mine = {p.key for p in shard.pieces}
            sb = [[p.key for b in bucket for p in self.pieces[b] if p.key in mine] for bucket in self.buckets]
            f = {**fields, "params": specs, "buckets": [b for b in sb if b], "shards": len(self.shards)}
            bufs = [p.key for p in shard.pieces if p.base in self.buffers]
            if bufs:
                f["buffers"] = bufs
            tied = [[a, k] for a, k in (aliases or {}).items() if any(p.base == k for p in shard.pieces)]
            if tied:
                f["aliases"] = tied
            if self.want_shm:
                f["shm"] = True
            if s > 0 or rank is not None:
                calls.append((s, None, specs, f))
                continue
            # No rank yet: the first shard's answer fixes the rank the others are told.
            self._registered(0, shard.caller.call(Op.REGISTER, f, step=step), world_size)
            rank = self.rank
            calls.append((0, None, specs, {}))
        started = []
        for s, _c, specs, f in calls:
            if f:
                f["rank"] = rank
                started.append((s, self.shards[s].caller.start(Op.REGISTER, f, step=step), specs))
            else:
                started.append((s, None, specs))
        for s, c, specs in started:
            shard = self.shards[s]
            if c is not None:
                self._registered(s, shard.caller.finish(c), world_size)
            path = shard.info.get("shm_grad")
            if path:
                flat = [(k, d, tuple(sh)) for k, d, sh in specs]
                offsets, nbytes = layout(flat)
                seg = Segment.open(path, shard.info.get("shm_grad_token", ""), nbytes, writable=True)
                if seg is not None:
                    shard.grad_seg = seg
                    shard.grad_views = seg.views(flat, offsets)
                    self.stager.register_host(seg.data)
        first = self.shards[0].info
        if first.get("buckets") is False and len(self.buckets) > 1:
            log.info("the server takes whole steps only (sync %s): one push per step", first.get("sync"))
            self.buckets = [list(tensors)]
        if self.wire is not None and any(sh.grad_seg is not None for sh in self.shards):
            log.info("gradients go through shared memory: --wire-dtype applies to frames only")
        for shard in self.shards:
            self._start_heartbeat(shard)
        return dict(first)

    def _registered(self, s: int, reply: Message, world_size: int) -> None:
        """Take shard ``s``'s REGISTER reply: the rank, the server's incarnation and hold."""
        shard = self.shards[s]
        shard.info = dict(reply.fields)
        assigned = shard.info.get("rank", self.rank)
        if not isinstance(assigned, int) or not 0 <= assigned < world_size or \
                (self.rank is not None and s > 0 and assigned != self.rank):
            raise PSError(f"{shard.caller.who}: the server at {shard.req.endpoint} assigned no valid rank "
                          f"(got {assigned!r})")
        self.rank = assigned
        incarnation, hold = shard.info.get("incarnation"), shard.info.get("hold_s")
        shard.caller.incarnation = incarnation if isinstance(incarnation, str) else None
        if isinstance(hold, (int, float)) and not isinstance(hold, bool):
            shard.caller.policy = dataclasses.replace(shard.caller.policy, hold_s=float(hold))

    def _start_heartbeat(self, shard: Shard) -> None:
        """Once registered (a server renews a lease only for a registered connection's heartbeat)."""
        if shard.beat is None and self.heartbeat_s > 0:
            assert self.rank is not None
            shard.beat = Heartbeat(self.ctx, shard.address, self.identity, self.rank, self.heartbeat_s, self.curve)
            shard.beat.start()
            shard.caller.beat = shard.beat

    def init(self, tensors: Tensors | None, step: int = 0) -> tuple[dict[str, torch.Tensor], int, list[dict[str, Any]]]:
        """INIT every shard; θ (whole tensors), the servers' version, the peer table.

        ``tensors`` are this worker's offer of initial θ to shards not yet initialized; None
        when rejoining a running job (then a shard without θ is an error).
        """
        calls = []
        for s, shard in enumerate(self.shards):
            cpu = None
            if not shard.info.get("initialized"):
                if tensors is None:
                    raise PSError(f"worker {self.rank}: the server at {shard.req.endpoint} restarted without θ "
                                  f"(no checkpoint in its --checkpoint-dir) while this worker was at step {step}: "
                                  f"the job cannot continue exactly")
                cpu = self.stager.to_host({p.key: p.of(tensors[p.base]) for p in shard.pieces}, f"init{s}")
            f: dict[str, Any] = {"rank": self.rank}
            if shard.grad_seg is not None:
                f["shm"] = True  # same host: θ may come back in shared memory
            calls.append((s, shard.caller.start(Op.INIT, f, cpu, step)))
        out = self._alloc_full()
        versions: dict[int, int] = {}
        restorable: dict[int, set[int]] = {}
        peers: list[dict[str, Any]] = []
        for s, c in calls:
            shard = self.shards[s]
            reply = shard.caller.finish(c)
            self._map_theta(s, reply)
            pieces = reply.tensors
            if reply.fields.get("shm"):
                if shard.theta_seg is not None:
                    pieces = shard.theta_views
                else:  # could not map it after all: θ as frames
                    pieces = shard.caller.call(Op.PULL, {"rank": self.rank, "step": 0}, step=step).tensors
            self._scatter(pieces, out)
            versions[s] = int(reply.fields["version"])
            restorable[s] = {int(x) for x in reply.fields.get("restorable") or () if isinstance(x, int)}
            if s == 0:
                peers = list(reply.fields.get("peers") or [])
        if len(set(versions.values())) > 1:
            common = set.intersection(*(restorable[s] | {versions[s]} for s in versions))
            common = {x for x in common if x <= min(versions.values())}
            raise ShardsApart(self.rank, {self.shards[s].req.endpoint: v for s, v in versions.items()}, versions,
                              max(common) if common else None)
        return out, versions[0], peers

    def rewind(self, versions: Mapping[int, int], target: int, step: int = 0) -> None:
        """Ask every shard past ``target`` to go back to it ([Note: shards rewind together] in ``ps.server``).

        Raises:
            RemoteError: a shard cannot (the message names why).
        """
        for s, v in versions.items():
            if v > target:
                log.warning("worker %s: server shard %s is at step %d, another restarted behind it: asking it "
                            "to go back to step %d", self.rank, self.shards[s].req.endpoint, v, target)
                self.shards[s].caller.call(Op.REWIND, {"rank": self.rank, "step": target}, step=step)

    def reset(self) -> None:
        """Forget the step in progress and every call in flight (before rejoining)."""
        for shard in self.shards:
            shard.caller.abandon()
        self._pending.clear()
        self._pulls.clear()
        self._pulled.clear()
        self._queued.clear()
        self._sent.clear()
        self._absent.clear()

    def unbind(self) -> dict[str, torch.Tensor]:
        """Give bound parameters memory of their own again (before the θ segment goes); returns them."""
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

    def _map_theta(self, s: int, reply: Message) -> None:
        f = reply.fields
        if not (self.want_shm and f.get("shm_theta")):
            return
        seg = Segment.open(f["shm_theta"], f.get("shm_theta_token", ""), int(f.get("shm_theta_size", -1)),
                           writable=False)
        if seg is None:
            return
        shard = self.shards[s]
        offsets = {k: int(o) for k, o in f.get("shm_offsets", [])}
        flat = []
        for p in shard.pieces:
            dtype, shape = self.specs[p.base]
            flat.append((p.key, dtype_name(dtype), (p.hi - p.lo, *shape[1:]) if not p.whole else shape))
        if set(offsets) != {k for k, _d, _s in flat}:
            log.warning("server %s sent θ offsets for other keys: using frames", shard.req.endpoint)
            seg.close()
            return
        shard.theta_seg = seg
        shard.theta_views = seg.views(flat, offsets)
        self.stager.register_host(seg.data, read_only=True)  # mapped read-only here

    # ------------------------------------------------------------------ parameters
    def bind(self, params: Mapping[str, torch.Tensor]) -> int:
        """Make CPU parameters views of the θ segment where possible; returns how many.

        A parameter qualifies when all its pieces sit back to back in one shard's θ
        segment. Bound parameters are read-only mappings: they change when θ does.
        """
        n = 0
        for name, p in params.items():
            pieces = self.pieces.get(name, [])
            if p.device.type != "cpu" or not pieces:
                continue
            shard = self.shards[self.owner[pieces[0].key]]
            if shard.theta_seg is None or any(self.owner[q.key] != self.owner[pieces[0].key] for q in pieces):
                continue
            views = [shard.theta_views[q.key] for q in pieces]
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

    def load(self, params: Mapping[str, torch.Tensor]) -> None:
        """Copy θ from the θ segments into ``params`` (not the bound ones; pieces on frames shards untouched)."""
        with torch.no_grad():
            for name, p in params.items():
                if name in self.bound:
                    continue
                for q in self.pieces[name]:
                    shard = self.shards[self.owner[q.key]]
                    if shard.theta_seg is not None:
                        q.of(p).copy_(shard.theta_views[q.key], non_blocking=True)
            self.stager.sync_h2d()

    # ------------------------------------------------------------------ a step
    def begin(self, step: int, samples: float | None, loss: float | None, pull: bool = True,
              total: float | None = None) -> None:
        """Start pushing ``step``; with ``pull``, θ after it is pulled as buckets complete.

        ``total``: the step's samples over every worker, when the caller knows it; gradients
        going through shared memory are then scaled by ``samples / total`` as they are copied
        (the same pass), which spares the server two passes over them (ps/aggregate.py).
        """
        self.pull_each = pull
        self._pulled.clear()
        self._step = {"rank": self.rank, "step": step}
        if samples is not None:
            self._step["samples"] = float(samples)
        if loss is not None:
            self._step["loss"] = float(loss)
        self._total = float(total) if total and samples is not None and total > 0 else None
        self._sent.clear()

    def push_bucket(self, i: int, grads: Mapping[str, torch.Tensor | None]) -> None:
        """Stage bucket ``i`` now and send it (later, if called from another thread).

        ``grads`` maps each name of the bucket to its gradient (a buffer: its value), or to
        None when this worker has nothing for it this step: the push names it ``absent``
        (``worker.modelstate``). Sparse or non-contiguous gradients are sent dense.
        """
        framed: dict[str, torch.Tensor] = {}
        absent: set[str] = set()
        for name in self.buckets[i]:
            g = grads.get(name)
            if g is None:
                absent.update(q.key for q in self.pieces[name])
                continue
            if g.layout != torch.strided or not g.is_contiguous():
                g = g.to_dense() if g.layout != torch.strided else g.contiguous()
            for q in self.pieces[name]:
                shard = self.shards[self.owner[q.key]]
                if shard.grad_seg is not None:
                    scale = None if self._total is None or name in self.buffers else self._step["samples"] / self._total
                    self.stager.copy_to(shard.grad_views[q.key], q.of(g), scale)
                else:
                    framed[name] = g
        self._absent[i] = absent
        self.stager.record(i, framed)
        self._queued.append(i)
        if threading.get_ident() == self._owner_thread:
            self.flush()

    def flush(self) -> None:
        """Send every staged bucket (on the thread that owns the sockets)."""
        while self._queued:
            i = self._queued.pop(0)
            grads = self.stager.ready(i)
            self._send_bucket(i, grads)

    def _send_bucket(self, i: int, grads: Tensors) -> None:
        absent = self._absent.pop(i, set())
        per_shard: dict[int, dict[str, torch.Tensor | None]] = {}
        missing: dict[int, list[str]] = {}
        for name in self.buckets[i]:
            for q in self.pieces[name]:
                s = self.owner[q.key]
                shm = self.shards[s].grad_seg is not None
                if q.key in absent:
                    missing.setdefault(s, []).append(q.key)
                    per_shard.setdefault(s, {})
                else:
                    per_shard.setdefault(s, {})[q.key] = None if shm else q.of(grads[name])
        # The step's last bucket asks for θ in the same message (PUSH_PULL: one round trip)
        # when θ is wanted and would otherwise need a PULL of its own.
        final = self.pull_each and len(self._sent) == len(self.buckets) - 1
        for s, part in per_shard.items():
            shard = self.shards[s]
            shm_theta = shard.theta_seg is not None
            op = Op.PUSH_PULL if final else Op.PUSH
            fields: dict[str, Any] = dict(self._step)
            keys = [*part, *missing.get(s, ())]
            if s in missing:
                fields["absent"] = missing[s]
            if final:
                if shm_theta:
                    fields["shm"] = True  # θ of all this shard's keys, in shared memory
                    self._pulled.add(s)
                else:
                    fields["keys"] = keys
            if shard.grad_seg is not None:
                if self._total is not None:
                    fields["total"] = self._total
                fields["segment"] = shard.grad_seg.token
                call = shard.caller.start(op, {**fields, "grads": list(part)}, step=fields["step"])
            else:
                if self.wire is not None:
                    part = {k: t.to(self.wire) if t.is_floating_point() and t.dtype != self.wire and
                            self._piece[k][0] not in self.buffers else t for k, t in part.items()}
                call = shard.caller.start(op, fields, part, fields["step"])  # the call keeps part until answered
            if final:
                self._pulls.append((s, call))
                continue
            self._pending.append((s, call))
            if self.pull_each and not shm_theta:
                # θ of this bucket comes back as soon as the bucket's step is applied, while
                # later buckets are still being pushed (or computed).
                f = {"rank": self.rank, "step": self._step["step"] + 1, "keys": keys}
                self._pulls.append((s, shard.caller.start(Op.PULL, f, step=f["step"] - 1)))
        self._sent.add(i)

    def finish(self, want_theta: bool = True, params: Mapping[str, torch.Tensor] | None = None
               ) -> dict[str, torch.Tensor]:
        """Wait for every push of the step; then θ's pieces after it (none from shared memory).

        Sends one PULL per shard for the state after the step; an unsent bucket is an error.
        With ``params``, θ goes into them instead (each bucket's as soon as it arrives, the
        rest from the θ segments; bound parameters show it already) and nothing is returned.
        """
        self.flush()
        missing = [i for i in range(len(self.buckets)) if i not in self._sent]
        if missing:
            raise PSError(f"worker {self.rank}: buckets {missing} of step {self._step.get('step')} were not pushed")
        step = self._step["step"]
        pulls, self._pulls = self._pulls, []
        pulled, self._pulled = self._pulled, set()
        if want_theta:
            for s, shard in enumerate(self.shards):
                if s in pulled:
                    continue
                if shard.theta_seg is not None:
                    pulls.append((s, shard.caller.start(Op.PULL, {"rank": self.rank, "step": step + 1, "shm": True}, step=step)))
                elif not self.pull_each:
                    pulls.append((s, shard.caller.start(Op.PULL, {"rank": self.rank, "step": step + 1}, step=step)))
        self.applied = True
        self.last_loss = None
        theta: dict[str, torch.Tensor] = {}
        # Replies are taken in the order the calls were sent (a push's acknowledgement, then its
        # bucket's θ), so θ of bucket i goes into the parameters while later buckets are still
        # on the wire, not after the last acknowledgement.
        calls = sorted([(False, s, c) for s, c in self._pending] + [(True, s, c) for s, c in pulls],
                       key=lambda x: x[2].start)
        try:
            with torch.no_grad():
                for is_pull, s, call in calls:
                    reply = self.shards[s].caller.finish(call)
                    if not is_pull:
                        self.applied = self.applied and bool(reply.fields.get("applied", True))
                        continue
                    self.last_loss = reply.fields.get("loss", self.last_loss)
                    if params is None:
                        theta.update(reply.tensors)
                        continue
                    for key, t in reply.tensors.items():
                        name, q = self._piece[key]
                        if name not in self.bound:
                            q.of(params[name]).copy_(t, non_blocking=True)
        finally:
            self._pending.clear()
        if params is not None:
            if any(shard.theta_seg is not None for shard in self.shards):
                self.load(params)  # the pieces θ's segments hold
            else:
                self.stager.sync_h2d()
        return theta

    # ------------------------------------------------------------------ pieces <-> tensors
    def _alloc_full(self) -> dict[str, torch.Tensor]:
        return {name: torch.empty(shape, dtype=dtype) for name, (dtype, shape) in self.specs.items()}

    def _scatter(self, pieces: Tensors, out: dict[str, torch.Tensor]) -> None:
        for name, plist in self.pieces.items():
            for q in plist:
                if q.key in pieces:
                    q.of(out[name]).copy_(pieces[q.key])

    def _whole(self, pieces: Tensors) -> dict[str, torch.Tensor]:
        """Whole tensors from received pieces (a whole piece is returned as is, zero-copy)."""
        out: dict[str, torch.Tensor] = {}
        for name, plist in self.pieces.items():
            if len(plist) == 1 and plist[0].whole and plist[0].key in pieces:
                out[name] = pieces[plist[0].key]
            elif all(q.key in pieces for q in plist):
                dtype, shape = self.specs[name]
                t = torch.empty(shape, dtype=dtype)
                for q in plist:
                    q.of(t).copy_(pieces[q.key])
                out[name] = t
        return out

    def theta_from_shm(self) -> dict[str, torch.Tensor]:
        """θ as copies out of the θ segments (for callers that asked for tensors)."""
        out = self._alloc_full()
        for name, plist in self.pieces.items():
            for q in plist:
                shard = self.shards[self.owner[q.key]]
                if shard.theta_seg is not None:
                    q.of(out[name]).copy_(shard.theta_views[q.key])
        return out

    def call_all(self, op: Op, fields: Mapping[str, Any], step: int = 0) -> list[Message]:
        """Send ``op`` to every shard and wait for every reply."""
        ids = [(s, sh.caller.start(op, fields, step=step)) for s, sh in enumerate(self.shards)]
        return [self.shards[s].caller.finish(call) for s, call in ids]

    def sync(self) -> None:
        """Wait until every shard has handled everything sent to it so far."""
        for shard in self.shards:
            shard.caller.sync()

    def close(self) -> None:
        """Stop the heartbeats and close every socket (idempotent)."""
        for shard in self.shards:
            if shard.beat is not None:
                shard.beat.stop()
                shard.beat = None
            shard.caller.close()
            shard.req.close()
            shard.theta_views.clear()
            shard.grad_views.clear()
        self.bound.clear()
