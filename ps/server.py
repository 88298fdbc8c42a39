"""The server process: a ROUTER socket, decoding, dispatch to the components, and the main loop.

The work is the components': :mod:`ps.registrar` (REGISTER), :mod:`ps.startup` (INIT and θ's
start), the training rule's :class:`ps.engine.base.StepEngine` (PUSH, PULL and PUSH_PULL),
:mod:`ps.jobend` (DONE, a failed job, a stop, REWIND), :mod:`ps.membership` (ranks, leases,
fencing, parked requests) and :mod:`ps.checkpointer`. The loop never blocks except in ``poll``;
requests that cannot be answered yet are parked (:mod:`ps.parking`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch
import zmq

from common.config import ServerConfig
from common.errors import ErrorCode, ProtocolError
from common.malloc import release_free_memory
from common.protocol import Op
from common.security import Curve
from common.transport import bind_router, make_context
from common.wire import Message, WireLimits, decode
from ps import checkpoint, jobdir
from ps.checkpointer import Checkpointer
from ps.engine import Services, make_engine, rule_of
from ps.fastpath import FastPath
from ps.jobend import JobEnd
from ps.limits import largest_frame, schema_limits
from ps.membership import Membership
from ps.metrics import ServerMetrics
from ps.outbox import Outbox
from ps.registrar import Registrar
from ps.startup import Startup
from ps.store import ParameterStore
from ps.throttle import Throttle

log = logging.getLogger(__name__)

STALL_S = 1.0
"""A loop turn longer than this means the server itself stalled ([Note: the server's own stalls])."""

Handler = Callable[[bytes, Message], None]


class Server:
    """The parameter server. ``bind()`` then ``serve()``; returns 0 when every worker is done.

    Args:
        cfg: the server's configuration.
        ctx: a ZeroMQ context to use (default: its own).
        rewind_to: start over from this checkpoint step ([Note: shards rewind together]).
    """

    def __init__(self, cfg: ServerConfig, ctx: zmq.Context | None = None, rewind_to: int | None = None) -> None:
        self.cfg = cfg
        self._own_ctx = ctx is None
        self.ctx = ctx or make_context(cfg.io_threads)
        self.limits = WireLimits(max_message_bytes=cfg.max_message_mb << 20)
        self.store = ParameterStore(cfg, rule_of(cfg.sync).build_optimizer)
        self.members = Membership(cfg)
        workers = self.members.workers
        self.metrics = ServerMetrics(cfg, lambda: [(r, w.last_seen, w.clock, w.done) for r, w in list(workers.items())])
        self.outbox = Outbox(self.store, self.metrics)
        self.fast = FastPath(cfg, rule_of(cfg.sync).shared_memory)
        self.checkpoints = Checkpointer(cfg, self.store, self.metrics, self._record)
        self.engine = make_engine(Services(cfg, self.store, self.members, self.metrics, self.outbox, self.fast,
                                           self.checkpoints))
        self.end = JobEnd(cfg, self.store, self.members, self.engine, self.checkpoints, self.outbox)
        self.startup = Startup(cfg, self.members, self.store, self.engine, self.checkpoints, self.fast, self.end.fail)
        self.registrar = Registrar(cfg, self.members, self.store, self.fast, self.engine, self.outbox, self._origin,
                                   self.startup.try_start)
        self.handlers: dict[Op, Handler] = {
            Op.REGISTER: self.registrar.on_register, Op.INIT: self.startup.on_init, Op.PULL: self.engine.on_pull,
            Op.PUSH: self.engine.on_push, Op.PUSH_PULL: self.engine.on_push, Op.DONE: self.end.on_done,
            Op.PING: self._on_ping, Op.REWIND: self.end.on_rewind,
        }
        self._throttle = Throttle()  # lines a peer can cause: rejected and failed messages
        self._tight = False  # the message caps follow θ's schema (ps.limits)
        self.endpoint = ""
        self.bound = ""
        self.sock: zmq.Socket | None = None
        self.stop_signal: int | None = None  # set by request_stop (a signal handler)
        resumed = self.checkpoints.resume(rewind_to)
        if resumed is not None:
            self.limits, self._tight = schema_limits(self.store.specs(), self.limits), True
            self.members.ranks.load(resumed.meta.get("worker_ids"))
            self.engine.load_state(resumed.meta.get("consistency"))
            self.engine.loss = resumed.meta.get("loss")

    @property
    def rewind_to(self) -> int | None:
        """The step a REWIND asked this server to start over from (``ps.cli`` does), or None."""
        return self.end.rewind_to

    # ------------------------------------------------------------------ lifecycle
    def bind(self) -> str:
        """Bind the ROUTER socket; write the endpoint to ``--ready-file``; return it.

        [Note: warm start] The first torch.optim optimizer of a process imports torch._dynamo,
        seconds of CPU (tens under load). Built here, before the loop, it cannot stall the loop
        later and let the workers' leases lapse while θ is being initialized.
        """
        warm = torch.nn.Parameter(torch.zeros(1))
        warm.grad = torch.zeros(1)
        self.store.make_optimizer([warm], self.cfg).step()
        curve = (Curve.for_server(self.cfg.curve_secret_key, self.cfg.curve_authorized_keys)
                 if self.cfg.curve_secret_key else None)
        # [Note: frame cap] a listening socket copies its options when it binds, so the cap is set once
        # here, for every connection: --max-frame-mb, or θ's largest frame where a restarted server knows θ
        frame = self.cfg.max_frame_mb << 20
        if self.store.initialized:
            frame = min(frame, largest_frame(self.store.specs(), self.limits))
        self.sock, self.endpoint = bind_router(self.ctx, self.cfg.bind, self.limits, curve=curve, max_frame=frame)
        self.outbox.sock = self.sock
        self.bound = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)  # the address itself (port 0 resolved)
        log.info("listening on %s for %d worker(s), sync=%s, optimizer=%s lr=%g",
                 self.endpoint, self.cfg.workers, self.cfg.sync, self.cfg.optimizer, self.cfg.lr)
        self.metrics.start()
        if self.cfg.ready_file:
            checkpoint.write_atomic(Path(self.cfg.ready_file), (self.endpoint + "\n").encode())
        return self.endpoint

    def serve(self, stop_after_s: float | None = None) -> int:
        """Run until every worker is done (then write the final files) and return 0."""
        if self.sock is None:
            self.bind()
        assert self.sock is not None
        next_status = time.monotonic() + self.cfg.status_every
        deadline = None if stop_after_s is None else time.monotonic() + stop_after_s
        checked = time.monotonic()
        try:
            while not self.end.finished:
                if deadline is not None and time.monotonic() > deadline:
                    log.warning("stopping after %.0fs as asked", stop_after_s)
                    return 1
                if self.sock.poll(200, zmq.POLLIN):
                    self._drain()
                self.checkpoints.poll()
                if self.stop_signal is not None:
                    return self.end.stop_on_signal(self.stop_signal)
                now = time.monotonic()
                self.end.retry_due(now)  # [Note: the final write]
                gap, checked = now - checked, now
                if gap > STALL_S:  # [Note: the server's own stalls]
                    self.members.liveness.pause(gap)
                    log.warning("the server did not run for %.1fs (stopped, or busy): the workers' leases are "
                                "extended by that time", gap)
                self._check_liveness(now)
                if now >= next_status:
                    next_status = now + self.cfg.status_every
                    self._log_status()
            if self.end.failed:
                return 1
            if self.end.rewind_to is not None:
                return 0  # ps.cli starts a new server at that step
            if not self.end.final_written:  # finished without its files would be a lie ([Note: the final write])
                log.error("the job ended without its final files")
                return 1
            return 0
        finally:
            self.close()

    def _drain(self) -> None:
        """Handle a burst of messages (at most 256) before housekeeping."""
        assert self.sock is not None
        for _ in range(256):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle(frames)
            if self.startup.trim_due:  # after the message: the last offer's frames are freed too
                del frames
                self.startup.trim_due = False
                release_free_memory()
            if self.end.finished or self.stop_signal is not None:
                return

    def request_stop(self, signum: int) -> None:
        """Ask the loop to checkpoint and return ``128 + signum`` (safe from a signal handler:
        it only sets a flag, read between messages, never inside a handler's update)."""
        self.stop_signal = signum

    def close(self) -> None:
        """Close the socket, letting replies already queued go out for up to a second.

        [Note: flush before exit] ``close(linger)`` only marks the socket; the queued replies
        (the DONE barrier's, the last ones of a job) leave during the context's termination.
        A process that ends without it (``os._exit``, a forked child) would drop them, so an
        own context is terminated here, which waits up to the linger for them to go out.
        """
        self.checkpoints.settle()  # a checkpoint being written is finished, not torn
        if self.sock is not None:
            self.sock.close(linger=1000)
            self.sock = None
        if self._own_ctx and not self.ctx.closed:
            self.ctx.term()  # term, not destroy: the CURVE guard thread closes its own sockets on ETERM
        self.metrics.close(self.engine.step_now() if self.store.initialized else None, self.engine.loss)
        self.fast.close()
        jobdir.release(self.cfg.checkpoint_dir)

    # ------------------------------------------------------------------ dispatch
    def _handle(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            return  # an identity with nothing after it: nothing to answer
        ident, body = frames[0].bytes, frames[1:]
        req_id = 0
        self.metrics.received(sum(len(f) for f in body))
        try:
            msg = decode(body, self.limits)
            req_id = msg.id
            handler = self.handlers.get(msg.op)
            if handler is None:
                raise ProtocolError(ErrorCode.UNKNOWN_OP, f"the server does not handle {msg.op.value!r}")
            self.members.screen(ident, msg)
            handler(ident, msg)
            if self.store.initialized and not self._tight:  # θ exists now: the message caps tighten
                self.limits, self._tight = schema_limits(self.store.specs(), self.limits), True
        except ProtocolError as e:
            held = self._throttle.allow((ident, e.code))
            if held is not None:
                log.warning("rejected a message from %s: %s: %s%s", ident.hex()[:16], e.code.name, e,
                            f" ({held} more like it not shown)" if held else "")
            self.outbox.error(ident, e.code, str(e), req_id or e.req_id)
        except Exception as e:  # a bug must not take the server down; the client sees INTERNAL
            held = self._throttle.allow(("internal", type(e).__name__))
            if held is not None:
                log.exception("internal error while handling a message%s",
                              f" ({held} more like it not shown)" if held else "")
            self.outbox.error(ident, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}", req_id)

    def _on_ping(self, ident: bytes, msg: Message) -> None:
        m = self.members
        m.heartbeat(ident, msg.fields.get("rank"))
        self.outbox.reply(ident, Op.PING, msg.id, {
            "version": self.engine.step_now(), "registered": len(m.workers), "workers": self.cfg.workers,
            "loss": self.engine.loss, "done": sum(w.done for w in m.workers.values()),
            "incarnation": m.incarnation, "formation": m.formation, **self.metrics.ping_fields()})

    # ------------------------------------------------------------------ housekeeping
    def _check_liveness(self, now: float) -> None:
        """Declare lapsed workers lost; apply ``--on-worker-loss``; fail the job past the deadline."""
        shrink = self.cfg.on_worker_loss == "shrink" and self.engine.started
        lost, why = self.members.check(now, self.engine.step_now(), shrink, self.engine.started)
        for rank in lost:
            step = self.engine.step_now()
            self.members.remove(rank)
            self.fast.forget(rank)
            log.warning("rank %d lost at step %d: continuing with rank(s) %s (--on-worker-loss shrink)",
                        rank, step, sorted(self.members.workers))
            self.engine.drop(rank)
            self.engine.wake()
            self.end.finish_if_done()
        if why is not None:
            self.end.fail(why)

    def _record(self) -> dict[str, Any]:
        """The record a checkpoint keeps beside θ and the optimizer."""
        m = self.members
        return {"versions": self.store.versions, "loss": self.engine.loss,
                "members": {r: list(w.keys) for r, w in m.workers.items()}, "workers": self.cfg.workers,
                "worker_ids": m.ranks.to_meta(), "consistency": self.engine.state(),
                "buffers": sorted(self.store.buffers), "aliases": self.store.aliases}

    def _origin(self) -> str:
        """For schema errors: where θ came from, when it was resumed (another model in a used folder)."""
        if not (self.store.initialized and self.checkpoints.resumed_from):
            return ""
        keys = sorted(self.store.params)
        shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
        return (f"; θ ({len(keys)} tensors: {shown}) was resumed from {self.checkpoints.resumed_from}, a job of "
                f"another model: start the server with another --checkpoint-dir, or with --resume never to move "
                f"that job aside")

    def _log_status(self) -> None:
        m = self.members
        loss = "-" if self.engine.loss is None else f"{self.engine.loss:.6g}"
        log.info("step %d (%s), loss %s, %d/%d workers registered, %d done; %s", self.engine.step_now(),
                 self.cfg.sync, loss, len(m.workers), self.cfg.workers, sum(w.done for w in m.workers.values()),
                 self.metrics.status())
