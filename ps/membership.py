"""Who the server is training with: registered workers, their ranks, leases and parked requests.

[Note: exactly once] A step's update is applied once, whatever is retried, replayed or restarted
(the replay rule itself is each step engine's, ``ps.engine``). What membership adds:

* a rank is bound to the connection that registered it. Requests for that rank from any other
  connection are refused (UNAUTHORIZED), and another connection may take the rank over only
  once the holder's lease has lapsed (RANK_HELD until then): a restarted worker waits at most
  one lease; two live processes never train as one rank;
* a connection may keep only so many requests parked, and a request that repeats one it left
  parked supersedes it (:mod:`ps.parking`);
* every message of a registered worker, and every heartbeat from its heartbeat socket, renews
  its lease; a lease lapses only for silence while the server was running
  ([Note: the server's own stalls] in ``ps.liveness``).
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from common.config import ServerConfig
from common.errors import ErrorCode, ProtocolError
from common.protocol import Op
from common.watch import HEARTBEAT_SUFFIX
from common.wire import Message
from ps.liveness import Liveness
from ps.parking import Parking
from ps.ranks import RankTable

log = logging.getLogger(__name__)

_UNFENCED = (Op.REGISTER, Op.PING)


@dataclass
class WorkerInfo:
    """One registered worker as the server sees it."""

    rank: int
    identity: bytes
    keys: tuple[str, ...]
    role: str = "data"
    endpoint: str = ""
    stage: int = -1  # pipeline stage index; -1 for a data-parallel worker
    plan: str = ""  # pipeline: the stage's layer ranges and schedule, compared by its peers
    done: bool = False
    clock: int = 0  # the next step this worker will push
    buckets: tuple[tuple[str, ...], ...] = ()  # keys pushed together (empty: all at once)
    last_seen: float = field(default_factory=time.monotonic)
    formation: int = -1  # pipeline: the formation its peer table belongs to ([Note: pipeline formations])
    request: dict[str, Any] = field(default_factory=dict)  # the REGISTER fields it registered with
    reply: dict[str, Any] = field(default_factory=dict)  # and the answer it got ([Note: idempotent register])


class Membership:
    """The registered workers by rank, the rank table, the leases and the parked requests."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.workers: dict[int, WorkerInfo] = {}
        self.ranks = RankTable()
        self.liveness = Liveness(cfg.workers, cfg.lease, cfg.rejoin_deadline)
        self.parking = Parking()
        self.incarnation = secrets.token_hex(8)
        self.registered_specs: dict[str, tuple[str, tuple[int, ...]]] = {}  # as registered, before θ exists
        self.buffer_keys: set[str] = set()  # registered as buffers ([Note: buffers in θ])
        self.parked_cap = 16  # raised with the key groups: see set_groups
        self.formation = 0  # [Note: pipeline formations]: moves whenever a stage's process or endpoint does

    # ------------------------------------------------------------------ lookups
    def worker(self, msg: Message) -> WorkerInfo:
        """The registered worker a request names (``rank``); NOT_REGISTERED if there is none."""
        rank = msg.fields["rank"]
        w = self.workers.get(rank)
        if w is None:
            raise ProtocolError(ErrorCode.NOT_REGISTERED, f"rank {rank} has not registered")
        w.last_seen = time.monotonic()
        return w

    def live(self, rank: int, now: float | None = None) -> bool:
        """Whether ``rank``'s lease runs."""
        return self.liveness.remaining(rank, time.monotonic() if now is None else now) > 0

    def held(self, now: float) -> list[int]:
        """Ranks held by a live or finished worker (the others are free for a new worker id)."""
        return [r for r, w in self.workers.items() if w.done or self.liveness.remaining(r, now) > 0]

    def all_done(self) -> bool:
        """Whether every registered worker said DONE (and there is one)."""
        return bool(self.workers) and all(w.done for w in self.workers.values())

    def stage_barrier(self, rank: int) -> bool:
        """Whether a pipeline stage's INIT must wait for the others ([Note: pipeline formations]).

        [Note: pipeline formations] Stages find each other through the INIT reply's peer table,
        and a stage restarted after a crash binds a new endpoint. So the stages of a job start
        together: a stage's INIT is answered only once every stage rank is registered and has
        its own INIT parked here, and all get one table. Each time a stage's process or
        endpoint changes, ``formation`` moves on, and every stage of an older formation stops
        (its supervisor starts it again) instead of waiting for a neighbour that is gone: one
        waiting for the server gets REFORMING, one waiting for a neighbour sees the formation in
        its heartbeat's PING replies (``worker.pipeline.runtime``).
        """
        me = self.workers.get(rank)
        if me is None or me.role != "stage":
            return False
        stages = {r: w for r, w in self.workers.items() if w.role == "stage"}
        if len(stages) < self.cfg.workers:
            return True
        return self.init_missing(stages)

    def init_missing(self, workers: Mapping[int, WorkerInfo]) -> bool:
        """Whether any of ``workers`` has no INIT parked from its current connection. A worker that
        finished (its DONE is in) takes no part any more: one restarted after the last step
        (killed before its DONE) must not wait for it (nemesis seed 203)."""
        parked = {(w.rank, w.ident) for w in self.parking.waiters if w.op is Op.INIT}
        return any((r, w.identity) not in parked for r, w in workers.items() if not w.done)

    def moved(self, old: WorkerInfo | None, identity: bytes, role: str, endpoint: str) -> bool:
        """A registration: a stage in a new process or at a new endpoint starts a new formation
        (returned: whether it did)."""
        if role == "stage" and (old is None or old.identity != identity or old.endpoint != endpoint):
            self.formation += 1
            return True
        return False

    def outdated(self, w: Any) -> bool:
        """Whether parked request ``w`` (a PULL or PUSH_PULL) comes from a stage whose peer table is
        of an older formation: it must stop and start again with the others."""
        me = self.workers.get(w.rank)
        return (w.op is not Op.INIT and me is not None and me.role == "stage" and me.identity == w.ident
                and me.formation < self.formation)

    def peer_table(self) -> list[dict[str, Any]]:
        """Every worker's rank, role, stage, peer endpoint and plan: how pipeline stages find neighbours."""
        return [{"rank": w.rank, "role": w.role, "stage": w.stage, "endpoint": w.endpoint, "plan": w.plan}
                for _, w in sorted(self.workers.items())]

    def set_groups(self, n: int) -> None:
        """The key groups are formed: a client keeps a PULL per bucket and shard in flight, so
        a connection may park twice as many requests, plus a margin."""
        self.parked_cap = 2 * n + 16

    # ------------------------------------------------------------------ every message
    def screen(self, ident: bytes, msg: Message) -> None:
        """Before a handler runs: cap this connection's parked requests, fence, renew the lease."""
        if msg.op is not Op.PING:
            self.parking.check(ident, self.parked_cap)
        rank = msg.fields.get("rank")
        if msg.op in _UNFENCED or not isinstance(rank, int) or isinstance(rank, bool):
            return
        w = self.workers.get(rank)
        if w is None:
            return
        if ident != w.identity:
            raise ProtocolError(ErrorCode.UNAUTHORIZED,
                                f"rank {rank} is registered by another connection (a newer process took it over)")
        self.renew(rank)

    def renew(self, rank: int) -> None:
        """Renew ``rank``'s lease (and say so if it was lost)."""
        back = self.liveness.touch(rank, time.monotonic())
        if back is not None:
            log.warning("rank %d is back after %.1fs away (lost at step %d)", rank,
                        time.monotonic() - back.since, back.step)

    def admit(self, ident: bytes, rank: int) -> None:
        """May ``ident`` register as ``rank``? Raises RANK_HELD while another connection's lease runs."""
        old = self.workers.get(rank)
        if old is None or old.identity == ident:
            return
        left = self.liveness.remaining(rank, time.monotonic())
        if left > 0:
            raise ProtocolError(ErrorCode.RANK_HELD,
                                f"rank {rank} is held by a live connection; retry in {left:.1f}s, when its "
                                f"lease lapses unless it is heard from")
        self.parking.drop(old.identity)
        log.warning("rank %d: a new connection takes over (a restarted worker)", rank)

    def heartbeat(self, ident: bytes, rank: Any) -> None:
        """A PING from a rank's heartbeat socket renews its lease."""
        if not isinstance(rank, int) or isinstance(rank, bool):
            return
        w = self.workers.get(rank)
        if w is not None and ident == w.identity + HEARTBEAT_SUFFIX:
            self.renew(rank)

    # ------------------------------------------------------------------ losses
    def check(self, now: float, step: int, shrink: bool, started: bool) -> tuple[list[int], str | None]:
        """Declare lapsed workers lost. Returns the ranks to drop now (``shrink``: every lost one)
        and, otherwise, why the job must fail (an absence past ``--rejoin-deadline``), or None."""
        done = [r for r, w in self.workers.items() if w.done]
        for rank in self.liveness.lapse(now, step, exempt=done):
            if not shrink:
                log.warning("rank %d lost: nothing heard for %.1fs, at step %d; holding the step until it "
                            "returns (--on-worker-loss wait, --rejoin-deadline %gs)",
                            rank, self.cfg.lease, step, self.cfg.rejoin_deadline)
        if shrink:
            return sorted(self.liveness.lost), None
        return [], self.liveness.overdue(now, self.workers, started=started)

    def remove(self, rank: int) -> WorkerInfo:
        """Drop ``rank`` from the job (``--on-worker-loss shrink``): its lease and parked requests go too."""
        w = self.workers.pop(rank)
        self.liveness.forget(rank)
        self.parking.drop(w.identity)
        return w
