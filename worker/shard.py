"""One server shard as a worker sees it: its connection, its pieces, its segments, its heartbeat.

Every shard of a :class:`worker.channel.Channel` has its own :class:`common.transport.Requester`
and :class:`worker.retry.Caller` (several calls in flight on one DEALER socket, each riding out
lost connections and server restarts) and its own heartbeat: each server keeps its own lease
on this worker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import zmq

from common.errors import PSError
from common.partition import Piece
from common.protocol import Op
from common.shm import Segment
from common.transport import Requester
from common.wire import Message
from worker.heartbeat import Heartbeat
from worker.retry import Caller, RetryPolicy


class ShardsApart(PSError):
    """The server shards answered INIT at different steps: one restarted from an older checkpoint.

    Attributes:
        versions: shard index -> the step it answered at.
        target: the newest step every shard can go back to; None when there is none.
    """

    def __init__(self, rank: int | None, by_endpoint: Mapping[str, int], versions: Mapping[int, int],
                 target: int | None) -> None:
        super().__init__(f"worker {rank}: the server shards are at different steps "
                         + ", ".join(f"{ep} at {v}" for ep, v in by_endpoint.items()))
        self.versions = dict(versions)
        self.target = target


@dataclass
class Shard:
    """One server: its requester and caller, its pieces, and its shared-memory segments (if any)."""

    req: Requester
    caller: Caller
    address: str = ""  # the endpoint as given (with any ``#curve=`` key)
    beat: Heartbeat | None = None
    info: dict[str, Any] = field(default_factory=dict)  # its REGISTER reply
    pieces: list[Piece] = field(default_factory=list)
    grad_seg: Segment | None = None
    grad_views: dict[str, torch.Tensor] = field(default_factory=dict)
    theta_seg: Segment | None = None
    theta_views: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        """The endpoint ZeroMQ dials (without any ``#curve=`` key), for messages."""
        return self.req.endpoint

    def start_heartbeat(self, ctx: zmq.Context, identity: bytes, rank: int, interval: float, curve: Any) -> None:
        """Start this shard's heartbeat, once registered (a server renews a lease only for a
        registered connection's heartbeat); nothing when one runs or ``interval`` is 0."""
        if self.beat is None and interval > 0:
            self.beat = Heartbeat(ctx, self.address, identity, rank, interval, curve)
            self.beat.start()
            self.caller.beat = self.beat

    def close(self) -> None:
        """Stop the heartbeat and close the sockets; the segments' views are dropped."""
        if self.beat is not None:
            self.beat.stop()
            self.beat = None
        self.caller.close()
        self.req.close()
        self.theta_views.clear()
        self.grad_views.clear()


def connect_shards(ctx: zmq.Context, servers: Sequence[str], identity: bytes, who: str, timeout: float,
                   curve: Any) -> list[Shard]:
    """One :class:`Shard` per endpoint, all with this worker's ``identity`` (connecting never blocks).

    Raises:
        PSError: no endpoint given.
    """
    if not servers:
        raise PSError("no server endpoint given")
    shards = []
    for ep in servers:
        req = Requester(ctx, ep, who=who, identity=identity, curve=curve)
        shards.append(Shard(req, Caller(req, ctx, who, RetryPolicy(deadline_s=timeout)), address=ep))
    return shards


def call_all(shards: Sequence[Shard], op: Op, fields: Mapping[str, Any], step: int = 0) -> list[Message]:
    """Send ``op`` to every shard and wait for every reply (in shard order)."""
    ids = [(s, sh.caller.start(op, fields, step=step)) for s, sh in enumerate(shards)]
    return [shards[s].caller.finish(call) for s, call in ids]
