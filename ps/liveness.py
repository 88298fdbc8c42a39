"""Worker leases: who is alive, who is lost, and whose absence has outlasted the deadline.

Every message a registered worker sends, and every heartbeat from its heartbeat socket, renews
its lease. A worker silent for ``--lease`` seconds is *lost* from that moment. While its lease
runs, a rank is *held*: nobody else may register as that rank (so two processes never train as
the same rank). Pure bookkeeping with an explicit clock, so it is tested without sockets; the
server decides what a loss means (``ps.server``, ``ps.membership``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection


@dataclass
class Absence:
    """A lost rank: since when, and at which step of the job."""

    since: float
    step: int


class Liveness:
    """Leases of the ranks of one job.

    Args:
        world: the number of workers K.
        lease_s: seconds of silence after which a worker is lost.
        deadline_s: seconds a lost rank (or one that never registered, counted from the first
            registration) may stay away before :meth:`overdue` says the job must fail.
    """

    def __init__(self, world: int, lease_s: float, deadline_s: float) -> None:
        self.world = world
        self.lease_s = lease_s
        self.deadline_s = deadline_s
        self.seen: dict[int, float] = {}
        self.lost: dict[int, Absence] = {}
        self.first_seen: float | None = None

    def touch(self, rank: int, now: float) -> Absence | None:
        """Renew ``rank``'s lease; return its :class:`Absence` if it was lost (it is back)."""
        self.seen[rank] = now
        if self.first_seen is None:
            self.first_seen = now
        return self.lost.pop(rank, None)

    def pause(self, seconds: float) -> None:
        """The server itself did not run for ``seconds`` (stopped, or busy in one long step).

        [Note: the server's own stalls] Nobody could renew a lease meanwhile: heartbeats waited
        unread in the socket. Every lease, absence and deadline is moved on by that time, so a
        lease lapses only for silence while the server was listening; a 20 s SIGSTOP of the
        server must not make ``--on-worker-loss shrink`` drop healthy workers.
        """
        for rank in self.seen:
            self.seen[rank] += seconds
        for absent in self.lost.values():
            absent.since += seconds
        if self.first_seen is not None:
            self.first_seen += seconds

    def remaining(self, rank: int, now: float) -> float:
        """Seconds left on ``rank``'s lease; 0 when it lapsed or was never granted."""
        seen = self.seen.get(rank)
        if seen is None or rank in self.lost:
            return 0.0
        return max(0.0, seen + self.lease_s - now)

    def lapse(self, now: float, step: int, exempt: Collection[int] = ()) -> list[int]:
        """Ranks whose lease lapsed since the last call: they are lost from now on."""
        out = []
        for rank, seen in sorted(self.seen.items()):
            if rank not in self.lost and rank not in exempt and now - seen > self.lease_s:
                self.lost[rank] = Absence(since=seen + self.lease_s, step=step)
                out.append(rank)
        return out

    def forget(self, rank: int) -> None:
        """Stop tracking ``rank`` (it left the job)."""
        self.seen.pop(rank, None)
        self.lost.pop(rank, None)

    def overdue(self, now: float, registered: Collection[int], started: bool) -> str | None:
        """Why the job cannot go on, once an absence outlasts the deadline; else None.

        Args:
            now: the current time.
            registered: ranks registered now.
            started: whether training began (before it, every rank must register in time).
        """
        for rank, absent in sorted(self.lost.items()):
            if now - absent.since > self.deadline_s:
                return (f"rank {rank} was lost at step {absent.step} and did not come back within "
                        f"{self.deadline_s:g}s")
        if not started and self.first_seen is not None and now - self.first_seen > self.deadline_s:
            missing = [r for r in range(self.world) if r not in registered]
            if missing:
                return (f"rank(s) {missing} did not register within {self.deadline_s:g}s of the first "
                        f"worker")
        return None
