"""Requests that cannot be answered yet: parked, and answered the moment their condition holds.

An INIT waits for θ and every worker; a PULL or a PUSH_PULL for the step it asks for; a DONE
for every other worker and the final files. The client's own deadline bounds the wait; the
server never blocks on one. A connection may leave only so many requests parked
(:meth:`Parking.check`), so a flood of PULLs cannot grow the server, and a request that
repeats one its connection left parked (a client resends what was in flight after a
reconnect) supersedes it, so a retried PUSH_PULL is answered once.

[Note: an older copy never supersedes] A connection's request ids only grow (one counter per
socket, ``common.transport.Requester``), and a client waits for the answer to its newest
request (a resend's ids all belong to one call; a call it gave up, e.g. a DONE refused with
NOT_REGISTERED before it registered again, is over). So a parked request is superseded only
by a repeat with a higher id: a copy with a lower id that arrives later - delayed on the way,
duplicated, or sent to the server's previous process and delivered to the new one - is not
parked at all. It used to supersede the newer one, whose answer then never came: a worker
whose DONE was answered under the old id waited for the job's end until its timeout (found
by the nemesis, ``tests/nemesis/``, diloco-async seed 1671: a server killed while two workers'
DONE were parked).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from common.errors import ErrorCode, ProtocolError
from common.protocol import Op


@dataclass
class Waiter:
    """A parked request: reply with θ for ``keys`` once ``step`` is reachable."""

    ident: bytes
    req_id: int
    op: Op
    rank: int
    keys: tuple[str, ...]
    step: int
    shm: bool = False  # reply with θ in shared memory (ps.fastpath) instead of frames
    t0: float = field(default_factory=time.monotonic)  # arrival, for the latency metric
    have: int | None = None  # the version the worker holds ([Note: sparse pulls] in common.protocol)


class Parking:
    """The parked requests: those waiting for θ (INIT, PULL, PUSH_PULL) and DONE's barrier."""

    def __init__(self) -> None:
        self.waiters: list[Waiter] = []
        self.done: list[Waiter] = []

    def check(self, ident: bytes, cap: int) -> None:
        """Refuse a request while its connection has ``cap`` requests parked already."""
        n = sum(w.ident == ident for w in self.waiters) + sum(w.ident == ident for w in self.done)
        if n >= cap:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"this connection already has {n} requests waiting "
                                                     f"for an answer (at most {cap})")

    def park(self, waiter: Waiter) -> None:
        """Park ``waiter``, superseding the same request its connection parked before (unless that
        one is newer: then ``waiter`` is an older copy and is dropped, [Note: an older copy never
        supersedes])."""
        waiters = self.done if waiter.op is Op.DONE else self.waiters
        same = [w for w in waiters if w.ident == waiter.ident and w.op is waiter.op and w.step == waiter.step
                and w.keys == waiter.keys]
        if any(w.req_id > waiter.req_id for w in same):
            return
        for w in same:
            waiters.remove(w)
        waiters.append(waiter)

    def drop(self, ident: bytes) -> None:
        """Forget every request of connection ``ident`` (it lost its rank)."""
        self.waiters = [w for w in self.waiters if w.ident != ident]
        self.done = [w for w in self.done if w.ident != ident]

    def wake(self, ready: Callable[[Waiter], bool], answer: Callable[[Waiter], None]) -> None:
        """Answer every waiter whose condition holds now (in the order they were parked)."""
        still = []
        for w in self.waiters:
            if ready(w):
                answer(w)
            else:
                still.append(w)
        self.waiters = still

    def take_all(self) -> list[Waiter]:
        """Every parked request, DONE's included; none is left parked."""
        out, self.waiters, self.done = [*self.waiters, *self.done], [], []
        return out

    def take_done(self) -> list[Waiter]:
        """The parked DONE requests; none is left parked."""
        out, self.done = self.done, []
        return out
