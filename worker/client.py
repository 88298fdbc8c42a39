"""``PSClient``: the client API for custom training loops.

Example::

    with PSClient("tcp://127.0.0.1:5555", rank=0, world_size=2) as ps:
        model.load_state_dict(ps.init(model))  # parameters and buffers; rank 0's values win
        while True:
            while ps.step < steps:
                model.zero_grad()
                loss = loss_fn(model(x[ps.step]), y[ps.step]); loss.backward()
                model.load_state_dict(ps.push_pull(model, ps.step))
            if ps.done():
                break
            model.load_state_dict(ps.pull())  # the server went back to an older step: recompute from there

Given a module, the client registers its whole ``state_dict()`` (``worker.modelstate``):
parameters, buffers, and every name of a tied tensor; ``push_pull(model)`` sends each
parameter's gradient (none for a parameter without one: the server's optimizer skips it,
as torch.optim does) and the buffers the step changed; θ comes back as a complete state_dict.
Named tensors work too (``init(dict(model.named_parameters()))``, ``push_pull(grads)``); a
gradient that is None is sent as absent.

Every call rides out lost connections and server restarts (:mod:`worker.retry`): it fails with
:class:`common.errors.PSTimeoutError`, naming the server, the operation and the step, once the
server has shown no sign of life for ``timeout`` seconds; an ERROR reply raises
:class:`common.errors.RemoteError`. A heartbeat thread per server (:mod:`worker.heartbeat`)
keeps this worker's lease while it computes.

[Note: rewinding] If the server restarted from a checkpoint older than this worker's step (it
lost the steps after it), or dropped this rank, the client registers again and the call
returns θ at the server's version, setting :attr:`PSClient.step` to it: the caller recomputes
from there. Loop on ``client.step``, not on a counter of your own, as the example does.

``server`` may list several shards, comma-separated (``tcp://a:5555,tcp://b:5555``): the
tensors are split into pieces and spread over them deterministically (``worker.pieces``;
every worker must list the shards in the same order). On the same host as the server, θ
and the gradients go through shared memory (``worker.segments``) unless ``shm="off"``.
:class:`worker.channel.Channel` moves the bytes. Entry points build their client with
:meth:`PSClient.from_config`, which applies every client option of a ``WorkerConfig``. The
steps pushed bucket by bucket that the data-parallel runtime takes (``begin_step``,
``push_bucket``, ``end_step``, ``bind``, ``load``) are :class:`worker.bucketed.BucketedSteps`'.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch
import zmq
from torch import nn

from common import faults
from common.config import WorkerConfig
from common.errors import PSError, RemoteError
from common.protocol import Op
from common.transport import USE_DEFAULT, Requester, make_context
from worker.bucketed import BucketedSteps
from worker.channel import Channel
from worker.heartbeat import Heartbeat
from worker.modelstate import ModelState
from worker.options import client_options, default_worker_id
from worker.registration import Registration
from worker.replies import asked_keys, check_theta
from worker.rejoin import Rejoined, rejoin_reason

log = logging.getLogger(__name__)

Tensors = Mapping[str, torch.Tensor]
Grads = Mapping[str, "torch.Tensor | None"]
T = TypeVar("T")


class PSClient(BucketedSteps):
    """A worker's connection to the parameter server (one or several shards).

    Args:
        server: the server's endpoint, e.g. ``tcp://10.0.0.1:5555``, or a comma-separated
            list of shard endpoints.
        rank: this worker's rank in ``[0, world_size)``, or None to have the server assign
            one at registration (then :attr:`rank` is set by :meth:`init`).
        world_size: the number of workers K (must match the server's ``--workers``).
        timeout: seconds a call may go without any sign of life from the server.
        role: ``data`` or ``stage`` (pipeline), for the server's log.
        worker_id: the id the server keys an assigned rank by (default :func:`default_worker_id`).
        heartbeat: seconds between heartbeats (0: none; then a call fails after ``timeout``
            seconds without a reply, and the server's lease only sees requests).
        curve: CURVE settings (:class:`common.security.Curve`); by default the process's.
        chunk_mb: split tensors into pieces of at most this many MiB (0: never).
        shm: ``auto`` uses shared memory with a same-host server; ``off`` always frames.
        wire_dtype: ``float16``/``bfloat16`` send floating gradients narrowed (frames only).
        io_threads: ZeroMQ I/O threads of the client's own context.
        compress: ``none``, or ``topk:RATIO``: pushed gradients travel compressed, with error
            feedback (``common.compression``); θ comes back exact.
    """

    def __init__(self, server: str, rank: int | None, world_size: int, timeout: float = 60.0,
                 role: str = "data", ctx: zmq.Context | None = None, worker_id: str | None = None,
                 heartbeat: float = 1.0, curve: Any = USE_DEFAULT, chunk_mb: float = 1.0, shm: str = "auto",
                 wire_dtype: str = "auto", io_threads: int = 1, compress: str = "none") -> None:
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
                                           who=self.worker_id if rank is None else None, heartbeat=heartbeat,
                                           curve=curve, compress=compress)
        self._reg: Registration | None = None  # what every (re-)registration sends
        self._state: ModelState | None = None  # the module given to init, if one was
        self._joined = False
        self.rejoins = 0
        """How many times this client registered again (after a server restart or a shrink)."""
        self.keys: tuple[str, ...] = ()
        self.step = 0
        """The next step to compute: the server's version after :meth:`init`, then advanced by pushes."""
        self.last_loss: float | None = None
        self.last_version: int | None = None
        """θ's version in the reply of the last :meth:`end_step` (the server's version just after the
        push under an on-arrival rule; None after a rejoin)."""
        self.peers: list[dict[str, Any]] = []
        """Every worker's rank, role, stage and peer endpoint, from the server's INIT reply."""
        self.server_info: dict[str, Any] = {}
        """The REGISTER reply (of the first shard): world size, sync model, optimizer and lr."""

    @classmethod
    def from_config(cls, cfg: WorkerConfig, *, role: str = "data", ctx: zmq.Context | None = None) -> "PSClient":
        """A client with every client option of ``cfg`` (:func:`worker.options.client_options`:
        CURVE included); nothing is read from the environment. With ``ctx`` (a pipeline stage
        shares its context with its peer links) ``cfg.io_threads`` is the context's business."""
        assert cfg.world_size is not None  # WorkerConfig refuses a config without one
        return cls(cfg.server, cfg.rank, cfg.world_size, role=role, ctx=ctx, **client_options(cfg))

    # ------------------------------------------------------------------ API
    def init(self, named_tensors: Tensors | nn.Module, buckets: Sequence[Sequence[str]] | None = None,
             buffers: Sequence[str] = (), aliases: Mapping[str, str] | None = None,
             **register_fields: Any) -> dict[str, torch.Tensor]:
        """Register these tensors and agree on initial θ (the lowest rank's values win).

        ``named_tensors``: a module (its parameters, persistent buffers and tied names, see the
        module doc), or tensors by name. ``buffers``: the names among them that are buffers
        (the server keeps their values, not an optimizer's); ``aliases``: other names of tied
        tensors (alias -> name), written beside them in ``final.safetensors``. ``buckets``
        (lists of names, together covering every tensor once) are pushed separately by
        :meth:`push_bucket`; without them a step is pushed whole. Blocks until every worker
        has called ``init``. Returns θ (CPU tensors; for a module, a complete state_dict) and
        sets :attr:`step` to the server's version, which is non-zero when the server resumed.
        Without a rank, the server assigns one (the same one on every later registration of
        this worker id); it is in :attr:`rank` once this returns.
        """
        self._channel(Op.REGISTER)
        if isinstance(named_tensors, nn.Module):
            self._state = ModelState(named_tensors)
            named_tensors, buffers, aliases = self._state.tensors(), list(self._state.buffers), self._state.aliases
        self.keys = tuple(named_tensors)
        self._remember(named_tensors, buckets, register_fields, buffers, aliases)
        return self._full(self._join(named_tensors))

    def register(self, named_tensors: Tensors, buckets: Sequence[Sequence[str]] | None = None,
                 buffers: Sequence[str] = (), aliases: Mapping[str, str] | None = None,
                 **register_fields: Any) -> int:
        """Announce this worker and its tensors to every shard (no tensors sent); return its rank.

        Without a rank yet, the first shard assigns one and the others are told it; after
        that, re-registering sends the rank it got, so a reconnect keeps it.
        """
        ch = self._channel(Op.REGISTER)
        self.server_info = ch.register(self._remember(named_tensors, buckets, register_fields, buffers, aliases),
                                       self.step)
        assert ch.rank is not None
        self.rank = ch.rank
        return ch.rank

    def pull(self, step: int | None = None, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
        """θ ready for computing ``step`` (default :attr:`step`): waits for that step's updates.

        ``keys``: return only these names. Every reply is checked whole first ([Note: checked
        replies] in ``worker.replies``).

        Raises:
            PSError: a server's reply is bad (naming the key and the server); nothing is returned.
        """
        ch = self._channel(Op.PULL)
        fields: dict[str, Any] = {"rank": self.rank, "step": self.step if step is None else step}
        try:
            replies = self._guard(Op.PULL, lambda: ch.call_all(Op.PULL, fields, self.step))
        except Rejoined as r:
            theta = r.theta
        else:
            pieces: dict[str, torch.Tensor] = {}
            for s, r in enumerate(replies):  # each checked whole before any is used ([Note: checked replies])
                pieces.update(check_theta(r, ch.layout.pieces, asked_keys(ch.layout.pieces, s, fields),
                                          f"worker {self.rank}", ch.shards[s].endpoint).whole)
            for r in replies:
                self.last_loss = r.fields.get("loss", self.last_loss)
            theta = ch.whole(pieces)
        return {k: theta[k] for k in keys} if keys is not None else self._full(theta)

    def push(self, grads: Grads | nn.Module, step: int | None = None, samples: float | None = None,
             loss: float | None = None) -> bool:
        """Send this worker's gradients of ``step``; True if applied, False if a replay (or a rewind:
        then :attr:`step` is the server's older version, see the module doc)."""
        ch = self._channel(Op.PUSH)
        step = self.step if step is None else step
        grads = self._grads(grads)
        try:
            self._guard(Op.PUSH, lambda: self._push_all(ch, grads, step, samples, loss, pull=False))
            self._guard(Op.PUSH, lambda: ch.finish(want_theta=False))
        except Rejoined:
            return False
        self.step = step + 1
        return ch.applied

    def push_pull(self, grads: Grads | nn.Module, step: int | None = None, samples: float | None = None,
                  loss: float | None = None) -> dict[str, torch.Tensor]:
        """Push the gradients of ``step`` and get θ after that step, in one round trip.

        ``grads``: by name (None: no gradient), or the module given to :meth:`init`. After a
        rewind (see the module doc) this is θ at :attr:`step`, older than ``step + 1``.
        """
        ch = self._channel(Op.PUSH_PULL)
        step = self.step if step is None else step
        grads = self._grads(grads)
        try:
            self._guard(Op.PUSH_PULL, lambda: self._push_all(ch, grads, step, samples, loss))
        except Rejoined as r:
            return self._full(r.theta)
        return self._full(self.end_step())

    def done(self) -> bool:
        """Tell the server this worker has finished; wait until every worker has and θ is saved.

        Returns:
            True when the job is complete. False when the server went back to an older step
            meanwhile (it restarted): :attr:`step` is that step; train on from there (after
            :meth:`pull`) and call ``done`` again.
        """
        ch = self._channel(Op.DONE)
        try:
            self._guard(Op.DONE, lambda: ch.call_all(Op.DONE, {"rank": self.rank, "step": self.step}, self.step))
        except Rejoined:
            return False
        return True

    def pull_into(self, params: Mapping[str, torch.Tensor]) -> None:
        """Load θ ready for computing :attr:`step` into ``params`` (bound ones show it already)."""
        self._channel(Op.PULL).load_whole(self.pull(), params)

    def ping(self) -> dict[str, Any]:
        """The server's status (version, workers registered and done, last loss) (first shard)."""
        fields = {} if self.rank is None else {"rank": self.rank}
        return dict(self._channel(Op.PING).call_all(Op.PING, fields, self.step)[0].fields)

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
    def _req(self) -> Requester:
        """The first shard's :class:`common.transport.Requester` (for tests and tools)."""
        return self._channel(Op.PING).shards[0].req

    @property
    def _beat(self) -> Heartbeat | None:
        """The first shard's heartbeat (for tests)."""
        return self._channel(Op.PING).shards[0].beat

    # ------------------------------------------------------------------ internals
    def _remember(self, named_tensors: Tensors, buckets: Sequence[Sequence[str]] | None,
                  register_fields: Mapping[str, Any], buffers: Sequence[str] = (),
                  aliases: Mapping[str, str] | None = None) -> Registration:
        """What every (re-)registration sends, kept for rejoining."""
        fields = {"world_size": self.world_size, "role": self.role, "worker_id": self.worker_id, **register_fields}
        self._reg = Registration.of(named_tensors, self.world_size, fields, buckets, buffers, aliases)
        return self._reg

    def _grads(self, grads: Grads | nn.Module) -> Grads:
        """A push's tensors by name: the module's, if the module given to :meth:`init` is passed."""
        if isinstance(grads, nn.Module):
            if self._state is None or grads is not self._state.module:
                raise PSError(f"worker {self.rank}: push the module given to init(), or gradients by name")
            return self._state.step_tensors()
        return grads

    def _full(self, theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """θ as returned to the caller: for a module, with every alias, and remembered as loaded."""
        if self._state is None or not theta:
            return theta
        self._state.remember(theta)
        return self._state.full(theta)

    def _join(self, offer: Tensors | None, rejoin: bool = False) -> dict[str, torch.Tensor]:
        """REGISTER then INIT with every shard (:meth:`worker.registration.Registrar.join`);
        ``rejoin``: after a server forgot this worker."""
        ch = self._channel(Op.INIT)
        assert self._reg is not None
        try:
            if rejoin:
                theta, version, peers = ch.rejoin(self._reg, self.step, self.timeout)
            else:
                theta, version, peers = ch.join(self._reg, offer, self.step, self.timeout)
        finally:
            self.server_info = ch.info
            self.rank = ch.rank if ch.rank is not None else self.rank
        self.step, self.peers, self._joined = version, peers, True
        return theta

    def formation_moved(self) -> bool:
        """Pipeline stages: whether another stage restarted or moved since this one's INIT."""
        return self._ch is not None and self._ch.formation_moved()

    def _guard(self, op: Op, fn: Callable[[], T]) -> T:
        """Run ``fn``; when a server forgot this worker (``worker.rejoin``), rejoin and raise
        :class:`worker.rejoin.Rejoined`."""
        try:
            return fn()
        except RemoteError as e:
            why = rejoin_reason(e) if self._joined else None
            if why is None:
                raise
        log.warning("worker %d: %s during %s of step %d: registering again", self.rank, why, op.value, self.step)
        self.rejoins += 1
        theta = self._join(None, rejoin=True)
        log.warning("worker %d: rejoined; the server is at step %d", self.rank, self.step)
        raise Rejoined(theta)

    def _push_all(self, ch: Channel, grads: Grads, step: int, samples: float | None, loss: float | None,
                  pull: bool = True) -> None:
        ch.begin(step, samples, loss, pull)
        for i in range(len(ch.buckets)):
            ch.push_bucket(i, grads)
        if not pull:
            ch.flush()
            self._fault("after-push", step)

    def _fault(self, point: str, step: int) -> None:
        """Fire an armed test fault (``common.faults``); at ``after-push``, once the servers have the push."""
        if faults.armed(point, step):
            self._channel(Op.PING).sync()
            faults.hit(point, step)

    def _channel(self, op: Op) -> Channel:
        if self._ch is None:
            raise PSError(f"worker {self.rank}: {op.value} on a closed client")
        if self.rank is None and op not in (Op.REGISTER, Op.INIT, Op.PING):
            raise PSError(f"worker {self.worker_id}: {op.value} before init() (no rank assigned yet)")
        return self._ch
