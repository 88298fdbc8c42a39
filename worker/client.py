"""``PSClient``: the client API for custom training loops.

Example::

    with PSClient("tcp://127.0.0.1:5555", rank=0, world_size=2) as ps:
        load(model, ps.init(dict(model.named_parameters())))
        while True:
            while ps.step < steps:
                loss = loss_fn(model(x[ps.step]), y[ps.step]); loss.backward()
                load(model, ps.push_pull({n: p.grad for n, p in model.named_parameters()}, ps.step))
            if ps.done():
                break
            load(model, ps.pull())  # the server went back to an older step: recompute from there

Every call rides out lost connections and server restarts (:mod:`worker.retry`): it fails with
:class:`common.errors.PSTimeoutError`, naming the server, the operation and the step, once the
server has shown no sign of life for ``timeout`` seconds; an ERROR reply raises
:class:`common.errors.RemoteError`. A heartbeat thread (:mod:`worker.heartbeat`) keeps this
worker's lease on the server while it computes.

[Note: rewinding] If the server restarted from a checkpoint older than this worker's step (it
lost the steps after it), or dropped this rank, the client registers again and the call
returns θ at the server's version, setting :attr:`PSClient.step` to it: the caller recomputes
from there. Loop on ``client.step``, not on a counter of your own, as the example does.

Tensors on CUDA are staged through pinned host buffers allocated once per key and reused
(safe: every call waits for its reply, so the server has the bytes before a buffer is
written again).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
import uuid
from typing import Any, Callable, Mapping

import torch
import zmq

from common import faults
from common.dtypes import dtype_name
from common.errors import ErrorCode, PSError, RemoteError
from common.protocol import Op
from common.transport import USE_DEFAULT, Requester, make_context
from common.wire import Message
from worker.heartbeat import Heartbeat
from worker.retry import Caller, RetryPolicy

log = logging.getLogger(__name__)

Tensors = Mapping[str, torch.Tensor]


class _Rejoined(Exception):
    """Internal: the call ended in registering again; θ is at the server's (older) version."""

    def __init__(self, theta: dict[str, torch.Tensor]) -> None:
        super().__init__("rejoined")
        self.theta = theta


class PSClient:
    """A worker's connection to the parameter server.

    Args:
        server: the server's endpoint, e.g. ``tcp://10.0.0.1:5555``.
        rank: this worker's rank in ``[0, world_size)``, or None to have the server assign
            one at registration (then :attr:`rank` is set by :meth:`init`).
        world_size: the number of workers K (must match the server's ``--workers``).
        timeout: seconds a call may go without any sign of life from the server.
        role: ``data`` or ``stage`` (pipeline), for the server's log.
        worker_id: the id the server keys an assigned rank by (default :func:`default_worker_id`).
        heartbeat: seconds between heartbeats (0: none; then a call fails after ``timeout``
            seconds without a reply, and the server's lease only sees requests).
        curve: CURVE settings (:class:`common.security.Curve`); by default the process's.
    """

    def __init__(self, server: str, rank: int | None, world_size: int, timeout: float = 60.0,
                 role: str = "data", ctx: zmq.Context | None = None, worker_id: str | None = None,
                 heartbeat: float = 1.0, curve: Any = USE_DEFAULT) -> None:
        self.server = server
        self.rank = rank
        self.worker_id = worker_id or default_worker_id()
        self.world_size = world_size
        self.timeout = timeout
        self.role = role
        self._own_ctx = ctx is None
        self.ctx = ctx or make_context()
        self._identity = f"w{'?' if rank is None else rank}-{os.getpid()}-{uuid.uuid4().hex[:8]}".encode()
        self._curve = curve
        self._heartbeat_s = heartbeat
        self._beat: Heartbeat | None = None
        who = f"worker {self.worker_id if rank is None else rank}"
        self._req = Requester(self.ctx, server, who=who, identity=self._identity, curve=curve)
        self._caller = Caller(self._req, self.ctx, who, RetryPolicy(deadline_s=timeout))
        self._register: dict[str, Any] = {}
        self._joined = False
        self.rejoins = 0
        """How many times this client registered again (after a server restart or a shrink)."""
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
        self._register = {"params": [[k, dtype_name(t.dtype), list(t.shape)] for k, t in named_tensors.items()],
                          **register_fields}
        return self._join(named_tensors)

    def register(self, named_tensors: Tensors, **register_fields: Any) -> int:
        """Announce this worker and its parameters (no tensors sent); return its rank.

        Without a rank yet, asks the server for one; after that, re-registering sends the
        rank it got, so a reconnect keeps it.
        """
        self._register = {"params": [[k, dtype_name(t.dtype), list(t.shape)] for k, t in named_tensors.items()],
                          **register_fields}
        return self._register_again()

    def _register_again(self) -> int:
        """REGISTER with the fields of the last :meth:`register`; start the heartbeat."""
        fields: dict[str, Any] = {"world_size": self.world_size, "role": self.role, "worker_id": self.worker_id,
                                  **self._register}
        if self.rank is not None:
            fields["rank"] = self.rank
        reply = self._caller.call(Op.REGISTER, fields, step=self.step)
        self.server_info = dict(reply.fields)
        assigned = reply.fields.get("rank", self.rank)
        if not isinstance(assigned, int) or not 0 <= assigned < self.world_size:
            raise PSError(f"worker {self.worker_id}: the server at {self.server} assigned no valid rank "
                          f"(got {assigned!r})")
        if self.rank is None:
            log.info("the server assigned rank %d to worker id %r", assigned, self.worker_id)
        self.rank = assigned
        incarnation, hold = reply.fields.get("incarnation"), reply.fields.get("hold_s")
        self._caller.incarnation = incarnation if isinstance(incarnation, str) else None
        if isinstance(hold, (int, float)) and not isinstance(hold, bool):
            self._caller.policy = dataclasses.replace(self._caller.policy, hold_s=float(hold))
        self._start_heartbeat()
        return assigned

    def pull(self, step: int | None = None, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        """θ ready for computing ``step`` (default :attr:`step`): waits for that step's updates."""
        fields: dict[str, Any] = {"rank": self.rank, "step": self.step if step is None else step}
        if keys is not None:
            fields["keys"] = list(keys)
        try:
            reply = self._call(Op.PULL, fields)
        except _Rejoined as r:
            return r.theta
        self.last_loss = reply.fields.get("loss")
        return reply.tensors

    def push(self, grads: Tensors, step: int | None = None, samples: float | None = None,
             loss: float | None = None) -> bool:
        """Send this worker's gradients of ``step``; True if applied, False if a replay (or a rewind:
        then :attr:`step` is the server's older version, see the module doc)."""
        step = self.step if step is None else step
        try:
            reply = self._call(Op.PUSH, self._push_fields(step, samples, loss), self._stage(grads), step,
                               after_send=lambda: faults.hit("after-push", step))
        except _Rejoined:
            return False
        self.step = step + 1
        return bool(reply.fields.get("applied", True))

    def push_pull(self, grads: Tensors, step: int | None = None, samples: float | None = None,
                  loss: float | None = None) -> dict[str, torch.Tensor]:
        """Push the gradients of ``step`` and get θ after that step, in one round trip.

        After a rewind (see the module doc) this is θ at :attr:`step`, older than ``step + 1``.
        """
        step = self.step if step is None else step
        try:
            reply = self._call(Op.PUSH_PULL, self._push_fields(step, samples, loss), self._stage(grads), step,
                               after_send=lambda: faults.hit("after-push", step))
        except _Rejoined as r:
            return r.theta
        self.step = step + 1
        self.last_loss = reply.fields.get("loss")
        return reply.tensors

    def done(self) -> bool:
        """Tell the server this worker has finished; wait until every worker has and θ is saved.

        Returns:
            True when the job is complete. False when the server went back to an older step
            meanwhile (it restarted): :attr:`step` is that step; train on from there (after
            :meth:`pull`) and call ``done`` again.
        """
        try:
            self._call(Op.DONE, {"rank": self.rank, "step": self.step})
        except _Rejoined:
            return False
        return True

    def ping(self) -> dict[str, Any]:
        """The server's status (version, workers registered and done, last loss)."""
        return dict(self._call(Op.PING, {} if self.rank is None else {"rank": self.rank}).fields)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._beat is not None:
            self._beat.stop()
            self._beat = None
        if self._req is not None:
            self._caller.close()
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

    def _call(self, op: Op, fields: Mapping[str, Any], tensors: Tensors | None = None, step: int | None = None,
              after_send: Callable[[], None] | None = None) -> Message:
        """One call; raises :class:`_Rejoined` when the server no longer knew this rank."""
        if self._req is None:
            raise PSError(f"worker {self.rank}: {op.value} on a closed client")
        if self.rank is None and op not in (Op.REGISTER, Op.PING):
            raise PSError(f"worker {self.worker_id}: {op.value} before init() (no rank assigned yet)")
        step = self.step if step is None else step
        try:
            return self._caller.call(op, fields, tensors, step, after_send)
        except RemoteError as e:
            if e.code != ErrorCode.NOT_REGISTERED or not self._joined:
                raise
        log.warning("worker %d: the server no longer knows this rank (it restarted, or dropped it) during "
                    "%s of step %d: registering again", self.rank, op.value, step)
        self.rejoins += 1
        theta = self._join(None)
        log.warning("worker %d: rejoined; the server is at step %d", self.rank, self.step)
        raise _Rejoined(theta)

    def _join(self, offer: Tensors | None) -> dict[str, torch.Tensor]:
        """REGISTER then INIT (again, if the server restarted between the two); start the heartbeat."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self._register_again()
                initialized = bool(self.server_info.get("initialized"))
                if not initialized and offer is None:
                    raise PSError(f"worker {self.rank}: the server at {self.server} restarted without θ (no "
                                  f"checkpoint in its --checkpoint-dir) while this worker was at step "
                                  f"{self.step}: the job cannot continue exactly")
                tensors = self._stage(offer) if offer is not None and not initialized else None
                reply = self._caller.call(Op.INIT, {"rank": self.rank}, tensors, step=self.step)
                break
            except RemoteError as e:  # the server restarted between REGISTER and INIT
                if e.code != ErrorCode.NOT_REGISTERED or time.monotonic() > deadline:
                    raise
        self.step = int(reply.fields["version"])
        self.peers = list(reply.fields.get("peers") or [])
        self._joined = True
        return reply.tensors

    def _start_heartbeat(self) -> None:
        """Once registered (the server renews a lease only for a registered connection's heartbeat)."""
        if self._beat is None and self._heartbeat_s > 0:
            assert self.rank is not None
            self._beat = Heartbeat(self.ctx, self.server, self._identity, self.rank, self._heartbeat_s, self._curve)
            self._beat.start()
            self._caller.beat = self._beat

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
