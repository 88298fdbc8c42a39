"""A worker's heartbeat: a thread that pings the server, renewing its lease and watching the server.

The thread has its own DEALER (the main socket's identity plus
:data:`common.watch.HEARTBEAT_SUFFIX`, so the server knows whose lease it renews) and sends a
PING every ``interval`` seconds, also while the training thread computes. From the replies it
keeps what the training thread needs to judge a long wait:

* ``last_reply``: when the server last answered (it is alive);
* ``incarnation``: which server process answered (a change means it restarted, and whatever
  was in flight to the old one is gone);
* ``last_progress``: when the server's version or done-count last changed (alive is not enough:
  a server that answers but never moves is a stall, not a slow peer).

Pings are sent without queueing (``ZMQ_IMMEDIATE``): none pile up while the server is away.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import zmq

from common.errors import PSError
from common.protocol import Op
from common.transport import USE_DEFAULT, connect_dealer
from common.watch import HEARTBEAT_SUFFIX
from common.wire import decode, encode

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    """Pings ``endpoint`` as ``rank`` every ``interval`` seconds until :meth:`stop`."""

    def __init__(self, ctx: zmq.Context, endpoint: str, identity: bytes, rank: int, interval: float,
                 curve: Any = USE_DEFAULT) -> None:
        super().__init__(name=f"zmqps-heartbeat-{rank}", daemon=True)
        self.ctx = ctx
        self.endpoint = endpoint
        self.identity = identity + HEARTBEAT_SUFFIX
        self.rank = rank
        self.interval = interval
        self.curve = curve
        now = time.monotonic()
        self.last_reply = now
        self.last_progress = now
        self.incarnation: str | None = None
        self.formation: int | None = None  # the server's pipeline formation, as its last PING reply said
        self._state: tuple[Any, ...] | None = None
        self._halt = threading.Event()

    def stop(self) -> None:
        """End the thread (it closes its socket) and wait briefly for it."""
        self._halt.set()
        if self.is_alive():
            self.join(timeout=5)

    def run(self) -> None:
        try:
            sock = connect_dealer(self.ctx, self.endpoint, self.identity, self.curve)
        except (zmq.ZMQError, PSError) as e:
            log.warning("heartbeat to %s not started: %s", self.endpoint, e)
            return
        sock.setsockopt(zmq.IMMEDIATE, 1)
        ping = encode(Op.PING, {"rank": self.rank})
        next_ping = 0.0
        try:
            while not self._halt.is_set():
                now = time.monotonic()
                if now >= next_ping:
                    next_ping = now + self.interval
                    try:
                        sock.send_multipart(ping, zmq.NOBLOCK)
                    except zmq.Again:
                        pass  # not connected: nothing is queued
                if sock.poll(int(min(self.interval, 0.2) * 1000), zmq.POLLIN):
                    while sock.poll(0, zmq.POLLIN):
                        self._on_reply(sock.recv_multipart())
        except zmq.ContextTerminated:
            pass
        finally:
            sock.close(0)

    def _on_reply(self, frames: list[bytes]) -> None:
        try:
            msg = decode(frames)
        except PSError:
            return
        if msg.op is not Op.REPLY:
            return
        now = time.monotonic()
        self.last_reply = now
        f = msg.fields
        incarnation = f.get("incarnation")
        if isinstance(incarnation, str):
            if self.incarnation is not None and incarnation != self.incarnation:
                log.warning("the server at %s restarted (a new process answers)", self.endpoint)
            self.incarnation = incarnation
        formation = f.get("formation")
        if isinstance(formation, int) and not isinstance(formation, bool):
            self.formation = formation  # pipeline stages watch it ([Note: pipeline formations] in ps.membership)
        state = (incarnation, f.get("version"), f.get("done"), f.get("registered"))
        if state != self._state:
            self._state = state
            self.last_progress = now
