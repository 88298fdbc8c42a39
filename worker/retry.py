"""Calls that ride out lost connections and server restarts, and fail clearly when they cannot.

Every request of the protocol is idempotent (a push is identified by (rank, step), and the
server supersedes a parked request that its connection sends again), so a :class:`Caller` may
send a request again whenever what was in flight could have been lost:

* the connection was re-established (a new handshake on the socket's monitor): the request, or
  the server's reply, may have been on the connection that dropped;
* the server restarted (its heartbeat replies name a new incarnation);
* the server refused it with a retryable code (RANK_HELD), after an exponential backoff;
* without heartbeats, whenever a backoff period passes without a reply.

ZeroMQ itself reconnects, with its own backoff (``common.transport``). Resending is routine and
logged at debug level only (a worker started before its server resends REGISTER several times).
What a person needs to know is that the worker is waiting, and for whom: once the server has
shown no sign of life for :attr:`RetryPolicy.report_after_s`, one line names the endpoint, the
call and how long so far; another every :attr:`RetryPolicy.report_every_s`; and one when the
server answers again. A call fails with a typed error naming the server, the operation and the step: :class:`PSTimeoutError` once the
server has shown no sign of life for ``deadline_s`` (or, while it answers heartbeats, has not
moved for ``hold_s + deadline_s``); :class:`AuthenticationError` as soon as a handshake is
refused; :class:`RemoteError` for any other error reply.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import zmq

from common.errors import AuthenticationError, ErrorCode, ProtocolError, PSError, PSTimeoutError, RemoteError
from common.protocol import Op
from common.transport import Requester
from common.watch import HandshakeWatch
from common.wire import Message, check_reply
from worker.heartbeat import Heartbeat

log = logging.getLogger(__name__)

RETRYABLE = frozenset({ErrorCode.RANK_HELD})
"""Error codes that mean "not now": the request is sent again after a backoff."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long a call keeps trying.

    Attributes:
        deadline_s: the longest the server may show no sign of life (no reply, no heartbeat
            answer, no handshake) before the call fails.
        hold_s: how long the server may hold a step while it answers heartbeats (it says so in
            its REGISTER reply: its ``--rejoin-deadline``); the call fails after
            ``hold_s + deadline_s`` without progress.
        backoff_s: the first wait before a retry; it doubles up to ``backoff_max_s``.
        poll_s: how often the call looks at its socket, monitor and heartbeat.
        report_after_s: a silence this long (at least 2.5 heartbeat intervals) is a wait worth a
            log line naming the server; shorter ones are normal start-up.
        report_every_s: how often a wait that goes on is reported again.
    """

    deadline_s: float = 60.0
    hold_s: float = 300.0
    backoff_s: float = 0.2
    backoff_max_s: float = 5.0
    poll_s: float = 0.05
    report_after_s: float = 3.0
    report_every_s: float = 15.0

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        return min(self.backoff_max_s, self.backoff_s * 2 ** min(attempt, 30))


@dataclass(eq=False)
class Call:
    """One request in flight: sent (perhaps more than once) until it is answered."""

    op: Op
    fields: Mapping[str, Any]
    tensors: Mapping[str, torch.Tensor] | None
    step: int
    start: float
    resend_at: float
    ids: set[int] = field(default_factory=set)
    reply: Message | None = None
    error: PSError | None = None
    retry_at: float | None = None
    attempt: int = 0

    @property
    def what(self) -> str:
        """How errors and log lines name the call."""
        return f"{self.op.value} of step {self.step}"

    @property
    def answered(self) -> bool:
        """A reply or a final error has arrived."""
        return self.reply is not None or self.error is not None


class Caller:
    """Sends requests over one :class:`Requester` until each is answered (see the module doc).

    Several calls may be in flight at once (:meth:`start`, then :meth:`finish` each): a reply
    is matched to its call by id whichever call is being waited for, and when the connection
    is re-established or the server restarts every unanswered call is sent again, in the order
    they were first sent (ZeroMQ keeps order on a connection, so a PULL stays behind the PUSH
    it depends on).

    Args:
        req: the request socket.
        ctx: its ZeroMQ context (for the monitor).
        who: how log lines and errors name this side, e.g. ``worker 3``.
        policy: deadlines and backoff.
    """

    def __init__(self, req: Requester, ctx: zmq.Context, who: str, policy: RetryPolicy) -> None:
        self.req = req
        self.who = who
        self.policy = policy
        self.watch = HandshakeWatch(ctx, req.sock)
        self.beat: Heartbeat | None = None
        self.incarnation: str | None = None
        """The server process this client registered with (from its REGISTER reply)."""
        self.resends = 0
        self._calls: list[Call] = []  # unanswered, in the order first sent
        self._generation = self.watch.generation
        self._seen_incarnation: str | None = None
        self._last_life = time.monotonic()
        self._waiting_since: float | None = None  # a reported wait: when the silence began
        self._reported_at = 0.0

    # ------------------------------------------------------------------ API
    def call(self, op: Op, fields: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None,
             step: int = 0, after_send: Callable[[], None] | None = None) -> Message:
        """Send ``op`` and return its reply, resending as needed.

        Raises:
            RemoteError: an error reply that retrying cannot fix.
            AuthenticationError: the server refused the handshake.
            PSTimeoutError: past the deadlines above.
        """
        c = self.start(op, fields, tensors, step)
        if after_send is not None:
            after_send()
        return self.finish(c)

    def start(self, op: Op, fields: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None,
              step: int = 0) -> Call:
        """Send ``op`` now and return its :class:`Call`; :meth:`finish` waits for the reply.

        The tensors are sent zero-copy: leave them unchanged until the call is finished.
        """
        now = time.monotonic()
        if not self._calls:  # nothing in flight: whatever happened before concerns no call
            self.watch.update()
            self._generation = self.watch.generation
            self._seen_incarnation = self._incarnation()
            self._last_life = now
        c = Call(op, fields, tensors, step, now,
                 now + self.policy.backoff(0) if self.beat is None else float("inf"))
        c.ids.add(self.req.send(op, fields, tensors))
        self._calls.append(c)
        return c

    def finish(self, c: Call) -> Message:
        """Wait for ``c``'s reply (resending what is in flight as needed); see :meth:`call`."""
        while not c.answered:
            self._turn(c)
        if c.error is not None:
            raise c.error
        assert c.reply is not None
        return c.reply

    def abandon(self) -> None:
        """Forget every call in flight (their late replies are dropped as stale)."""
        self._calls.clear()

    def sync(self, timeout_s: float = 30.0) -> None:
        """Wait until the server has handled everything sent so far (a PING behind it is answered).

        Replies to other calls that arrive meanwhile are kept for them.
        """
        c = self.start(Op.PING, {})
        deadline = time.monotonic() + timeout_s
        while not c.answered:
            if time.monotonic() > deadline:
                self._calls.remove(c)
                raise PSTimeoutError(self.req.endpoint, Op.PING.value, timeout_s, f"{self.who}: no answer to a sync")
            self._turn(c)
        if c.error is not None:
            raise c.error

    def close(self) -> None:
        """Stop watching the socket (before it is closed)."""
        self.watch.close()

    # ------------------------------------------------------------------ internals
    def _turn(self, c: Call) -> None:
        """One look at the socket, the monitor and the heartbeat while waiting for ``c``."""
        p = self.policy
        msg = self.req.receive(p.poll_s)
        now = time.monotonic()
        if msg is not None:
            self._last_life = now
            self._report_wait(c, now, now)
            target = next((x for x in self._calls if msg.id in x.ids), None)
            if target is None and msg.op is Op.ERROR and msg.id == 0:  # see transport's [Note: id 0]
                target = c
            if target is None:
                log.debug("%s: dropping a stale reply %s to request %d", self.who, msg.op.value, msg.id)
            else:
                self._answer(target, msg, now)
            if c.answered:
                return
        self.watch.update()
        if self.watch.failure is not None:
            raise AuthenticationError(f"{c.what} to {self.req.endpoint}: {self.who}: {self.watch.failure}")
        reason = None
        if self.watch.generation > max(self._generation, 1):
            reason, self._last_life = "the connection was re-established", now
        elif self.watch.generation != self._generation:  # the first connection: it carries what was queued
            self._generation = self.watch.generation
        elif self.beat is not None and self.beat.incarnation not in (None, self._seen_incarnation):
            reason = "the server restarted"
        if reason is not None:
            self._generation = self.watch.generation
            self._seen_incarnation = self._incarnation()
            for x in self._calls:
                self._resend(x, reason)
        else:
            for x in list(self._calls):
                if x.retry_at is not None and now >= x.retry_at:
                    self._resend(x, "retry")
                elif now >= x.resend_at:
                    x.resend_at = now + p.backoff(x.attempt)
                    x.attempt += 1
                    self._resend(x, "no reply yet")
        last_life = max(self._last_life, c.start)
        if self.beat is not None:
            last_life = max(last_life, self.beat.last_reply)
            stalled = now - max(self.beat.last_progress, c.start)
            if stalled > p.hold_s + p.deadline_s:
                raise PSTimeoutError(self.req.endpoint, c.op.value, p.hold_s + p.deadline_s,
                                     f"{self.who} at step {c.step}: the server answers but made no progress")
        self._report_wait(c, last_life, now)
        if now - last_life > p.deadline_s:
            raise PSTimeoutError(self.req.endpoint, c.op.value, p.deadline_s,
                                 f"{self.who} at step {c.step}: no sign of life from the server")

    def _report_wait(self, c: Call, last_life: float, now: float) -> None:
        """Say that the server is silent, once it has been for a while, and again now and then."""
        p = self.policy
        after = max(p.report_after_s, 2.5 * self.beat.interval) if self.beat is not None else p.report_after_s
        silent = now - last_life
        if silent < after:
            if self._waiting_since is not None:
                log.info("%s: the server at %s answered after %.0fs", self.who, self.req.endpoint,
                         now - self._waiting_since)
                self._waiting_since = None
            return
        if self._waiting_since is None:
            self._waiting_since, self._reported_at = last_life, now
            log.info("%s: waiting for the server at %s: no answer to %s for %.0fs (giving up after %.0fs "
                     "without one)", self.who, self.req.endpoint, c.what, silent, p.deadline_s)
        elif now - self._reported_at >= p.report_every_s:
            self._reported_at = now
            log.info("%s: still waiting for the server at %s: %.0fs without an answer (%s; giving up at %.0fs)",
                     self.who, self.req.endpoint, silent, c.what, p.deadline_s)

    def _answer(self, c: Call, msg: Message, now: float) -> None:
        if msg.op is not Op.ERROR:
            try:  # a reply holds what common.protocol.REPLIES says: a renamed field fails here, loudly
                check_reply(c.op, msg.fields)
            except ProtocolError as e:
                c.error = PSError(f"{c.what} to {self.req.endpoint}: {self.who}: the server's reply does not fit "
                                  f"the protocol ({e}); is it another version of zmqps?")
            else:
                c.reply = msg
            self._calls.remove(c)
            return
        code, text = msg.fields["code"], msg.fields["message"]
        if code not in RETRYABLE:
            c.error = RemoteError(self.req.endpoint, c.op.value, code, f"{text} ({self.who} at step {c.step})")
            self._calls.remove(c)
            return
        c.retry_at = now + self.policy.backoff(c.attempt)
        c.attempt += 1
        log.info("%s: %s refused for now (%s); retrying in %.1fs", self.who, c.what, text, c.retry_at - now)

    def _resend(self, c: Call, reason: str) -> None:
        c.ids.add(self.req.send(c.op, c.fields, c.tensors))
        c.retry_at = None
        self.resends += 1
        # a resend after a backoff is routine (see _report_wait for what a person is told); one
        # after a new connection or a server restart is worth a line
        (log.debug if reason in ("retry", "no reply yet") else log.info)("%s: sending %s again (%s)", self.who,
                                                                          c.what, reason)

    def _incarnation(self) -> str | None:
        """The server process a request goes to, as far as this client knows."""
        return (self.beat.incarnation if self.beat is not None else None) or self.incarnation
