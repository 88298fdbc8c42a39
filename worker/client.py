"""``PSClient``: the client API for custom training loops.

Example::

    with PSClient("tcp://127.0.0.1:5555", rank=0, world_size=2) as ps:
        theta = ps.init(dict(model.named_parameters()))
        for step in range(ps.step, steps):
            loss = loss_fn(model(x), y); loss.backward()
            theta = ps.push_pull({n: p.grad for n, p in model.named_parameters()}, step)
            load(model, theta)
        ps.done()

Every call blocks for at most ``timeout`` seconds and then raises
:class:`common.errors.PSTimeoutError` naming the server and the operation; an ERROR reply
raises :class:`common.errors.RemoteError`. Tensors on CUDA are staged through pinned host
buffers allocated once per key and reused (safe: every call waits for its reply, so the
server has the bytes before a buffer is written again).

``server`` may list several shards, comma-separated (``tcp://a:5555,tcp://b:5555``): the
tensors are split into pieces and spread over them deterministically (``common.partition``;
every worker must list the shards in the same order). On the same host as the server, θ
and the gradients go through shared memory (``common.shm``) unless ``shm="off"``. The
bytes of both paths are handled by :class:`worker.channel.Channel`.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Mapping, Sequence

import torch
import zmq

from common.errors import PSError
from common.protocol import Op
from common.transport import make_context
from worker.channel import Channel

log = logging.getLogger(__name__)

Tensors = Mapping[str, torch.Tensor]


class PSClient:
    """A worker's connection to the parameter server (one or several shards).

    Args:
        server: the server's endpoint, e.g. ``tcp://10.0.0.1:5555``, or a comma-separated
            list of shard endpoints.
        rank: this worker's rank in ``[0, world_size)``, or None to have the server assign
            one at registration (then :attr:`rank` is set by :meth:`init`).
        world_size: the number of workers K (must match the server's ``--workers``).
        timeout: seconds any one call may block.
        role: ``data`` or ``stage`` (pipeline), for the server's log.
        worker_id: the id the server keys an assigned rank by (default :func:`default_worker_id`).
        chunk_mb: split tensors into pieces of at most this many MiB (0: never).
        shm: ``auto`` uses shared memory with a same-host server; ``off`` always frames.
        wire_dtype: ``float16``/``bfloat16`` send floating gradients narrowed (frames only).
        io_threads: ZeroMQ I/O threads of the client's own context.
    """

    def __init__(self, server: str, rank: int | None, world_size: int, timeout: float = 60.0,
                 role: str = "data", ctx: zmq.Context | None = None, worker_id: str | None = None,
                 chunk_mb: float = 1.0, shm: str = "auto", wire_dtype: str = "auto", io_threads: int = 1) -> None:
        self.server = server
        self.rank = rank
        self.worker_id = worker_id or default_worker_id()
        self.world_size = world_size
        self.timeout = timeout
        self.role = role
        self._own_ctx = ctx is None
        self.ctx = ctx or make_context(io_threads)
        endpoints = [e.strip() for e in server.split(",") if e.strip()]
        self._ch: Channel | None = Channel(self.ctx, endpoints, rank, timeout, chunk_mb, shm, wire_dtype,
                                           who=self.worker_id if rank is None else None)
        self.keys: tuple[str, ...] = ()
        self.step = 0
        """The next step to compute: the server's version after :meth:`init`, then advanced by pushes."""
        self.last_loss: float | None = None
        self.peers: list[dict[str, Any]] = []
        """Every worker's rank, role, stage and peer endpoint, from the server's INIT reply."""
        self.server_info: dict[str, Any] = {}
        """The REGISTER reply (of the first shard): world size, sync model, optimizer and lr."""

    # ------------------------------------------------------------------ API
    def init(self, named_tensors: Tensors, buckets: Sequence[Sequence[str]] | None = None,
             **register_fields: Any) -> dict[str, torch.Tensor]:
        """Register these parameters and agree on initial θ (the lowest rank's values win).

        ``buckets`` (lists of names, together covering every tensor once) are pushed
        separately by :meth:`push_bucket`; without them a step is pushed whole. Blocks until
        every worker has called ``init``. Returns θ (CPU tensors) and sets :attr:`step` to
        the server's version, which is non-zero when the server resumed. Without a rank, the
        server assigns one (the same one on every later registration of this worker id); it
        is in :attr:`rank` once this returns.
        """
        ch = self._channel(Op.REGISTER)
        self.keys = tuple(named_tensors)
        self.register(named_tensors, buckets, **register_fields)
        theta, self.step, self.peers = ch.init(named_tensors)
        return theta

    def register(self, named_tensors: Tensors, buckets: Sequence[Sequence[str]] | None = None,
                 **register_fields: Any) -> int:
        """Announce this worker and its parameters to every shard (no tensors sent); return its rank.

        Without a rank yet, the first shard assigns one and the others are told it; after
        that, re-registering sends the rank it got, so a reconnect keeps it.
        """
        ch = self._channel(Op.REGISTER)
        fields: dict[str, Any] = {"world_size": self.world_size, "role": self.role,
                                  "worker_id": self.worker_id, **register_fields}
        self.server_info = ch.register(named_tensors, buckets, fields, self.rank, self.world_size)
        if self.rank is None:
            log.info("the server assigned rank %d to worker id %r", ch.rank, self.worker_id)
        self.rank = ch.rank
        return ch.rank

    def pull(self, step: int | None = None, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        """θ ready for computing ``step`` (default :attr:`step`): waits for that step's updates."""
        ch = self._channel(Op.PULL)
        fields: dict[str, Any] = {"rank": self.rank, "step": self.step if step is None else step}
        replies = ch.call_all(Op.PULL, fields)
        pieces: dict[str, torch.Tensor] = {}
        for r in replies:
            self.last_loss = r.fields.get("loss", self.last_loss)
            pieces.update(r.tensors)
        theta = ch._whole(pieces)
        return {k: theta[k] for k in keys} if keys is not None else theta

    def push(self, grads: Tensors, step: int | None = None, samples: float | None = None,
             loss: float | None = None) -> bool:
        """Send this worker's gradients of ``step``; True if applied, False if a replay."""
        self._push_all(grads, step, samples, loss, pull=False)
        ch = self._channel(Op.PUSH)
        ch.finish(want_theta=False)
        self.step = int(ch._step["step"]) + 1
        return ch.applied

    def push_pull(self, grads: Tensors, step: int | None = None, samples: float | None = None,
                  loss: float | None = None) -> dict[str, torch.Tensor]:
        """Push the gradients of ``step`` and get θ after that step."""
        self._push_all(grads, step, samples, loss)
        return self.end_step()

    # ---------------------------------------------------------- bucketed steps (the runtime)
    def begin_step(self, step: int | None = None, samples: float | None = None, loss: float | None = None) -> None:
        """Start step ``step``: buckets pushed until :meth:`end_step` carry these fields."""
        step = self.step if step is None else step
        self._channel(Op.PUSH).begin(step, samples, loss)

    def push_bucket(self, index: int, grads: Tensors) -> None:
        """Push bucket ``index`` (the names given to :meth:`init`) now; may run in a backward hook."""
        self._channel(Op.PUSH).push_bucket(index, grads)

    def end_step(self, params: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Wait for the step's pushes and θ after it; with ``params``, load θ into them.

        Returns θ as tensors, or nothing when ``params`` were given (they now hold θ).
        """
        ch = self._channel(Op.PUSH_PULL)
        pieces = ch.finish(want_theta=True)
        self.step = int(ch._step["step"]) + 1
        self.last_loss = ch.last_loss
        if params is not None:
            ch.load(pieces, params)
            return {}
        theta = ch._whole(pieces)
        if len(theta) < len(self.keys):
            theta = {**ch.theta_from_shm(), **theta}
        return theta

    @property
    def buckets(self) -> list[list[str]]:
        """The buckets in use after :meth:`init` (one of everything when the server takes
        whole steps only, as under async/ssp)."""
        return self._channel(Op.PING).buckets

    def bind(self, params: Mapping[str, torch.Tensor]) -> int:
        """Turn CPU parameters into views of the server's θ where shared memory allows.

        Returns how many were bound. Bound parameters must not be written by the caller.
        """
        return self._channel(Op.INIT).bind(params)

    def load(self, params: Mapping[str, torch.Tensor]) -> None:
        """Copy the shared θ into ``params`` in place (nothing to do for bound ones)."""
        self._channel(Op.PULL).load(None, params)

    def done(self) -> None:
        """Tell the server this worker has finished training."""
        self._channel(Op.DONE).call_all(Op.DONE, {"rank": self.rank, "step": self.step})

    def ping(self) -> dict[str, Any]:
        """The server's status (version, workers registered and done, last loss) (first shard)."""
        fields = {} if self.rank is None else {"rank": self.rank}
        return dict(self._channel(Op.PING).call_all(Op.PING, fields)[0].fields)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._ch is not None:
            self._ch.close()
            self._ch = None
            if self._own_ctx:
                self.ctx.term()

    def __enter__(self) -> "PSClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def _req(self) -> Any:
        """The first shard's :class:`common.transport.Requester` (for tests and tools)."""
        return self._channel(Op.PING).shards[0].req

    # ------------------------------------------------------------------ internals
    def _push_all(self, grads: Tensors, step: int | None, samples: float | None, loss: float | None,
                  pull: bool = True) -> None:
        ch = self._channel(Op.PUSH)
        ch.begin(self.step if step is None else step, samples, loss, pull)
        for i in range(len(ch.buckets)):
            ch.push_bucket(i, grads)

    def _channel(self, op: Op) -> Channel:
        if self._ch is None:
            raise PSError(f"worker {self.rank}: {op.value} on a closed client")
        if self.rank is None and op not in (Op.REGISTER, Op.PING):
            raise PSError(f"worker {self.worker_id}: {op.value} before init() (no rank assigned yet)")
        return self._ch


def default_worker_id() -> str:
    """``HOSTNAME-PID``: unique per process, and stable across restarts of a container
    (Docker and Kubernetes keep the hostname, and the entry process gets the same pid).
    Elsewhere set ``--worker-id`` for a rank that survives a restart."""
    return f"{socket.gethostname()}-{os.getpid()}"
