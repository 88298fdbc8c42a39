"""Server-assigned ranks: which rank a worker that registers without one gets.

Identical replicas (``docker compose up --scale worker=K``, a Kubernetes Job, a systemd
template) start with the same arguments, so they cannot name their own rank. They send a
*worker id* instead (``--worker-id``; by default ``HOSTNAME-PID``, which is stable across
restarts of a container) and the server answers with a rank:

1. a rank the worker asks for explicitly (``--rank``) is honoured (range-checked by the caller);
2. a worker id seen before gets the rank it had (stable across reconnects and restarts, and
   across a server restart: the table is saved in every checkpoint);
3. otherwise the lowest rank that no registered worker holds and no other id has claimed;
4. failing that, the lowest rank no live worker holds (a claim by an id that never came back
   does not block a new worker forever, nor does a rank whose worker died: a container
   recreated under a new hostname takes its place once the old lease has lapsed);
5. otherwise every rank is taken: ``BAD_RANK``, and nothing changes.

[Note: choose, then bind] :meth:`RankTable.choose` only computes; the server calls
:meth:`RankTable.bind` once the whole registration has been validated, so a REGISTER that
is refused later (bad schema, wrong world size) leaves the table untouched.
"""

from __future__ import annotations

import logging
from typing import Any, Collection, Mapping

from common.errors import ErrorCode, ProtocolError

log = logging.getLogger(__name__)

MAX_WORKER_ID = 256
"""Longest worker id accepted, in characters."""


class RankTable:
    """Worker id → rank, for workers that let the server choose their rank."""

    def __init__(self) -> None:
        self._rank_of: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._rank_of)

    def rank_of(self, worker_id: str) -> int | None:
        """The rank bound to ``worker_id``, or None."""
        return self._rank_of.get(worker_id)

    def choose(self, worker_id: str | None, requested: int | None, world: int, held: Collection[int]) -> int:
        """The rank for a registering worker (pure: changes nothing).

        Args:
            worker_id: the id the worker sent, or None.
            requested: the rank the worker asked for, or None to let the server choose.
            world: the number of workers K.
            held: ranks held by a live (or finished) worker; a worker holding its own id's rank may
                re-register.

        Raises:
            ProtocolError: BAD_MESSAGE for an unusable id; BAD_RANK when no rank is free.
        """
        if worker_id is not None and not 0 < len(worker_id) <= MAX_WORKER_ID:
            raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                f"worker_id must have 1 to {MAX_WORKER_ID} characters, got {len(worker_id)}")
        if requested is not None:
            return requested
        if worker_id is None:
            raise ProtocolError(ErrorCode.BAD_RANK, "a worker without a rank must send a worker_id")
        known = self._rank_of.get(worker_id)
        if known is not None and known < world:
            return known
        claimed = {r for wid, r in self._rank_of.items() if wid != worker_id}
        free = [r for r in range(world) if r not in held]
        for r in free:
            if r not in claimed:
                return r
        if free:
            return free[0]
        owners = {r: wid for wid, r in self._rank_of.items()}
        taken = ", ".join(f"{r}={owners.get(r, '?')}" for r in sorted(held))
        raise ProtocolError(ErrorCode.BAD_RANK,
                            f"no free rank for worker {worker_id!r}: all {world} ranks are taken ({taken})")

    def bind(self, worker_id: str | None, rank: int) -> None:
        """Record that ``worker_id`` now holds ``rank`` (any other id's claim on it is dropped)."""
        if worker_id is None:
            return
        for wid in [w for w, r in self._rank_of.items() if r == rank and w != worker_id]:
            log.info("rank %d moves from worker id %r to %r", rank, wid, worker_id)
            del self._rank_of[wid]
        self._rank_of[worker_id] = rank

    def to_meta(self) -> dict[str, int]:
        """The table as a JSON-able mapping (saved with each checkpoint)."""
        return dict(self._rank_of)

    def load(self, meta: Mapping[str, Any] | None) -> None:
        """Restore a table saved by :meth:`to_meta` (ignores malformed entries)."""
        for wid, rank in (meta or {}).items():
            if isinstance(wid, str) and isinstance(rank, int) and rank >= 0:
                self._rank_of[wid] = rank
