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
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import Any, Mapping

import torch
import zmq

from common.dtypes import dtype_name
from common.errors import PSError
from common.protocol import Op
from common.transport import Requester, make_context
from common.wire import Message

log = logging.getLogger(__name__)

Tensors = Mapping[str, torch.Tensor]


class PSClient:
    """A worker's connection to the parameter server.

    Args:
        server: the server's endpoint, e.g. ``tcp://10.0.0.1:5555``.
        rank: this worker's rank in ``[0, world_size)``, or None to have the server assign
            one at registration (then :attr:`rank` is set by :meth:`init`).
        world_size: the number of workers K (must match the server's ``--workers``).
        timeout: seconds any one call may block.
        role: ``data`` or ``stage`` (pipeline), for the server's log.
        worker_id: the id the server keys an assigned rank by (default :func:`default_worker_id`).
    """

    def __init__(self, server: str, rank: int | None, world_size: int, timeout: float = 60.0,
                 role: str = "data", ctx: zmq.Context | None = None, worker_id: str | None = None) -> None:
        self.server = server
        self.rank = rank
        self.worker_id = worker_id or default_worker_id()
        self.world_size = world_size
        self.timeout = timeout
        self.role = role
        self._own_ctx = ctx is None
        self.ctx = ctx or make_context()
        identity = f"w{'?' if rank is None else rank}-{os.getpid()}-{uuid.uuid4().hex[:8]}".encode()
        self._req = Requester(self.ctx, server, who=f"worker {self.worker_id if rank is None else rank}",
                              identity=identity)
        self.keys: tuple[str, ...] = ()
        self.step = 0
        """The next step to compute: the server's version after :meth:`init`, then advanced by pushes."""
        self.last_loss: float | None = None
        self.peers: list[dict[str, Any]] = []
        """Every worker's rank, role, stage and peer endpoint, from the server's INIT reply."""
        self.server_info: dict[str, Any] = {}
        """The REGISTER reply: world size, sync model, optimizer and lr the server applies."""
        self._pinned: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ API
    def init(self, named_tensors: Tensors, **register_fields: Any) -> dict[str, torch.Tensor]:
        """Register these parameters and agree on initial θ (the lowest rank's values win).

        Blocks until every worker has called ``init``. Returns θ (CPU tensors) and sets
        :attr:`step` to the server's version, which is non-zero when the server resumed.
        Without a rank, the server assigns one (the same one on every later registration
        of this worker id); it is in :attr:`rank` once this returns.
        """
        self.keys = tuple(named_tensors)
        self.register(named_tensors, **register_fields)
        reply = self._call(Op.INIT, {"rank": self.rank}, self._stage(named_tensors))
        self.step = int(reply.fields["version"])
        self.peers = list(reply.fields.get("peers") or [])
        return reply.tensors

    def register(self, named_tensors: Tensors, **register_fields: Any) -> int:
        """Announce this worker and its parameters (no tensors sent); return its rank.

        Without a rank yet, asks the server for one; after that, re-registering sends the
        rank it got, so a reconnect keeps it.
        """
        specs = [[k, dtype_name(t.dtype), list(t.shape)] for k, t in named_tensors.items()]
        fields: dict[str, Any] = {"world_size": self.world_size, "params": specs, "role": self.role,
                                  "worker_id": self.worker_id, **register_fields}
        if self.rank is not None:
            fields["rank"] = self.rank
        reply = self._call(Op.REGISTER, fields)
        self.server_info = dict(reply.fields)
        assigned = reply.fields.get("rank", self.rank)
        if not isinstance(assigned, int) or not 0 <= assigned < self.world_size:
            raise PSError(f"worker {self.worker_id}: the server at {self.server} assigned no valid rank "
                          f"(got {assigned!r})")
        if self.rank is None:
            log.info("the server assigned rank %d to worker id %r", assigned, self.worker_id)
        self.rank = assigned
        return assigned

    def pull(self, step: int | None = None, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        """θ ready for computing ``step`` (default :attr:`step`): waits for that step's updates."""
        fields: dict[str, Any] = {"rank": self.rank, "step": self.step if step is None else step}
        if keys is not None:
            fields["keys"] = list(keys)
        reply = self._call(Op.PULL, fields)
        self.last_loss = reply.fields.get("loss")
        return reply.tensors

    def push(self, grads: Tensors, step: int | None = None, samples: float | None = None,
             loss: float | None = None) -> bool:
        """Send this worker's gradients of ``step``; True if applied, False if a replay."""
        step = self.step if step is None else step
        reply = self._call(Op.PUSH, self._push_fields(step, samples, loss), self._stage(grads))
        self.step = step + 1
        return bool(reply.fields.get("applied", True))

    def push_pull(self, grads: Tensors, step: int | None = None, samples: float | None = None,
                  loss: float | None = None) -> dict[str, torch.Tensor]:
        """Push the gradients of ``step`` and get θ after that step, in one round trip."""
        step = self.step if step is None else step
        reply = self._call(Op.PUSH_PULL, self._push_fields(step, samples, loss), self._stage(grads))
        self.step = step + 1
        self.last_loss = reply.fields.get("loss")
        return reply.tensors

    def done(self) -> None:
        """Tell the server this worker has finished training."""
        self._call(Op.DONE, {"rank": self.rank, "step": self.step})

    def ping(self) -> dict[str, Any]:
        """The server's status (version, workers registered and done, last loss)."""
        return dict(self._call(Op.PING, {} if self.rank is None else {"rank": self.rank}).fields)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._req is not None:
            self._req.close()
            self._req = None  # type: ignore[assignment]
            if self._own_ctx:
                self.ctx.term()

    def __enter__(self) -> "PSClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _push_fields(self, step: int, samples: float | None, loss: float | None) -> dict[str, Any]:
        fields: dict[str, Any] = {"rank": self.rank, "step": step}
        if samples is not None:
            fields["samples"] = float(samples)
        if loss is not None:
            fields["loss"] = float(loss)
        return fields

    def _call(self, op: Op, fields: Mapping[str, Any], tensors: Tensors | None = None) -> Message:
        if self._req is None:
            raise PSError(f"worker {self.rank}: {op.value} on a closed client")
        if self.rank is None and op not in (Op.REGISTER, Op.PING):
            raise PSError(f"worker {self.worker_id}: {op.value} before init() (no rank assigned yet)")
        return self._req.request(op, fields, tensors, self.timeout)

    def _stage(self, tensors: Tensors) -> dict[str, torch.Tensor]:
        """CPU views of ``tensors``; CUDA ones are copied into reused pinned buffers."""
        out: dict[str, torch.Tensor] = {}
        devices: set[torch.device] = set()
        for k, t in tensors.items():
            t = t.detach()
            if t.device.type == "cpu":
                out[k] = t
                continue
            buf = self._pinned.get(k)
            if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                buf = self._pinned[k] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            buf.copy_(t, non_blocking=True)
            out[k] = buf
            devices.add(t.device)
        for dev in devices:  # the copies were queued on each device's current stream
            torch.cuda.current_stream(dev).synchronize()
        return out


def default_worker_id() -> str:
    """``HOSTNAME-PID``: unique per process, and stable across restarts of a container
    (Docker and Kubernetes keep the hostname, and the entry process gets the same pid).
    Elsewhere set ``--worker-id`` for a rank that survives a restart."""
    return f"{socket.gethostname()}-{os.getpid()}"
