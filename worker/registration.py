"""Joining a job: REGISTER with every shard (the rank), INIT (θ), and shards rewinding together.

A worker joins in two calls per shard. REGISTER announces its pieces (their dtypes and
shapes, which are buffers, the aliases of tied tensors, its buckets) and, when the server
offers shared memory, gets this rank's gradient segment. INIT, answered once every worker
registered, gives θ (or the server takes this worker's offer of initial θ), the servers'
version and the table of peers.

Without a rank the first shard assigns one (the same one on every later registration of the
worker id) and the other shards are registered with it. A repeated REGISTER is idempotent on
the server ([Note: idempotent register] in ``ps/server.py``): the same connection with the
same fields gets the first answer word for word, so a worker started before its server may
resend it freely.

The worker's side of [Note: shards rewind together] (``ps/server.py``): when one shard
restarted from an older checkpoint than its siblings hold, INIT finds them at different steps
(:class:`worker.shard.ShardsApart`). The joining worker asks every shard ahead to go back to
the newest step all of them can restore (REWIND) and joins again, at most
:data:`MAX_REWINDS` times, instead of training shards that are apart.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import zmq

from common.errors import ErrorCode, PSError, RemoteError
from common.protocol import Op
from common.wire import Message
from worker.pieces import Layout, PieceMap
from worker.replies import check_theta
from worker.segments import close_grad_segment, map_theta_segment, open_grad_segment
from worker.shard import Shard, ShardsApart
from worker.staging import Stager

log = logging.getLogger(__name__)

MAX_REWINDS = 3
"""How often a joining worker asks shards at different steps to meet at the oldest one's."""

Tensors = Mapping[str, torch.Tensor]


@dataclass
class Registration:
    """What every (re-)registration of a client sends, kept so that a rejoin repeats it exactly.

    Attributes:
        tensors: meta tensors by name (only the names, dtypes and shapes are sent).
        world_size: the number of workers K (an assigned rank must lie in ``[0, K)``).
        fields: the REGISTER's other fields (world size, role, worker id, the caller's own).
        buckets: lists of names pushed together; None: one push of everything per step.
        buffers: the names that are buffers.
        aliases: other names of tied tensors (alias -> name).
    """

    tensors: dict[str, torch.Tensor]
    world_size: int
    fields: dict[str, Any]
    buckets: list[list[str]] | None = None
    buffers: list[str] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, named_tensors: Tensors, world_size: int, fields: Mapping[str, Any],
           buckets: Sequence[Sequence[str]] | None = None, buffers: Sequence[str] = (),
           aliases: Mapping[str, str] | None = None) -> "Registration":
        """The registration of ``named_tensors`` (kept as meta tensors).

        Raises:
            PSError: a name in ``buffers`` is not among the tensors.
        """
        unknown = [b for b in buffers if b not in named_tensors]
        if unknown:
            raise PSError(f"buffers {unknown[:5]} are not among the tensors given")
        return cls({k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in named_tensors.items()},
                   world_size, dict(fields), [list(b) for b in buckets] if buckets else None, list(buffers),
                   dict(aliases or {}))


class Registrar:
    """This worker's registration with every shard: its rank, its layout, the servers' answers.

    Attributes:
        rank: this worker's rank (given, or assigned by the first shard); None until assigned.
        layout: the pieces, buckets and buffers of the last registration.
        info: the first shard's REGISTER reply.
    """

    def __init__(self, ctx: zmq.Context, shards: Sequence[Shard], stager: Stager, identity: bytes,
                 rank: int | None, chunk_bytes: int, want_shm: bool, heartbeat_s: float, curve: Any,
                 narrowing: bool) -> None:
        self.ctx = ctx
        self.shards = shards
        self.stager = stager
        self.identity = identity
        self.rank = rank
        self.chunk_bytes = chunk_bytes
        self.want_shm = want_shm
        self.heartbeat_s = heartbeat_s
        self.curve = curve
        self.narrowing = narrowing
        self.layout = Layout()
        self.info: dict[str, Any] = {}
        self.formation: int | None = None  # the pipeline formation the last INIT reply was part of

    def register(self, reg: Registration, step: int = 0) -> dict[str, Any]:
        """REGISTER every piece with its shard; set up gradient segments the servers offer.

        Without a rank, the first shard assigns one (kept in :attr:`rank`) and the other
        shards are registered with it. Starts each shard's heartbeat. Called again when the
        client rejoins: the segments of the old registration are dropped. Returns the first
        shard's reply fields. Buffers are pushed as values, never scaled or narrowed.
        """
        tensors = reg.tensors
        for shard in self.shards:
            shard.pieces = []
            close_grad_segment(shard)
        pieces = PieceMap.build(tensors, self.chunk_bytes, len(self.shards))
        for s, shard in enumerate(self.shards):
            shard.pieces = pieces.per_shard[s]
        layout = Layout(pieces, [list(b) for b in reg.buckets] if reg.buckets else [list(tensors)],
                        frozenset(reg.buffers))
        self.layout = layout
        rank, assigned_here = self.rank, self.rank is None
        calls: list[tuple[int, list[list[Any]], dict[str, Any]]] = []
        for s, shard in enumerate(self.shards):
            specs = pieces.register_specs(s, tensors)
            if not specs:
                raise PSError(f"server shard {s} ({shard.endpoint}) would own no key: use fewer shards")
            mine = {p.key for p in shard.pieces}
            sb = [[p.key for b in bucket for p in pieces.pieces[b] if p.key in mine] for bucket in layout.buckets]
            f = {**reg.fields, "params": specs, "buckets": [b for b in sb if b], "shards": len(self.shards)}
            bufs = [p.key for p in shard.pieces if p.base in layout.buffers]
            if bufs:
                f["buffers"] = bufs
            tied = [[a, k] for a, k in reg.aliases.items() if any(p.base == k for p in shard.pieces)]
            if tied:
                f["aliases"] = tied
            if self.want_shm:
                f["shm"] = True
            if s > 0 or rank is not None:
                calls.append((s, specs, f))
                continue
            # No rank yet: the first shard's answer fixes the rank the others are told.
            self._registered(0, shard.caller.call(Op.REGISTER, f, step=step), reg.world_size)
            rank = self.rank
            calls.append((0, specs, {}))
        started = []
        for s, specs, f in calls:
            if f:
                f["rank"] = rank
                started.append((s, self.shards[s].caller.start(Op.REGISTER, f, step=step), specs))
            else:
                started.append((s, None, specs))
        for s, c, specs in started:
            shard = self.shards[s]
            if c is not None:
                self._registered(s, shard.caller.finish(c), reg.world_size)
            open_grad_segment(shard, specs, self.stager)
        first = self.shards[0].info
        if first.get("buckets") is False and len(layout.buckets) > 1:
            log.info("the server takes whole steps only (sync %s): one push per step", first.get("sync"))
            layout.buckets = [list(tensors)]
        if self.narrowing and any(sh.grad_seg is not None for sh in self.shards):
            log.info("gradients go through shared memory: --wire-dtype applies to frames only")
        assert self.rank is not None
        if assigned_here:
            log.info("the server assigned rank %d to worker id %r", self.rank, reg.fields.get("worker_id"))
        for shard in self.shards:
            shard.start_heartbeat(self.ctx, self.identity, self.rank, self.heartbeat_s, self.curve)
        self.info = dict(first)
        return dict(first)

    def _registered(self, s: int, reply: Message, world_size: int) -> None:
        """Take shard ``s``'s REGISTER reply: the rank, the server's incarnation and hold."""
        shard = self.shards[s]
        shard.info = dict(reply.fields)
        assigned = shard.info.get("rank", self.rank)
        if not isinstance(assigned, int) or not 0 <= assigned < world_size or \
                (self.rank is not None and s > 0 and assigned != self.rank):
            raise PSError(f"{shard.caller.who}: the server at {shard.endpoint} assigned no valid rank "
                          f"(got {assigned!r})")
        self.rank = assigned
        incarnation, hold = shard.info.get("incarnation"), shard.info.get("hold_s")
        shard.caller.incarnation = incarnation if isinstance(incarnation, str) else None
        if isinstance(hold, (int, float)) and not isinstance(hold, bool):
            shard.caller.policy = dataclasses.replace(shard.caller.policy, hold_s=float(hold))

    def init(self, tensors: Tensors | None, step: int = 0) -> tuple[dict[str, torch.Tensor], int, list[dict[str, Any]]]:
        """INIT every shard; θ (whole tensors), the servers' version, the peer table.

        ``tensors`` are this worker's offer of initial θ to shards not yet initialized; None
        when rejoining a running job (then a shard without θ is an error). Every reply is checked
        whole ([Note: checked replies] in ``worker.replies``) before θ is assembled from them.

        Raises:
            ShardsApart: the shards answered at different steps.
            PSError: a server's θ is bad (naming the key and the server); no θ is returned.
        """
        pieces = self.layout.pieces
        calls = []
        for s, shard in enumerate(self.shards):
            cpu = None
            if not shard.info.get("initialized"):
                if tensors is None:
                    raise PSError(f"worker {self.rank}: the server at {shard.endpoint} restarted without θ "
                                  f"(no checkpoint in its --checkpoint-dir) while this worker was at step {step}: "
                                  f"the job cannot continue exactly")
                cpu = self.stager.to_host({p.key: p.of(tensors[p.base]) for p in shard.pieces}, f"init{s}")
            f: dict[str, Any] = {"rank": self.rank}
            if shard.grad_seg is not None:
                f["shm"] = True  # same host: θ may come back in shared memory
            calls.append((s, shard.caller.start(Op.INIT, f, cpu, step)))
        versions: dict[int, int] = {}
        restorable: dict[int, set[int]] = {}
        peers: list[dict[str, Any]] = []
        got: list[Tensors] = []
        for s, c in calls:
            shard = self.shards[s]
            reply = shard.caller.finish(c)
            got.append(self._theta(s, reply, bool(c.fields.get("shm")), step))
            versions[s] = int(reply.fields["version"])
            restorable[s] = {int(x) for x in reply.fields.get("restorable") or () if isinstance(x, int)}
            if s == 0:
                peers = list(reply.fields.get("peers") or [])
                formation = reply.fields.get("formation")
                self.formation = formation if isinstance(formation, int) else None
        if len(set(versions.values())) > 1:
            common = set.intersection(*(restorable[s] | {versions[s]} for s in versions))
            common = {x for x in common if x <= min(versions.values())}
            raise ShardsApart(self.rank, {self.shards[s].endpoint: v for s, v in versions.items()}, versions,
                              max(common) if common else None)
        out = pieces.empty()  # every piece of it is written: each shard's reply held all of its keys
        for theta in got:
            pieces.scatter(theta, out)
        return out, versions[0], peers

    def _theta(self, s: int, reply: Message, asked_shm: bool, step: int) -> Tensors:
        """θ_0 of shard ``s``'s INIT ``reply``, checked whole ([Note: checked replies] in
        ``worker.replies``): its frames, or its θ segment (mapped here), or a PULL's frames
        when the segment the reply names cannot be mapped.

        Raises:
            PSError: naming the first bad key and the server.
        """
        shard, pieces = self.shards[s], self.layout.pieces
        who, keys = f"worker {self.rank}", pieces.keys_of(s)
        got = check_theta(reply, pieces, keys, who, shard.endpoint, shm=asked_shm)
        if self.want_shm:
            map_theta_segment(shard, reply, pieces, self.stager)
        if not got.shm:
            return got.whole
        if shard.theta_seg is not None:
            return shard.theta_views  # laid out from this worker's own pieces (map_theta_segment)
        pulled = shard.caller.call(Op.PULL, {"rank": self.rank, "step": 0}, step=step)  # θ as frames after all
        return check_theta(pulled, pieces, keys, who, shard.endpoint).whole

    def rewind(self, versions: Mapping[int, int], target: int, step: int = 0) -> None:
        """Ask every shard past ``target`` to go back to it ([Note: shards rewind together] in ``ps.server``).

        Raises:
            RemoteError: a shard cannot (the message names why).
        """
        for s, v in versions.items():
            if v > target:
                log.warning("worker %s: server shard %s is at step %d, another restarted behind it: asking it "
                            "to go back to step %d", self.rank, self.shards[s].endpoint, v, target)
                self.shards[s].caller.call(Op.REWIND, {"rank": self.rank, "step": target}, step=step)

    def join(self, reg: Registration, offer: Tensors | None, step: int,
             timeout: float) -> tuple[dict[str, torch.Tensor], int, list[dict[str, Any]]]:
        """REGISTER then INIT with every shard (again, if a server restarted between the two).

        Shards found apart are asked to rewind together and joined again. Returns θ (whole
        tensors), the servers' version and the peer table, as :meth:`init` does.

        Raises:
            PSError: the shards stay apart, or cannot meet at one step.
            RemoteError: a server refused (other than forgetting this rank meanwhile).
        """
        deadline = time.monotonic() + timeout
        rewinds = 0
        while True:
            try:
                self.register(reg, step)
                return self.init(offer, step)
            except RemoteError as e:  # a server restarted between REGISTER and INIT
                if e.code != ErrorCode.NOT_REGISTERED or time.monotonic() > deadline:
                    raise
            except ShardsApart as e:  # one shard restarted from an older checkpoint than the others hold
                rewinds += 1
                if e.target is None:
                    raise PSError(f"{e}, and no step is kept by every shard (their checkpoints and steps); "
                                  f"restart every shard from the same checkpoint step") from None
                if rewinds > MAX_REWINDS or time.monotonic() > deadline:
                    raise PSError(f"{e}: they did not come back to one step after {rewinds - 1} attempt(s); "
                                  f"restart every shard from the same checkpoint step") from None
                try:
                    self.rewind(e.versions, e.target, step)
                except RemoteError as r:
                    if r.code != ErrorCode.NOT_REGISTERED:  # else it restarted meanwhile (another worker's REWIND)
                        raise PSError(f"{e}, and one cannot go back: {r.remote_message}") from None
