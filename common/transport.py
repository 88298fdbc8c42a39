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

from common.errors import ErrorCode, PSTimeoutError, RemoteError
from common.protocol import Op
from common.wire import DEFAULT_LIMITS, Message, WireLimits, decode, encode

log = logging.getLogger(__name__)


def make_context(io_threads: int = 1) -> zmq.Context:
    """A new ZeroMQ context (not the global instance, so processes and tests stay isolated)."""
    ctx = zmq.Context(io_threads=io_threads)
    return ctx


def bind_router(ctx: zmq.Context, endpoint: str, limits: WireLimits = DEFAULT_LIMITS) -> tuple[zmq.Socket, str]:
    """Bind a ROUTER socket; return it with the endpoint actually bound.

    A port of ``0`` or ``*`` lets the OS pick a free one (``tcp://127.0.0.1:0``); the
    returned endpoint names the real port. ``ZMQ_MAXMSGSIZE`` drops peers that send a frame
    over the message cap before any of it reaches Python.
    """
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, limits.max_message_bytes)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    if endpoint.startswith("tcp://") and endpoint.rsplit(":", 1)[-1] == "0":
        endpoint = endpoint.rsplit(":", 1)[0] + ":*"
    sock.bind(endpoint)
    bound = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    return sock, bound


def connect_dealer(ctx: zmq.Context, endpoint: str, identity: bytes | None = None) -> zmq.Socket:
    """A DEALER socket connected to ``endpoint`` (connecting never blocks)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    if identity:
        sock.setsockopt(zmq.IDENTITY, identity)
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
                 limits: WireLimits = DEFAULT_LIMITS, identity: bytes | None = None) -> None:
        self.endpoint = endpoint
        self.who = who
        self.limits = limits
        self.sock = connect_dealer(ctx, endpoint, identity)
        self._ids = itertools.count(1)
        self._outstanding: dict[int, Op] = {}
        self._early: dict[int, Message] = {}

    def request(self, op: Op, fields: Mapping[str, Any] | None = None,
                tensors: Mapping[str, torch.Tensor] | None = None, timeout_s: float = 60.0) -> Message:
        """Send one request and wait for its reply.

        Raises:
            PSTimeoutError: no reply within ``timeout_s`` (names the peer and the op).
            RemoteError: the peer answered with an ERROR reply.
            ProtocolError: the reply could not be decoded.
        """
        return self.wait(self.send(op, fields, tensors), timeout_s)

    def send(self, op: Op, fields: Mapping[str, Any] | None = None,
             tensors: Mapping[str, torch.Tensor] | None = None) -> int:
        """Send a request without waiting; returns its id for :meth:`wait`.

        Several requests may be outstanding; the tensors must stay unchanged until their
        reply has been waited for (they are sent zero-copy).
        """
        req_id = next(self._ids)
        self.sock.send_multipart(encode(op, fields, tensors, req_id), copy=False)
        self._outstanding[req_id] = op
        return req_id

    def wait(self, req_id: int, timeout_s: float = 60.0) -> Message:
        """The reply to request ``req_id`` (see :meth:`request` for the errors)."""
        op = self._outstanding[req_id]
        try:
            msg = self._early.pop(req_id, None)
            deadline = time.monotonic() + timeout_s
            while msg is None:
                left = deadline - time.monotonic()
                if left <= 0 or not self.sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                    if time.monotonic() >= deadline:
                        raise PSTimeoutError(self.endpoint, op.value, timeout_s,
                                             f"{self.who} got no reply" if self.who else "no reply")
                    continue
                got = decode(self.sock.recv_multipart(copy=False), self.limits)
                # [Note: id 0] an ERROR with id 0 answers a request whose header was unreadable;
                # it is taken as the answer to the request being waited for.
                if got.id == req_id or (got.op is Op.ERROR and got.id == 0):
                    msg = got
                elif got.id in self._outstanding:
                    self._early[got.id] = got
                else:
                    log.debug("dropping stale reply %s to request %d", got.op.value, got.id)
        finally:
            del self._outstanding[req_id]
        if msg.op is Op.ERROR:
            raise RemoteError(self.endpoint, op.value, msg.fields["code"], msg.fields["message"])
        return msg

    def close(self) -> None:
        """Close the socket without lingering."""
        self.sock.close(linger=0)


__all__ = ["Requester", "bind_peer", "bind_router", "connect_dealer", "connect_peer", "make_context", "ErrorCode"]
