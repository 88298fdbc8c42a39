"""How a worker's tensors travel: pieces over one or more server shards, frames or shared memory.

:class:`Channel` is the engine under :class:`worker.client.PSClient`, assembled from one
module per concept:

* :mod:`worker.shard`: one server shard (its connection, caller and heartbeat);
* :mod:`worker.pieces`: every tensor split into pieces (``common.partition``), each piece
  owned by one shard;
* :mod:`worker.registration`: REGISTER (the rank), INIT (θ), shards rewinding together;
* :mod:`worker.segments`: the same-host fast path. Gradients are copied into this worker's
  gradient segment and only a header travels; θ is read where the server keeps it, and CPU
  parameters can be *views* of it (:meth:`Channel.bind`), so a pull costs no copy at all;
* :mod:`worker.stepio`: a step's gradients pushed bucket by bucket (:meth:`Channel.push_bucket`),
  each as soon as it is ready, and the step's end (:meth:`Channel.finish`: one PUSH_PULL or
  PULL per shard, then every reply, in the order the calls were sent);
* :mod:`worker.replies`: every reply carrying θ (INIT, PULL, PUSH_PULL) checked whole before
  any of it is used.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any, Mapping, Sequence

import torch
import zmq

from common.compression import Compressor, parse
from common.protocol import Op
from common.transport import USE_DEFAULT
from common.wire import Message
from worker.pieces import Layout
from worker.registration import Registrar, Registration
from worker.segments import SharedTheta
from worker.shard import Shard, ShardsApart, call_all, connect_shards
from worker.staging import Stager
from worker.stepio import StepIO

log = logging.getLogger(__name__)

Tensors = Mapping[str, torch.Tensor]
WIRE = {"float16": torch.float16, "bfloat16": torch.bfloat16}
"""``--wire-dtype`` values that narrow floating gradients on the wire (``auto``: none)."""

__all__ = ["Channel", "ShardsApart", "WIRE"]


def compress_text(comp: Compressor) -> str:
    """The ``--compress`` value ``comp`` was made from."""
    spec = comp.spec
    return f"{spec.codec}:{spec.rank if spec.codec == 'powersgd' else format(spec.ratio, 'g')}"


class Channel:
    """Pieces, shards and the fast path for one worker (see the module docstring).

    Args:
        ctx: the ZeroMQ context every socket of the worker is made in.
        servers: the shards' endpoints, in the order every worker lists them.
        rank: this worker's rank, or None to have the first shard assign one.
        timeout: seconds a call may go without any sign of life from its server.
        chunk_mb: split tensors into pieces of at most this many MiB (0: never).
        shm: ``auto`` uses shared memory with a same-host server; ``off`` always frames.
        wire_dtype: ``float16``/``bfloat16`` narrow floating gradients sent as frames.
        who: how the log names this worker before it has a rank (its worker id).
        heartbeat: seconds between heartbeats to each shard (0: none).
        curve: CURVE settings (:class:`common.security.Curve`); by default the process's.
        compress: ``none``, or a codec such as ``topk:0.01`` for pushed gradients
            (``common.compression``; frames, never the gradient segment).

    Attributes:
        shards: one :class:`worker.shard.Shard` per server.
        stager: device <-> host staging of gradients and θ (``worker.staging``).
    """

    def __init__(self, ctx: zmq.Context, servers: Sequence[str], rank: int | None, timeout: float,
                 chunk_mb: float = 1.0, shm: str = "auto", wire_dtype: str = "auto", who: str | None = None,
                 heartbeat: float = 1.0, curve: Any = USE_DEFAULT, compress: str = "none") -> None:
        self.ctx = ctx
        identity = f"w{'?' if rank is None else rank}-{os.getpid()}-{uuid.uuid4().hex[:8]}".encode()
        name = f"worker {who if who is not None else rank}"
        self.shards: list[Shard] = connect_shards(ctx, servers, identity, name, timeout, curve)
        self.stager = Stager()
        self._theta = SharedTheta(self.shards, self.stager)
        wire = WIRE.get(wire_dtype)
        self._registrar = Registrar(ctx, self.shards, self.stager, identity, rank, int(chunk_mb * (1 << 20)),
                               shm != "off", heartbeat, curve, narrowing=wire is not None)
        spec = parse(compress)
        if spec.enabled and wire is not None:
            raise ValueError("compress sends values in the gradient's dtype: use it without wire_dtype")
        self._io = StepIO(self.shards, self.stager, self._theta, wire, Compressor(spec) if spec.enabled else None)

    # ------------------------------------------------------------------ what registration decided
    @property
    def rank(self) -> int | None:
        """This worker's rank: given, or assigned at registration (None until then)."""
        return self._registrar.rank

    @property
    def layout(self) -> Layout:
        """The pieces, buckets and buffers of the last registration."""
        return self._registrar.layout

    @property
    def buckets(self) -> list[list[str]]:
        """The buckets in use (one of everything when the server takes whole steps only)."""
        return self._registrar.layout.buckets

    @property
    def info(self) -> dict[str, Any]:
        """The first shard's last REGISTER reply."""
        return self._registrar.info

    def formation_moved(self) -> bool:
        """Whether the first shard's pipeline formation moved on since this worker's INIT: a stage
        restarted or moved ([Note: pipeline formations] in ``ps.membership``)."""
        beat = self.shards[0].beat
        joined = self._registrar.formation
        return beat is not None and beat.formation is not None and joined is not None and beat.formation > joined

    # ------------------------------------------------------------------ joining
    def register(self, reg: Registration, step: int = 0) -> dict[str, Any]:
        """REGISTER with every shard (see :meth:`worker.registration.Registrar.register`)."""
        return self._registrar.register(reg, step)

    def join(self, reg: Registration, offer: Tensors | None, step: int,
             timeout: float) -> tuple[dict[str, torch.Tensor], int, list[dict[str, Any]]]:
        """REGISTER then INIT with every shard; θ, the servers' version and the peer table
        (see :meth:`worker.registration.Registrar.join`)."""
        return self._registrar.join(reg, offer, step, timeout)

    def rejoin(self, reg: Registration, step: int,
               timeout: float) -> tuple[dict[str, torch.Tensor], int, list[dict[str, Any]]]:
        """Join again after a server forgot this worker (``worker.rejoin``); as :meth:`join` returns.

        The step in progress and every call in flight are forgotten; bound parameters get
        memory of their own before the old θ segment is unmapped, and are bound again to the
        new one.
        """
        self._io.reset()
        bound = self._theta.unbind()
        joined = self._registrar.join(reg, None, step, timeout)
        if bound:
            self.bind(bound)
        return joined

    # ------------------------------------------------------------------ θ in shared memory
    @property
    def bound(self) -> dict[str, torch.Tensor]:
        """Parameters (by name) that are views of a θ segment."""
        return self._theta.bound

    def bind(self, params: Tensors) -> int:
        """Make CPU parameters views of the θ segment where possible; returns how many."""
        return self._theta.bind(params, self.layout.pieces)

    def unbind(self) -> dict[str, torch.Tensor]:
        """Give bound parameters memory of their own again (before the θ segment goes); returns them."""
        return self._theta.unbind()

    def load(self, params: Tensors) -> None:
        """Copy θ from the θ segments into ``params`` (not the bound ones)."""
        self._theta.load(params, self.layout.pieces)

    def load_whole(self, theta: Tensors, params: Tensors) -> None:
        """Copy whole θ tensors into ``params`` (the bound ones already show θ)."""
        self._theta.load_whole(theta, params)

    def theta_from_shm(self) -> dict[str, torch.Tensor]:
        """θ as copies out of the θ segments (for callers that asked for tensors)."""
        return self._theta.copies(self.layout.pieces)

    def whole(self, pieces: Tensors) -> dict[str, torch.Tensor]:
        """Whole tensors from received pieces (a whole piece is returned as is, zero-copy)."""
        return self.layout.pieces.whole(pieces)

    # ------------------------------------------------------------------ a step
    @property
    def step(self) -> int:
        """The step being pushed (since :meth:`begin`)."""
        return self._io.step

    @property
    def applied(self) -> bool:
        """Every push of the last finished step was applied (not a replay)."""
        return self._io.applied

    @property
    def last_loss(self) -> float | None:
        """The server's mean loss in the last finished step's replies, if any."""
        return self._io.last_loss

    @property
    def last_version(self) -> int | None:
        """θ's version in the last finished step's θ replies, if any (see :class:`worker.stepio.StepIO`)."""
        return self._io.last_version

    def begin(self, step: int, samples: float | None, loss: float | None, pull: bool = True,
              total: float | None = None) -> None:
        """Start pushing ``step`` (see :meth:`worker.stepio.StepIO.begin`)."""
        self._io.begin(self.layout, self.rank, step, samples, loss, pull, total)

    def allow_sparse_pulls(self, holds: int) -> None:
        """θ may come back as the entries a step changed ([Note: sparse pulls] in ``common.protocol``);
        the tensors it goes into hold θ at version ``holds`` now."""
        self._io.sparse_pulls = True
        self._io.holds(holds)

    def push_bucket(self, i: int, grads: Mapping[str, torch.Tensor | None]) -> None:
        """Stage bucket ``i`` now and send it (later, if called from another thread)."""
        self._io.push_bucket(i, grads)

    def flush(self) -> None:
        """Send every staged bucket (on the thread that owns the sockets)."""
        self._io.flush()

    def finish(self, want_theta: bool = True, params: Tensors | None = None) -> dict[str, torch.Tensor]:
        """Wait for every push of the step, then θ after it (see :meth:`worker.stepio.StepIO.finish`)."""
        return self._io.finish(want_theta, params)

    # ------------------------------------------------------------------ every shard
    def call_all(self, op: Op, fields: Mapping[str, Any], step: int = 0) -> list[Message]:
        """Send ``op`` to every shard and wait for every reply."""
        return call_all(self.shards, op, fields, step)

    def sync(self) -> None:
        """Wait until every shard has handled everything sent to it so far."""
        for shard in self.shards:
            shard.caller.sync()

    def close(self) -> None:
        """Stop the heartbeats and close every socket (idempotent); log what compression saved."""
        comp = self._io.compressor
        if comp is not None and comp.dense_bytes:
            log.info("pushed %d bytes of compressed tensors (%s) for %d bytes dense: ratio %.4f",
                     comp.sent_bytes, compress_text(comp), comp.dense_bytes, comp.ratio)
            comp.dense_bytes = comp.sent_bytes = 0
        for shard in self.shards:
            shard.close()
        self._theta.bound.clear()
