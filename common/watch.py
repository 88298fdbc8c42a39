"""Watching a connecting socket's handshakes, and the identity its heartbeats use.

A DEALER reconnects by itself, but whatever was in flight on a connection that dropped is gone
(the request, or the reply the server sent while the client was away), and a refused CURVE
handshake only shows as an event on the socket's monitor. :class:`HandshakeWatch` turns those
events into two facts a caller can act on: ``generation`` (how many handshakes have succeeded:
when it changes, the connection is new and a pending request must be sent again) and
``failure`` (why the last handshake was refused, if it was).
"""

from __future__ import annotations

import itertools

import zmq
from zmq.utils.monitor import parse_monitor_message

HEARTBEAT_SUFFIX = b"/hb"
"""A client's heartbeat socket has its main socket's identity plus this suffix; the server only
renews a rank's lease from its own connections (so nobody can keep a dead rank alive)."""

_EVENTS = (zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_DISCONNECTED)
_REASONS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "security mechanism mismatch (one side uses CURVE, the other "
                                                "does not)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "CURVE cryptographic error (wrong server key?)",
}
_ids = itertools.count(1)


class HandshakeWatch:
    """The handshake history of one connecting socket, read from its monitor without blocking.

    Attributes:
        generation: handshakes that succeeded so far.
        failure: why the latest handshake was refused, or None.
        disconnects: connections that dropped so far.
    """

    def __init__(self, ctx: zmq.Context, sock: zmq.Socket) -> None:
        addr = f"inproc://zmqps-watch-{next(_ids)}-{id(sock)}"
        sock.monitor(addr, _EVENTS)
        self._sock = sock
        self._mon = ctx.socket(zmq.PAIR)
        self._mon.linger = 0
        self._mon.connect(addr)
        self.generation = 0
        self.disconnects = 0
        self.failure: str | None = None

    def update(self) -> None:
        """Read every pending event."""
        while self._mon.poll(0, zmq.POLLIN):
            ev = parse_monitor_message(self._mon.recv_multipart())
            kind, value = int(ev["event"]), int(ev["value"])
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.generation += 1
                self.failure = None
            elif kind == zmq.EVENT_DISCONNECTED:
                self.disconnects += 1
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.failure = f"the server refused our CURVE key (ZAP status {value})"
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                self.failure = _REASONS.get(value, f"ZMTP protocol error {value:#x}")
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self.failure = ("the server hung up during the handshake (CURVE on one side only, or the "
                                "wrong server key)")

    def close(self) -> None:
        """Stop monitoring (before the socket is closed)."""
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._mon.close(0)
