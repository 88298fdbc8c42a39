"""ZeroMQ sockets for zmqps: creation with safe options, and a request/reply client.

Sockets never build frames themselves; they send what :mod:`common.wire` encodes and hand
what they receive to :func:`common.wire.decode`.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Mapping

import torch
import zmq

from common import security
from common.errors import ErrorCode, PSTimeoutError, RemoteError
from common.protocol import Op
from common.wire import DEFAULT_LIMITS, Message, WireLimits, decode, encode

log = logging.getLogger(__name__)

HEARTBEAT_IVL_MS = 1000
"""ZMTP heartbeats: every connection sends a PING this often when idle..."""
HEARTBEAT_TIMEOUT_MS = 5000
"""...and is dropped (then re-established by the connecting side) after this long without traffic."""
ROUTER_HWM = 1000
"""Messages a bound socket queues per peer, each way. Inbound, a peer past it is held back (TCP
backpressure); outbound, replies to a peer that does not read them are dropped past it. A
worker never has more than a few dozen requests in flight (the server caps parked requests per
connection), so only a peer that floods and never reads meets it: its cost stays bounded."""
RECONNECT_IVL_MS, RECONNECT_IVL_MAX_MS, CONNECT_TIMEOUT_MS = 100, 2000, 2000
"""A connecting socket retries every 0.1 s, backing off to 2 s; one TCP connect attempt gives up
after 2 s (the OS default is minutes, which would outlast a short partition)."""


class _Default:
    def __repr__(self) -> str:
        return "USE_DEFAULT"


USE_DEFAULT: Any = _Default()
"""``curve=USE_DEFAULT`` (the default): the process's settings from :func:`common.security.configure`;
``curve=None``: plaintext."""


def _curve(curve: Any) -> security.Curve | None:
    return security.default() if curve is USE_DEFAULT else curve


def _heartbeats(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)


def send_zero_copy(sock: zmq.Socket, frames: list[Any], track: bool = True) -> zmq.MessageTracker | None:
    """Send a multipart message zero-copy; with ``track``, a tracker that is done once ZeroMQ
    released *every* frame (None without).

    ``send_multipart(track=True)`` returns the tracker of the last frame only, and a last
    frame under ``zmq.COPY_THRESHOLD`` is copied and reports done at once, while the large
    frames before it may still be read: a sender that then writes into those tensors would
    tear the message. Each frame is tracked here and the trackers are combined.
    """
    if not track:
        sock.send_multipart(frames, copy=False)
        return None
    trackers = [sock.send(f, zmq.SNDMORE, copy=False, track=True) for f in frames[:-1]]
    trackers.append(sock.send(frames[-1], copy=False, track=True))
    return zmq.MessageTracker(*trackers)


def make_context(io_threads: int = 1) -> zmq.Context:
    """A new ZeroMQ context (not the global instance, so processes and tests stay isolated)."""
    ctx = zmq.Context(io_threads=io_threads)
    return ctx


def bind_router(ctx: zmq.Context, endpoint: str, limits: WireLimits = DEFAULT_LIMITS,
                curve: Any = USE_DEFAULT, max_frame: int | None = None) -> tuple[zmq.Socket, str]:
    """Bind a ROUTER socket; return it with the endpoint actually bound.

    A port of ``0`` or ``*`` lets the OS pick a free one (``tcp://127.0.0.1:0``); the
    returned endpoint names the real port. ``ZMQ_MAXMSGSIZE`` drops peers that send a frame
    over the message cap before any of it reaches Python. A client that reconnects with the
    same identity takes its old place (``ZMQ_ROUTER_HANDOVER``); idle connections exchange
    ZMTP heartbeats, so a peer that vanished without closing its connection is dropped.

    With CURVE (``curve``, by default the process's settings) the socket is a CURVE server:
    only authorized client keys get in, refusals are logged (:class:`common.security.Guard`),
    and the returned endpoint advertises the socket's public key.
    """
    curve = _curve(curve)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    # set before bind: a listening socket copies its options when it binds, so a value set later
    # never reaches the connections it accepts (``max_frame``: the server's once θ is known)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame or limits.max_message_bytes)
    sock.setsockopt(zmq.RCVHWM, ROUTER_HWM)
    sock.setsockopt(zmq.SNDHWM, ROUTER_HWM)
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
    _heartbeats(sock)
    if curve is not None:
        security.apply_server(sock, curve)
        guard = security.ensure_guard(ctx, curve)
    if endpoint.startswith("tcp://") and endpoint.rsplit(":", 1)[-1] == "0":
        endpoint = endpoint.rsplit(":", 1)[0] + ":*"
    sock.bind(endpoint)
    bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    if curve is not None:
        guard.watch(sock, bound)
    return sock, (security.advertise(bound, curve.public) if curve is not None else bound)


def connect_dealer(ctx: zmq.Context, endpoint: str, identity: bytes | None = None, curve: Any = USE_DEFAULT,
                   server_key: bytes | None = None) -> zmq.Socket:
    """A DEALER socket connected to ``endpoint`` (connecting never blocks; it reconnects by itself).

    With CURVE (``curve``, by default the process's settings) it authenticates the server by
    ``server_key``, else the key the endpoint advertises, else ``curve.server_key``.
    """
    curve = _curve(curve)
    endpoint, advertised = security.split_endpoint(endpoint)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, CONNECT_TIMEOUT_MS)
    _heartbeats(sock)
    if identity:
        sock.setsockopt(zmq.IDENTITY, identity)
    if curve is not None:
        try:
            security.apply_client(sock, curve, server_key or advertised)
        except BaseException:
            sock.close(0)
            raise
    sock.connect(endpoint)
    return sock


def bind_peer(ctx: zmq.Context, endpoint: str, advertise: str | None = None,
              limits: WireLimits = DEFAULT_LIMITS) -> tuple[zmq.Socket, str]:
    """Bind a pipeline stage's inbox (a ROUTER); return it with the endpoint neighbours should dial.

    Neighbours send activations and δ here, one way (no replies). A wildcard bind
    (``tcp://0.0.0.0:0``, ``tcp://*:0``) cannot be dialled from another host, so the returned
    endpoint puts ``advertise`` (a host name or address) in its place when given.
    """
    sock, bound = bind_router(ctx, endpoint, limits)
    if advertise and bound.startswith("tcp://"):
        port = bound.rsplit(":", 1)[-1]
        bound = f"tcp://{advertise}:{port}"
    return sock, bound


def connect_peer(ctx: zmq.Context, endpoint: str, identity: bytes | None = None) -> zmq.Socket:
    """A DEALER that sends a stage's messages to a neighbour's inbox (see :func:`bind_peer`)."""
    return connect_dealer(ctx, endpoint, identity)


class Requester:
    """Request/reply over one DEALER socket, with ids matched and a deadline on every call.

    Replies to requests that already timed out are recognised by their id and dropped.
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, who: str = "",
                 limits: WireLimits = DEFAULT_LIMITS, identity: bytes | None = None,
                 curve: Any = USE_DEFAULT) -> None:
        self.endpoint = security.split_endpoint(endpoint)[0]
        self.who = who
        self.limits = limits
        self.sock = connect_dealer(ctx, endpoint, identity, curve)
        self._ids = itertools.count(1)

    def send(self, op: Op, fields: Mapping[str, Any] | None = None,
             tensors: Mapping[str, torch.Tensor] | None = None) -> int:
        """Send one request without waiting; return its id."""
        req_id = next(self._ids)
        self.sock.send_multipart(encode(op, fields, tensors, req_id), copy=False)
        return req_id

    def receive(self, timeout_s: float) -> Message | None:
        """The next message (any id), or None if none arrives within ``timeout_s``."""
        if not self.sock.poll(max(0, int(timeout_s * 1000)), zmq.POLLIN):
            return None
        return decode(self.sock.recv_multipart(copy=False), self.limits)

    def request(self, op: Op, fields: Mapping[str, Any] | None = None,
                tensors: Mapping[str, torch.Tensor] | None = None, timeout_s: float = 60.0) -> Message:
        """Send one request and wait for its reply.

        Raises:
            PSTimeoutError: no reply within ``timeout_s`` (names the peer and the op).
            RemoteError: the peer answered with an ERROR reply.
            ProtocolError: the reply could not be decoded.
        """
        req_id = self.send(op, fields, tensors)
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            msg = self.receive(left + 0.001) if left > 0 else None
            if msg is None:
                if time.monotonic() >= deadline:
                    raise PSTimeoutError(self.endpoint, op.value, timeout_s,
                                         f"{self.who} got no reply" if self.who else "no reply")
                continue
            # [Note: id 0] an ERROR with id 0 answers a request whose header was unreadable; only
            # one request is outstanding on this socket, so it is ours.
            if msg.id != req_id and not (msg.op is Op.ERROR and msg.id == 0):
                log.debug("dropping stale reply %s to request %d", msg.op.value, msg.id)
                continue
            if msg.op is Op.ERROR:
                raise RemoteError(self.endpoint, op.value, msg.fields["code"], msg.fields["message"])
            return msg

    def close(self) -> None:
        """Close the socket without lingering."""
        self.sock.close(linger=0)


__all__ = ["USE_DEFAULT", "Requester", "bind_peer", "bind_router", "connect_dealer", "connect_peer",
           "make_context", "ErrorCode"]
