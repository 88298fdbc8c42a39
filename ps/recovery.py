"""The server's side of exactly-once training: fencing, leases, worker loss, and the DONE barrier.

A mixin of :class:`ps.server.Server` (it uses the server's workers, groups, waiters and store).

[Note: exactly once] A step's update is applied once, whatever is retried, replayed or restarted:

* a push is identified by (rank, step); a replay (``step`` already pushed, or already applied)
  is acknowledged and not applied (``Server._on_push``);
* a rank is bound to the connection that registered it. Requests for that rank from any other
  connection are refused (UNAUTHORIZED), and another connection may take the rank over only
  once the holder's lease has lapsed (RANK_HELD until then): a restarted worker waits at most
  one lease; two live processes never train as one rank;
* a request that repeats one its connection left parked (same op, step and keys: a client
  resends what is in flight after a reconnect) supersedes it, so a retried PUSH_PULL is answered
  once; a connection may keep only so many requests parked (``_park``), so a flood of PULLs
  cannot grow the server;
* a checkpoint holds θ, the optimizer state and the versions at one consistent step; a restarted
  server resumes from it and workers that were ahead rewind to it (they keep nothing: their
  data position and random state follow from the step), recomputing the same updates;
* DONE is a barrier: no worker is released before the final checkpoint and ``final.safetensors``
  are on disk, so a worker that exits 0 can never be needed again.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any

from common.errors import ErrorCode, ProtocolError
from common.protocol import Op
from common.watch import HEARTBEAT_SUFFIX
from common.wire import Message, error_frames
from ps.aggregate import KeyGroup
from ps.checkpoint import checkpoint_path
from ps.liveness import Liveness

log = logging.getLogger(__name__)

_UNFENCED = (Op.REGISTER, Op.PING)


class Recovery:
    """Fault handling of the server (mixed into :class:`ps.server.Server`)."""

    cfg: Any
    workers: dict
    groups: list[KeyGroup] | None
    waiters: list
    store: Any
    fast: Any
    _finished: bool

    def _init_recovery(self) -> None:
        self.liveness = Liveness(self.cfg.workers, self.cfg.lease, self.cfg.rejoin_deadline)
        self.incarnation = secrets.token_hex(8)
        self.failed: str | None = None
        self.done_waiters: list = []
        self._joining: set[int] = set()
        self.regroup_pending = False
        self._final_written = False
        self._final_failures = 0
        self._final_failing_since: float | None = None
        self._final_retry_at: float | None = None  # [Note: the final write]

    def _step_now(self) -> int:
        return self.store.version(self.store.params) if self.store.initialized else 0

    # ------------------------------------------------------------------ every message
    def _screen(self, ident: bytes, msg: Message) -> None:
        """Before a handler runs: cap this connection's parked requests, fence, renew the lease."""
        if msg.op is not Op.PING:
            self._check_parked(ident)
        rank = msg.fields.get("rank")
        if msg.op in _UNFENCED or not isinstance(rank, int) or isinstance(rank, bool):
            return
        w = self.workers.get(rank)
        if w is None:
            return
        if ident != w.identity:
            raise ProtocolError(ErrorCode.UNAUTHORIZED,
                                f"rank {rank} is registered by another connection (a newer process took it over)")
        self._renew(rank)

    def _parked_cap(self) -> int:
        """How many requests one connection may leave parked: a client keeps a PULL per bucket
        and shard in flight, so twice the key groups, plus a margin."""
        return 2 * len(self.groups or ()) + 16

    def _check_parked(self, ident: bytes) -> None:
        """Refuse a request while its connection has the most requests parked it may have."""
        n = sum(w.ident == ident for w in self.waiters) + sum(w.ident == ident for w in self.done_waiters)
        if n >= self._parked_cap():
            raise ProtocolError(ErrorCode.TOO_LARGE, f"this connection already has {n} requests waiting "
                                                     f"for an answer (at most {self._parked_cap()})")

    def _park(self, waiter: Any) -> None:
        """Park ``waiter`` (a ``ps.server.Waiter``), superseding the same request parked before."""
        waiters = self.done_waiters if waiter.op is Op.DONE else self.waiters
        same = [w for w in waiters if w.ident == waiter.ident and w.op is waiter.op and w.step == waiter.step
                and w.keys == waiter.keys]
        for w in same:
            waiters.remove(w)
        waiters.append(waiter)

    def _drop_waiters(self, ident: bytes) -> None:
        if any(w.ident == ident for w in self.waiters):
            self.waiters = [w for w in self.waiters if w.ident != ident]
        if any(w.ident == ident for w in self.done_waiters):
            self.done_waiters = [w for w in self.done_waiters if w.ident != ident]

    def _renew(self, rank: int) -> None:
        back = self.liveness.touch(rank, time.monotonic())
        if back is not None:
            log.warning("rank %d is back after %.1fs away (lost at step %d)", rank,
                        time.monotonic() - back.since, back.step)

    def _admit(self, ident: bytes, rank: int) -> None:
        """May ``ident`` register as ``rank``? Raises RANK_HELD while another connection's lease runs."""
        old = self.workers.get(rank)
        if old is None or old.identity == ident:
            return
        left = self.liveness.remaining(rank, time.monotonic())
        if left > 0:
            raise ProtocolError(ErrorCode.RANK_HELD,
                                f"rank {rank} is held by a live connection; retry in {left:.1f}s, when its "
                                f"lease lapses unless it is heard from")
        self._drop_waiters(old.identity)
        log.warning("rank %d: a new connection takes over (a restarted worker)", rank)

    def _heartbeat(self, ident: bytes, rank: Any) -> None:
        """A PING from a rank's heartbeat socket renews its lease."""
        if not isinstance(rank, int) or isinstance(rank, bool):
            return
        w = self.workers.get(rank)
        if w is not None and ident == w.identity + HEARTBEAT_SUFFIX:
            self._renew(rank)

    # ------------------------------------------------------------------ periodic
    def _check_liveness(self, now: float) -> None:
        """Declare lapsed workers lost; apply ``--on-worker-loss``; fail the job past the deadline."""
        step = self._step_now()
        done = [r for r, w in self.workers.items() if w.done]
        shrink = self.cfg.on_worker_loss == "shrink" and self.groups is not None
        for rank in self.liveness.lapse(now, step, exempt=done):
            if not shrink:
                log.warning("rank %d lost: nothing heard for %.1fs, at step %d; holding the step until it "
                            "returns (--on-worker-loss wait, --rejoin-deadline %gs)",
                            rank, self.cfg.lease, step, self.cfg.rejoin_deadline)
        if shrink:
            for rank in sorted(self.liveness.lost):
                self._shrink(rank)
            return
        why = self.liveness.overdue(now, self.workers, started=self.groups is not None)
        if why is not None:
            self._fail(why)

    def _shrink(self, rank: int) -> None:
        """Drop a lost rank: the current step completes with the live workers."""
        w = self.workers.pop(rank)
        self.fast.forget(rank)
        self.liveness.forget(rank)
        self._joining.discard(rank)
        self._drop_waiters(w.identity)
        step = self._step_now()
        assert self.groups is not None
        live = sorted(self.workers)
        log.warning("rank %d lost at step %d: continuing with rank(s) %s (--on-worker-loss shrink)",
                    rank, step, live)
        self.regroup_pending = True
        for g in self.groups:
            if g.remove(rank):
                self._complete(g)
        self._regroup()
        self._wake()
        self._finish_if_done()

    def _regroup(self) -> None:
        """Between steps, make each idle group's contributors the registered ranks owning its keys.

        A group with a step in progress keeps its contributors; it is regrouped when that step
        completes (``regroup_pending`` stays set until every group has been).
        """
        if self.groups is None:
            return
        busy = False
        for g in self.groups:
            if len(g.missing()) != len(g.contributors):
                busy = True  # a step is in progress
                continue
            ranks = tuple(sorted(r for r, w in self.workers.items() if g.keys[0] in w.keys))
            if ranks != g.contributors:
                log.info("keys %s... now reduced over rank(s) %s from step %d", g.keys[0], list(ranks), g.step)
                g.contributors = ranks
        self.regroup_pending = busy
        self._joining = {r for r in self._joining
                         if any(r not in g.contributors for g in self.groups if g.keys[0] in self.workers[r].keys)}

    def _join_step(self, rank: int) -> int:
        """The version a rank that rejoins after a shrink waits for (it joins between steps)."""
        if rank not in self._joining:
            return 0
        self._regroup()
        if rank not in self._joining:
            return 0
        return self.store.version(self.workers[rank].keys) + 1

    # ------------------------------------------------------------------ the end of a job
    def _fail(self, why: str, code: ErrorCode = ErrorCode.WORKER_LOST) -> None:
        """Give up: checkpoint what is consistent, answer every parked request with ``code``, stop."""
        step = self._step_now()
        saved = ""
        self._settle()
        if self.store.initialized and step > self.saved_step and self._consistent_cut():
            self._save(step)
        if self.saved_step == step:
            saved = f"; checkpoint of step {step} written"
        elif self.saved_step >= 0:
            saved = (f"; the newest good checkpoint is {checkpoint_path(self.cfg.checkpoint_dir, self.saved_step)} "
                     f"(step {self.saved_step}): a restart resumes there")
        log.error("job failed at step %d: %s%s", step, why, saved)
        for w in [*self.waiters, *self.done_waiters]:
            self._send_frames(w.ident, error_frames(code, f"the job failed: {why}", w.req_id))
        self.waiters, self.done_waiters = [], []
        self.failed = why
        self._finished = True

    def _finish_if_done(self) -> None:
        """Once every worker of the job is done: write the final files, then release them all.

        [Note: the final write] DONE promises the final checkpoint and ``final.safetensors`` on
        disk. If writing them fails (a full disk, a read-only directory), nobody is released:
        θ stays in memory, the write is tried again with a growing pause (the operator can free
        the disk meanwhile), and after ``--rejoin-deadline`` seconds of failing the job fails -
        every waiting worker gets WRITE_FAILED and the server exits 1, naming the file and the
        error. A job never ends "done" without its files.
        """
        if not self.workers or not all(w.done for w in self.workers.values()):
            return
        if len(self.workers) < self.cfg.workers and not (self.cfg.on_worker_loss == "shrink" and self.groups):
            return
        if self._final_retry_at is not None and time.monotonic() < self._final_retry_at:
            return
        try:
            self._write_final()
        except Exception as e:  # noqa: BLE001 - an OSError mostly; whatever it is, the job is not done
            now = time.monotonic()
            self._final_failures += 1
            if self._final_failing_since is None:
                self._final_failing_since = now
            failing = now - self._final_failing_since
            why = (f"cannot write the final checkpoint and final.safetensors in {self.cfg.checkpoint_dir}: "
                   f"{type(e).__name__}: {e}")
            if failing > self.cfg.rejoin_deadline:
                self._fail(f"{why} (failing for {failing:.0f}s, --rejoin-deadline {self.cfg.rejoin_deadline:g}s)",
                           ErrorCode.WRITE_FAILED)
                return
            pause = min(30.0, 2.0 ** min(self._final_failures, 5))
            self._final_retry_at = now + pause
            log.error("%s; θ of step %d is kept in memory and the workers wait: trying again in %.0fs "
                      "(the job fails after %.0fs more)", why, self._step_now(), pause,
                      self.cfg.rejoin_deadline - failing)
            return
        version = self._step_now()
        for w in self.done_waiters:
            self._reply(w.ident, w.req_id, {"version": version})
        self.done_waiters = []
        self._finished = True

    def _consistent_cut(self) -> bool:
        """Whether θ is at one step in every key group (a checkpoint must not split a step).

        Always so in bsp ([Note: atomic steps]); pipeline stages under async/ssp move apart.
        """
        return self.groups is None or len({self.store.version(g.keys) for g in self.groups}) <= 1
