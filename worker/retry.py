"""Calls that ride out lost connections and server restarts, and fail clearly when they cannot.

Every request of the protocol is idempotent (a push is identified by (rank, step), and the
server supersedes a connection's parked request with its next one), so a :class:`Caller` may
send a request again whenever what was in flight could have been lost:

* the connection was re-established (a new handshake on the socket's monitor): the request, or
  the server's reply, may have been on the connection that dropped;
* the server restarted (its heartbeat replies name a new incarnation);
* the server refused it with a retryable code (RANK_HELD), after an exponential backoff;
* without heartbeats, whenever a backoff period passes without a reply.

ZeroMQ itself reconnects, with its own backoff (``common.transport``). A call fails with a
typed error naming the server, the operation and the step: :class:`PSTimeoutError` once the
server has shown no sign of life for ``deadline_s`` (or, while it answers heartbeats, has not
moved for ``hold_s + deadline_s``); :class:`AuthenticationError` as soon as a handshake is
refused; :class:`RemoteError` for any other error reply.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import zmq

from common.errors import AuthenticationError, ErrorCode, PSTimeoutError, RemoteError
from common.protocol import Op
from common.transport import Requester
from common.watch import HandshakeWatch
from common.wire import Message
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
    """

    deadline_s: float = 60.0
    hold_s: float = 300.0
    backoff_s: float = 0.2
    backoff_max_s: float = 5.0
    poll_s: float = 0.05

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        return min(self.backoff_max_s, self.backoff_s * 2 ** min(attempt, 30))


class Caller:
    """Sends requests over one :class:`Requester` until each is answered (see the module doc).

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

    def call(self, op: Op, fields: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None,
             step: int = 0, after_send: Callable[[], None] | None = None) -> Message:
        """Send ``op`` and return its reply, resending as needed.

        Raises:
            RemoteError: an error reply that retrying cannot fix.
            AuthenticationError: the server refused the handshake.
            PSTimeoutError: past the deadlines above.
        """
        p = self.policy
        what = f"{op.value} of step {step}"
        start = time.monotonic()
        ids = {self.req.send(op, fields, tensors)}
        if after_send is not None:
            after_send()
        self.watch.update()
        generation = self.watch.generation
        incarnation = self._incarnation()
        last_life = start
        attempt = 0
        retry_at: float | None = None
        resend_at = start + p.backoff(0) if self.beat is None else float("inf")
        while True:
            msg = self.req.receive(p.poll_s)
            now = time.monotonic()
            if msg is not None:
                last_life = now
                if msg.id in ids or (msg.op is Op.ERROR and msg.id == 0):  # see transport's [Note: id 0]
                    if msg.op is not Op.ERROR:
                        return msg
                    code, text = msg.fields["code"], msg.fields["message"]
                    if code not in RETRYABLE:
                        raise RemoteError(self.req.endpoint, op.value, code, f"{text} ({self.who} at step {step})")
                    retry_at = now + p.backoff(attempt)
                    attempt += 1
                    log.info("%s: %s refused for now (%s); retrying in %.1fs", self.who, what, text,
                             retry_at - now)
            self.watch.update()
            if self.watch.failure is not None:
                raise AuthenticationError(f"{what} to {self.req.endpoint}: {self.who}: {self.watch.failure}")
            reason = None
            if self.watch.generation != generation:
                reason, last_life = "the connection was re-established", now
            elif self.beat is not None and self.beat.incarnation not in (None, incarnation):
                reason = "the server restarted"
            elif retry_at is not None and now >= retry_at:
                reason = "retry"
            elif now >= resend_at:
                reason = "no reply yet"
                resend_at = now + p.backoff(attempt)
                attempt += 1
            if reason is not None:
                ids.add(self.req.send(op, fields, tensors))
                generation = self.watch.generation
                incarnation = self._incarnation()
                retry_at = None
                self.resends += 1
                (log.debug if reason == "retry" else log.info)("%s: sending %s again (%s)", self.who, what, reason)
            if self.beat is not None:
                last_life = max(last_life, self.beat.last_reply)
                stalled = now - max(self.beat.last_progress, start)
                if stalled > p.hold_s + p.deadline_s:
                    raise PSTimeoutError(self.req.endpoint, op.value, p.hold_s + p.deadline_s,
                                         f"{self.who} at step {step}: the server answers but made no progress")
            if now - last_life > p.deadline_s:
                raise PSTimeoutError(self.req.endpoint, op.value, p.deadline_s,
                                     f"{self.who} at step {step}: no sign of life from the server")

    def _incarnation(self) -> str | None:
        """The server process a request goes to, as far as this client knows."""
        return (self.beat.incarnation if self.beat is not None else None) or self.incarnation

    def close(self) -> None:
        """Stop watching the socket (before it is closed)."""
        self.watch.close()
