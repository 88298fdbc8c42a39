"""What every training rule shares: key groups, PULL and PUSH handling, parked answers, bookkeeping.

A :class:`StepEngine` owns, for its rule: accepting or replaying a push (:meth:`accept`), when
a parked request may be answered (:meth:`ready`), the step a (re)joining worker starts at
(:meth:`start_step`), whether θ is a consistent cut for a checkpoint (:meth:`consistent_cut`),
what it keeps in a checkpoint (:meth:`state`), and what it supports (``buckets``,
``shared_memory``, ``skip_nonfinite``, ``prescaled``: told to workers at REGISTER). The
server calls :meth:`on_push` and :meth:`on_pull`; a push goes through :func:`read_push`, the
rule, the reply (or a parked PUSH_PULL) and :meth:`wake`, entering each module once.

Staleness of an applied gradient = updates applied to its keys between the θ the worker last
received and the moment its gradient is applied (0 in bsp; about K-1 in async with equally
fast workers). The lead of a push = its step minus the slowest other live worker's clock (what
SSP bounds). Both are recorded for every applied push (:mod:`ps.metrics`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Protocol, Sequence

import torch

from common.config import ServerConfig
from common.errors import ErrorCode, ProtocolError
from common.protocol import Op
from common.wire import Message
from ps.aggregate import KeyGroup
from ps.engine.groups import form_groups
from ps.engine.pushes import Push, read_push, requested_keys
from ps.fastpath import FastPath
from ps.membership import Membership
from ps.metrics import ServerMetrics
from ps.optim import build_optimizer
from ps.outbox import Outbox
from ps.parking import Waiter
from ps.store import ParameterStore

log = logging.getLogger(__name__)


class Checkpoints(Protocol):
    """What an engine asks of the checkpoints (``ps.checkpointer.Checkpointer``)."""

    def maybe_save(self, version: int, cut: bool) -> None: ...

    def restorable(self) -> list[int]: ...


@dataclass
class Services:
    """What an engine works with; the server builds it once."""

    cfg: ServerConfig
    store: ParameterStore
    members: Membership
    metrics: ServerMetrics
    outbox: Outbox
    fast: FastPath
    checkpoints: Checkpoints


class StepEngine:
    """A training rule (see the module doc); subclasses implement :meth:`accept`."""

    name: ClassVar[str] = ""
    buckets: ClassVar[bool] = False  # takes a step's pushes bucket by bucket
    shared_memory: ClassVar[bool] = False  # gradients and θ may go through shared memory
    skip_nonfinite: ClassVar[bool] = False  # --nonfinite skip: a push can be left out of a step
    prescaled: ClassVar[bool] = False  # takes gradients pre-scaled by samples / total

    @classmethod
    def build_optimizer(cls, params: Sequence[torch.Tensor], cfg: ServerConfig) -> torch.optim.Optimizer:
        """The optimizer this rule applies to θ: ``--optimizer`` unless the rule says otherwise."""
        return build_optimizer(params, cfg)

    def register_fields(self) -> dict[str, Any]:
        """Fields this rule adds to every REGISTER reply (what a worker must know to follow it)."""
        return {}

    def __init__(self, services: Services) -> None:
        self.s = services
        self.cfg, self.store, self.members = services.cfg, services.store, services.members
        self.metrics = services.metrics
        self.groups: list[KeyGroup] | None = None
        self.loss: float | None = None
        """The latest loss over the workers (bsp: the step's weighted mean; on arrival: the mean of
        each worker's latest)."""
        self.joining: set[int] = set()  # ranks that registered into a running job (after a shrink)
        self.regroup_pending = False
        self._read: dict[int, int] = {}
        self._resumed: dict[int, int] = {}
        self._peers: dict[int, tuple[int, ...]] = {}
        self._peers_size = -1

    # ------------------------------------------------------------------ key groups
    @property
    def started(self) -> bool:
        """Whether the key groups are formed (every worker registered and θ exists)."""
        return self.groups is not None

    def form(self) -> None:
        """Form the key groups from the registered workers (once θ exists)."""
        self.groups = form_groups(self.members.workers, self.store.versions, self.store.buffers)
        for g in self.groups:  # accumulate in θ's dtype (gradients may travel narrower)
            g.dtypes = {k: self.store.params[k].dtype for k in g.keys}
        self.members.set_groups(len(self.groups))

    def joined(self, rank: int) -> None:
        """A rank registered anew; once the job runs, it joins between steps (:meth:`join_step`)."""
        if self.groups is not None:
            self.joining.add(rank)
            self.regroup_pending = True

    def drop(self, rank: int) -> None:
        """``rank`` left the job (``--on-worker-loss shrink``): the groups go on without it."""
        assert self.groups is not None
        self.regroup_pending = True
        self.joining.discard(rank)
        for g in self.groups:
            if g.remove(rank):
                self.group_complete(g)
        self.regroup()

    def group_complete(self, g: KeyGroup) -> None:
        """Group ``g`` has every contribution of its step (rules that reduce in groups act here)."""

    def regroup(self) -> None:
        """Between steps, make each idle group's contributors the registered ranks owning its keys.

        A group with a step in progress keeps its contributors; it is regrouped when that step
        completes (``regroup_pending`` stays set until every group has been).
        """
        if self.groups is None:
            return
        busy = False
        workers = self.members.workers
        for g in self.groups:
            if len(g.missing()) != len(g.contributors):
                busy = True  # a step is in progress
                continue
            ranks = tuple(sorted(r for r, w in workers.items() if g.keys[0] in w.keys))
            if ranks != g.contributors:
                log.info("keys %s... now reduced over rank(s) %s from step %d", g.keys[0], list(ranks), g.step)
                g.contributors = ranks
        self.regroup_pending = busy
        self.joining = {r for r in self.joining
                        if any(r not in g.contributors for g in self.groups if g.keys[0] in workers[r].keys)}

    def join_step(self, rank: int) -> int:
        """The version a rank that rejoins after a shrink waits for (it joins between steps)."""
        if rank not in self.joining:
            return 0
        self.regroup()
        if rank not in self.joining:
            return 0
        return self.store.version(self.members.workers[rank].keys) + 1

    # ------------------------------------------------------------------ requests
    def on_pull(self, ident: bytes, msg: Message) -> None:
        """PULL: θ for a step, parked until the rule says it may be read."""
        w = self.members.worker(msg)
        if self.groups is None:
            raise ProtocolError(ErrorCode.NOT_INITIALIZED, "pull before every worker has called init")
        keys = requested_keys(msg, w, self.store)
        self.members.parking.park(Waiter(ident, msg.id, Op.PULL, w.rank, keys, step=msg.fields.get("step", 0),
                                         shm=bool(msg.fields.get("shm")), have=msg.fields.get("have")))
        self.wake()

    def on_push(self, ident: bytes, msg: Message) -> None:
        """PUSH and PUSH_PULL: checked, given to the rule, then acknowledged or parked for θ."""
        t0 = time.monotonic()
        w = self.members.worker(msg)
        if self.groups is None:
            raise ProtocolError(ErrorCode.NOT_INITIALIZED, "push before every worker has called init")
        s = self.s
        push = read_push(msg, w, self.groups, self.cfg, self.store, s.fast, self.metrics, self.prescaled)
        applied = self.accept(push)
        if not applied:
            log.debug("rank %d replayed step %d: acknowledged, not applied", w.rank, push.step)
        if msg.op is Op.PUSH:
            s.outbox.reply(ident, Op.PUSH, msg.id, {"applied": applied, "version": self.store.version(w.keys)})
            self.metrics.request(msg.op.value, time.monotonic() - t0)
        else:
            self.members.parking.park(Waiter(ident, msg.id, Op.PUSH_PULL, w.rank, push.keys, step=push.step + 1,
                                             shm=push.shm, t0=t0, have=msg.fields.get("have")))
        self.wake()

    def wake(self) -> None:
        """Answer every parked request the rule allows now."""
        self.members.parking.wake(self._answerable, self._answer)

    def _answerable(self, w: Waiter) -> bool:
        if self.members.outdated(w):
            return True  # answered with REFORMING ([Note: pipeline formations])
        if self.groups is None or not self.store.initialized:
            return False
        if w.op is Op.INIT and (self.members.stage_barrier(w.rank) or self.start_barrier(w.rank)):
            return False
        return self.ready(w.rank, w.step, w.keys)

    def _answer(self, w: Waiter) -> None:
        if self.members.outdated(w):
            self.s.outbox.error(w.ident, ErrorCode.REFORMING, f"rank {w.rank}: another stage restarted or moved: "
                                                              f"every stage starts again together", w.req_id)
            return
        version = self.store.version(w.keys)
        self.on_read(w.rank, version)
        fields: dict[str, Any] = {"version": version, "loss": self.loss}
        if w.op is Op.INIT:
            fields["version"] = self.start_step(w.rank, version)
            fields["peers"] = self.members.peer_table()
            fields["formation"] = self.members.formation
            if (me := self.members.workers.get(w.rank)) is not None:
                me.formation = self.members.formation
            fields.update(self.s.fast.theta_fields(w.keys))
            # the steps this shard could go back to ([Note: shards rewind together])
            fields["restorable"] = sorted({*self.s.checkpoints.restorable(), self.step_now()})
        self.s.outbox.reply(w.ident, w.op, w.req_id, fields, w.keys, shm=w.shm, have=w.have)
        self.metrics.request(w.op.value, time.monotonic() - w.t0)

    # ------------------------------------------------------------------ the rule
    def accept(self, push: Push) -> bool:
        """Take ``push``: True if it counts (applied now or later), False for a replay.

        Raises:
            ProtocolError: the rule refuses it (BAD_STEP: a step it cannot take now).
        """
        raise NotImplementedError

    def ready(self, rank: int, step: int, keys: tuple[str, ...]) -> bool:
        """Whether ``rank`` may get θ of ``keys`` to compute ``step`` now (default: once θ has
        ``step`` applied steps)."""
        return self.store.version(keys) >= step

    def start_barrier(self, rank: int) -> bool:
        """Whether ``rank``'s INIT must wait for the other workers' before training starts (default:
        no; a rule whose steps wait for every worker needs none)."""
        return False

    def start_step(self, rank: int, version: int) -> int:
        """The step ``rank`` starts (or resumes) at, told in the INIT reply."""
        return version

    def consistent_cut(self) -> bool:
        """Whether θ is at one step in every key group (a checkpoint must not split a step)."""
        return self.groups is None or len({self.store.version(g.keys) for g in self.groups}) <= 1

    def step_now(self) -> int:
        """θ's version (its oldest key's), 0 before θ exists."""
        return self.store.version(self.store.params) if self.store.initialized else 0

    # ------------------------------------------------------------------ bookkeeping
    def on_read(self, rank: int, version: int) -> None:
        """θ at ``version`` (of the rank's keys) has just been sent to ``rank``."""
        self._read[rank] = version

    def record(self, push: Push) -> None:
        """Record staleness and lead of ``push``, just before it is applied."""
        w = push.worker
        version = self.store.version(w.keys)
        staleness = max(0, version - self._read.get(w.rank, version))
        self.metrics.push(w.rank, push.step, staleness, self.lead(w.rank, push.step), push.weight, push.loss)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: every worker's clock."""
        clocks = dict(self._resumed)
        clocks.update({r: w.clock for r, w in self.members.workers.items()})
        return {"model": self.name, "clocks": {str(r): c for r, c in clocks.items()}}

    def load_state(self, state: Mapping[str, Any] | None) -> None:
        """Restore the clocks saved by :meth:`state` (rules that keep clocks use them on resume)."""
        if state:
            self._resumed = {int(r): int(c) for r, c in state.get("clocks", {}).items()}

    def peers(self, rank: int) -> tuple[int, ...]:
        """Registered ranks sharing at least one key with ``rank`` (itself included), cached while
        the membership's size is unchanged."""
        workers = self.members.workers
        if self._peers_size != len(workers):
            self._peers.clear()
            self._peers_size = len(workers)
        found = self._peers.get(rank)
        if found is None:
            mine = set(workers[rank].keys) if rank in workers else set()
            found = self._peers[rank] = tuple(sorted(r for r, w in workers.items() if mine & set(w.keys)))
        return found

    def slowest(self, rank: int, exclude_self: bool = False) -> int | None:
        """The lowest clock among live (not done) peers of ``rank``; None if there are none."""
        workers = self.members.workers
        clocks = [w.clock for r in self.peers(rank) if (w := workers.get(r)) is not None
                  and not w.done and not (exclude_self and r == rank)]
        return min(clocks, default=None)

    def lead(self, rank: int, step: int) -> int:
        """How many steps ``step`` is ahead of the slowest other live peer (0 if none)."""
        slowest = self.slowest(rank, exclude_self=True)
        return 0 if slowest is None else max(0, step - slowest)
