"""The server process: a ROUTER socket, the protocol's handlers, and the main loop.

Requests that cannot be answered yet (an INIT before rank 0's θ, a PULL for a step that is
not complete) are parked as :class:`Waiter` and answered the moment their condition holds;
the client's own deadline bounds the wait. The loop never blocks except in ``poll``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import zmq

from common import faults
from common.config import ServerConfig
from common.dtypes import dtype_name, torch_dtype
from common.errors import ConfigError, ErrorCode, ProtocolError
from common.malloc import release_free_memory
from common.partition import base_of, piece_groups
from common.procfs import status_bytes
from common.protocol import Op
from common.security import Curve
from common.transport import bind_router, make_context, send_zero_copy
from common.wire import Message, WireLimits, decode, encode, error_frames
from ps import checkpoint, jobdir
from ps.aggregate import Contribution, KeyGroup, Reduced
from ps.fastpath import FastPath
from ps.finite import nonfinite_keys
from ps.consistency import make_consistency
from ps.limits import largest_frame, schema_limits
from ps.membership import WorkerInfo, form_groups
from ps.metrics import ServerMetrics
from ps.offers import Offers
from ps.ranks import RankTable
from ps.recovery import Recovery
from ps.optim import build_optimizer
from ps.snapshot import BackgroundSaver, Saved, checkpoint_snapshot
from ps.store import ParameterStore
from ps.throttle import Throttle

log = logging.getLogger(__name__)

STALL_S = 1.0
"""A loop turn longer than this means the server itself stalled ([Note: the server's own stalls])."""
MAX_SAMPLES = float(2**31)
"""The largest row count a push may weigh its gradient with (``samples``, ``total``)."""


@dataclass
class Waiter:
    """A parked request: reply with θ for ``keys`` once ``step`` is reachable."""

    ident: bytes
    req_id: int
    op: Op
    rank: int
    keys: tuple[str, ...]
    step: int
    shm: bool = False  # reply with θ in shared memory (ps.fastpath) instead of frames
    t0: float = field(default_factory=time.monotonic)  # arrival, for the latency metric


class Server(Recovery):
    """The parameter server. ``bind()`` then ``serve()``; returns 0 when every worker is done."""

    def __init__(self, cfg: ServerConfig, ctx: zmq.Context | None = None, rewind_to: int | None = None) -> None:
        self.cfg = cfg
        self._own_ctx = ctx is None
        self.ctx = ctx or make_context(cfg.io_threads)
        self.limits = WireLimits(max_message_bytes=cfg.max_message_mb << 20)
        self.store = ParameterStore(cfg)
        self.saver = BackgroundSaver()  # [Note: background checkpoints]
        self.store.before_update = self.saver.protect
        self.workers: dict[int, WorkerInfo] = {}
        self.groups: list[KeyGroup] | None = None
        self.offers = Offers()  # θ's first values, the lowest rank's per key
        self._trim_due = False  # freed memory to return to the OS after the current message
        self.registered_specs: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.buffer_keys: set[str] = set()  # registered as buffers ([Note: buffers in θ])
        self.aliases: dict[str, str] = {}  # other state_dict names of θ's tensors (tied weights)
        self._staged: list[Reduced] = []  # key groups done with the step being completed
        self._throttle = Throttle()  # lines a peer can cause: rejected and failed messages
        self._ckpt_failures = 0  # periodic checkpoints failed in a row
        self._ckpt_failure_logged = 0.0
        self.waiters: list[Waiter] = []
        self.last_loss: float | None = None
        self.saved_step = -1
        self.endpoint = ""
        self.bound = ""
        self.sock: zmq.Socket | None = None
        self._finished = False
        self.stop_signal: int | None = None  # set by request_stop (a signal handler)
        self.resumed_from = ""  # the checkpoint θ came from, for errors ([Note: used folders])
        self.fast = FastPath(cfg)
        self.ranks = RankTable()
        self.metrics = ServerMetrics(cfg, lambda: [(r, w.last_seen, w.clock, w.done)
                                                   for r, w in list(self.workers.items())])
        self.sync = make_consistency(cfg, self.store, self.workers, self.metrics)
        self._init_recovery()
        self.rewind_to: int | None = None  # set by REWIND: serve() returns, and ps.cli starts over at it
        self._resume(rewind_to)

    # ------------------------------------------------------------------ lifecycle
    def _resume(self, rewind_to: int | None = None) -> None:
        """Say what ``--checkpoint-dir`` holds and resume it or not ([Note: used folders]);
        ``rewind_to``: resume that checkpoint, dropping newer ones ([Note: shards rewind together])."""
        try:
            checkpoint.check_writable(self.cfg.checkpoint_dir)
        except OSError as e:
            raise ConfigError(f"--checkpoint-dir {self.cfg.checkpoint_dir} is not writable: {e.strerror or e} "
                              f"(the server writes its checkpoints and final.safetensors there)") from None
        jobdir.claim(self.cfg.checkpoint_dir)
        try:
            if rewind_to is not None:
                for newer in checkpoint.checkpoints(self.cfg.checkpoint_dir):
                    if checkpoint.step_of(newer) > rewind_to:
                        newer.unlink()
                        log.warning("removed %s: this shard goes back to step %d with the others", newer.name, rewind_to)
            self._resume_claimed()
        except BaseException:
            jobdir.release(self.cfg.checkpoint_dir)
            raise

    def _resume_claimed(self) -> None:
        for stale in checkpoint.remove_temporaries(self.cfg.checkpoint_dir):
            log.warning("removed %s, left by a crash while writing", stale)
        folder = jobdir.survey(self.cfg.checkpoint_dir)
        mlog = self.cfg.metrics_log
        inside = [Path(mlog)] if mlog and Path(mlog).resolve().parent == folder.path.resolve() else []
        decision = jobdir.decide(folder, self.cfg.resume, inside)
        log.info("%s", decision.message)
        if not decision.resume:
            return
        found = checkpoint.checkpoints(self.cfg.checkpoint_dir)
        why: list[str] = []
        for path in found:  # newest first; a damaged file costs the steps since the one before it
            try:
                params, opt_state, meta = checkpoint.load_checkpoint(path)
                break
            except (OSError, ValueError) as e:
                why.append(str(e))
                log.warning("cannot resume from %s, trying an older checkpoint: %s", path.name, e)
        else:
            raise ConfigError(f"no checkpoint in {self.cfg.checkpoint_dir} can be read ({'; '.join(why)[:1000]}); "
                              f"move them away to train from scratch")
        self.store.initialize(params, meta.get("versions"), opt_state, owned=True, buffers=meta.get("buffers", ()))
        self.aliases = dict(meta.get("aliases") or {})
        self.saved_step = int(meta["step"])
        self.last_loss = meta.get("loss")
        self.limits = schema_limits(self.store.specs(), self.limits)
        self.ranks.load(meta.get("worker_ids"))
        self.sync.load_state(meta.get("consistency"))
        self.resumed_from = f"{path} (step {self.saved_step})"
        self.metrics.resumed(self.saved_step, path.stat().st_mtime)
        log.info("resumed from %s at step %d", path, self.saved_step)

    def bind(self) -> str:
        """Bind the ROUTER socket; write the endpoint to ``--ready-file``; return it.

        [Note: warm start] The first torch.optim optimizer of a process imports torch._dynamo,
        seconds of CPU (tens under load). Built here, before the loop, it cannot stall the loop
        later and let the workers' leases lapse while θ is being initialized.
        """
        warm = torch.nn.Parameter(torch.zeros(1))
        warm.grad = torch.zeros(1)
        build_optimizer([warm], self.cfg).step()
        curve = (Curve.for_server(self.cfg.curve_secret_key, self.cfg.curve_authorized_keys)
                 if self.cfg.curve_secret_key else None)
        frame = largest_frame(self.store.specs(), self.limits) if self.store.initialized else None
        self.sock, self.endpoint = bind_router(self.ctx, self.cfg.bind, self.limits, curve=curve, max_frame=frame)
        self.bound = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)  # the address itself (port 0 resolved)
        log.info("listening on %s for %d worker(s), sync=%s, optimizer=%s lr=%g",
                 self.endpoint, self.cfg.workers, self.cfg.sync, self.cfg.optimizer, self.cfg.lr)
        self.metrics.start()
        if self.cfg.ready_file:
            checkpoint.write_atomic(Path(self.cfg.ready_file), (self.endpoint + "\n").encode())
        return self.endpoint

    def serve(self, stop_after_s: float | None = None) -> int:
        """Run until every worker is done (then write the final checkpoint) and return 0."""
        if self.sock is None:
            self.bind()
        assert self.sock is not None
        next_status = time.monotonic() + self.cfg.status_every
        deadline = None if stop_after_s is None else time.monotonic() + stop_after_s
        checked = time.monotonic()
        try:
            while not self._finished:
                if deadline is not None and time.monotonic() > deadline:
                    log.warning("stopping after %.0fs as asked", stop_after_s)
                    return 1
                if self.sock.poll(200, zmq.POLLIN):
                    for _ in range(256):  # drain a burst before housekeeping
                        try:
                            frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(frames)
                        if self._trim_due:  # after the message: the last offer's frames are freed too
                            del frames
                            self._trim_due = False
                            release_free_memory()
                        if self._finished or self.stop_signal is not None:
                            break
                if self.saver.busy:
                    self._saved(self.saver.poll())
                if self.stop_signal is not None:
                    return self._stop_on_signal(self.stop_signal)
                now = time.monotonic()
                if self._final_retry_at is not None and now >= self._final_retry_at:
                    self._finish_if_done()  # [Note: the final write]
                gap, checked = now - checked, now
                if gap > STALL_S:  # [Note: the server's own stalls]
                    self.liveness.pause(gap)
                    log.warning("the server did not run for %.1fs (stopped, or busy): the workers' leases are "
                                "extended by that time", gap)
                self._check_liveness(now)
                if now >= next_status:
                    next_status = now + self.cfg.status_every
                    self._log_status()
            if self.failed:
                return 1
            if self.rewind_to is not None:
                return 0  # ps.cli starts a new server at that step
            if not self._final_written:  # finished without its files would be a lie ([Note: the final write])
                log.error("the job ended without its final files")
                return 1
            return 0
        finally:
            self.close()

    def request_stop(self, signum: int) -> None:
        """Ask the loop to checkpoint and return ``128 + signum`` (safe from a signal handler:
        it only sets a flag, read between messages, never inside a handler's update)."""
        self.stop_signal = signum

    def _stop_on_signal(self, signum: int) -> int:
        """A graceful stop (systemd, Kubernetes): checkpoint θ as of now if it is a consistent cut
        newer than the newest on disk, so a restart recomputes nothing; the workers ride out
        the gap as after a crash."""
        self._settle()
        saved = "nothing new to checkpoint"
        if self.store.initialized:
            version = self.store.version(self.store.params)
            if version > self.saved_step and self._consistent_cut():
                self._save(version)
                saved = f"checkpoint of step {version} written"
            elif version > self.saved_step:
                saved = f"step {version} is not a consistent cut; the newest checkpoint is step {self.saved_step}"
        log.warning("stopping on signal %d: %s", signum, saved)
        return 128 + signum

    def close(self) -> None:
        """Close the socket, letting replies already queued go out for up to a second.

        [Note: flush before exit] ``close(linger)`` only marks the socket; the queued replies
        (the DONE barrier's, the last ones of a job) leave during the context's termination.
        A process that ends without it (``os._exit``, a forked child) would drop them, so an
        own context is terminated here, which waits up to the linger for them to go out.
        """
        self._settle()  # a checkpoint being written is finished, not torn
        if self.sock is not None:
            self.sock.close(linger=1000)
            self.sock = None
        if self._own_ctx and not self.ctx.closed:
            self.ctx.term()  # term, not destroy: the CURVE guard thread closes its own sockets on ETERM
        self.metrics.close(self.store.version(self.store.params) if self.store.initialized else None,
                           self.last_loss)
        self.fast.close()
        jobdir.release(self.cfg.checkpoint_dir)

    def _log_status(self) -> None:
        version = self.store.version(self.store.params) if self.store.initialized else 0
        loss = "-" if self.last_loss is None else f"{self.last_loss:.6g}"
        log.info("step %d (%s), loss %s, %d/%d workers registered, %d done; %s", version, self.cfg.sync, loss,
                 len(self.workers), self.cfg.workers, sum(w.done for w in self.workers.values()),
                 self.metrics.status())

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
            handler = self._HANDLERS.get(msg.op)
            if handler is None:
                raise ProtocolError(ErrorCode.UNKNOWN_OP, f"the server does not handle {msg.op.value!r}")
            self._screen(ident, msg)
            handler(self, ident, msg)
        except ProtocolError as e:
            held = self._throttle.allow((ident, e.code))
            if held is not None:
                log.warning("rejected a message from %s: %s: %s%s", ident.hex()[:16], e.code.name, e,
                            f" ({held} more like it not shown)" if held else "")
            self._send_frames(ident, error_frames(e.code, str(e), req_id or e.req_id))
        except Exception as e:  # a bug must not take the server down; the client sees INTERNAL
            held = self._throttle.allow(("internal", type(e).__name__))
            if held is not None:
                log.exception("internal error while handling a message%s",
                              f" ({held} more like it not shown)" if held else "")
            self._send_frames(ident, error_frames(ErrorCode.INTERNAL, f"{type(e).__name__}: {e}", req_id))

    def _send_frames(self, ident: bytes, frames: list[Any], track: bool = False) -> zmq.MessageTracker | None:
        assert self.sock is not None
        self.metrics.sent(sum(memoryview(f).nbytes for f in frames))
        return send_zero_copy(self.sock, [ident, *frames], track)

    def _reply(self, ident: bytes, req_id: int, fields: Mapping[str, Any] | None = None,
               keys: tuple[str, ...] = (), shm: bool = False) -> None:
        if shm and keys and self.store.shared:  # θ is in the segment the worker maps: no frames
            self._send_frames(ident, encode(Op.REPLY, {**(fields or {}), "shm": True}, None, req_id))
            return
        tensors = self.store.view(keys) if keys else None
        tracker = self._send_frames(ident, encode(Op.REPLY, fields, tensors, req_id), track=bool(keys))
        self.store.track(keys, tracker)

    # ------------------------------------------------------------------ helpers
    def _worker(self, msg: Message) -> WorkerInfo:
        rank = msg.fields["rank"]
        w = self.workers.get(rank)
        if w is None:
            raise ProtocolError(ErrorCode.NOT_REGISTERED, f"rank {rank} has not registered")
        w.last_seen = time.monotonic()
        return w

    def _check_tensors(self, tensors: Mapping[str, torch.Tensor], expected: tuple[str, ...], what: str,
                       grads: bool = False, absent: frozenset[str] = frozenset()) -> None:
        """``tensors`` and ``absent`` together are exactly ``expected``, each with θ's dtype and shape
        (a gradient may travel in float16/bfloat16; a buffer's value may not)."""
        if set(tensors) | absent != set(expected) or absent & set(tensors):
            extra = sorted((set(tensors) | absent) - set(expected))[:5]
            missing = sorted(set(expected) - set(tensors) - absent)[:5]
            both = sorted(absent & set(tensors))[:5]
            raise ProtocolError(ErrorCode.SCHEMA_MISMATCH,
                                f"{what} must carry exactly the registered keys (or name them absent); "
                                f"unexpected {extra}, missing {missing}" + (f", both sent and absent {both}" if both
                                                                            else ""))
        specs = self.store.specs() if self.store.initialized else self.registered_specs  # θ's, or as registered
        buffers = self.store.buffers if self.store.initialized else self.buffer_keys
        for k, t in tensors.items():
            dtype, shape = specs[k]
            floating = torch_dtype(dtype).is_floating_point
            narrow = grads and k not in buffers and t.dtype in (torch.float16, torch.bfloat16) and floating
            if (dtype_name(t.dtype) != dtype and not narrow) or tuple(t.shape) != tuple(shape):
                raise ProtocolError(ErrorCode.SCHEMA_MISMATCH,
                                    f"{what}: {k!r} is {dtype_name(t.dtype)}{list(t.shape)}, "
                                    f"{'θ has' if self.store.initialized else 'it was registered as'} "
                                    f"{dtype}{list(shape)}")

    def _requested_keys(self, msg: Message, w: WorkerInfo) -> tuple[str, ...]:
        keys = msg.fields.get("keys")
        if keys is None:
            return w.keys
        unknown = [k for k in keys if k not in self.store.params]
        if unknown:
            raise ProtocolError(ErrorCode.SCHEMA_MISMATCH, f"unknown keys {unknown[:5]}")
        return tuple(dict.fromkeys(keys))

    def _groups_of(self, w: WorkerInfo) -> list[KeyGroup]:
        assert self.groups is not None
        return [g for g in self.groups if w.rank in g.contributors]

    def _buckets(self, raw: Any, keys: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
        """Validate REGISTER's ``buckets``: lists partitioning the worker's keys.

        Only bsp takes pushes bucket by bucket; under async/ssp a push is a whole step, and
        the reply's ``buckets: false`` tells the worker so.
        """
        if raw is None:
            return ()
        if not isinstance(raw, list) or not all(isinstance(b, list) and b and all(isinstance(k, str) for k in b)
                                                for b in raw):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "buckets must be a list of non-empty lists of key names")
        flat = [k for b in raw for k in b]
        if len(flat) != len(set(flat)) or set(flat) != set(keys):
            raise ProtocolError(ErrorCode.SCHEMA_MISMATCH, "buckets must list every registered key exactly once")
        return tuple(tuple(b) for b in raw) if self.cfg.sync == "bsp" else ()

    def _pushed(self, w: WorkerInfo, msg: Message) -> Mapping[str, torch.Tensor]:
        """The pushed gradients: frames, or views of the worker's segment (``grads``)."""
        names = msg.fields.get("grads")
        if names is None:
            return msg.tensors
        if msg.tensors:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "a push carries frames or names shared-memory grads, not both")
        if len(set(names)) != len(names):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "grads lists a key twice")
        return self.fast.grads(w.rank, names, msg.fields.get("segment"))

    def _push_groups(self, w: WorkerInfo, tensors: Mapping[str, torch.Tensor],
                     absent: frozenset[str]) -> list[KeyGroup]:
        """The key groups a push covers; it must carry whole groups (buckets) of ``w``'s keys."""
        pushed = set(tensors) | absent
        groups = [g for g in self._groups_of(w) if pushed.intersection(g.keys)]
        covered = {k for g in groups for k in g.keys}
        if not groups or covered != pushed:
            extra = sorted(pushed - set(w.keys))[:5]
            partial = sorted(covered - pushed)[:5]
            raise ProtocolError(ErrorCode.SCHEMA_MISMATCH,
                                f"a push must carry whole buckets of the registered keys; "
                                f"unexpected {extra}, missing {partial}")
        return groups

    # ------------------------------------------------------------------ handlers
    def _on_register(self, ident: bytes, msg: Message) -> None:
        """[Note: idempotent register] A worker resends REGISTER until it is answered (it may
        start long before the server), so one registration can arrive many times. A copy from
        the same connection with the same fields is answered with the first answer (only
        ``initialized`` says what holds now) and changes nothing; whichever copy's answer the
        worker acts on, it agrees with the server on its rank and its shared-memory segment."""
        f = msg.fields
        same = next((w for w in self.workers.values() if w.identity == ident and w.request == f), None)
        if same is not None:
            self._renew(same.rank)
            log.debug("rank %d: a copy of its registration, answered as before", same.rank)
            self._reply(ident, msg.id, {**same.reply, "initialized": self.store.initialized})  # θ may exist now
            return
        world, worker_id = f["world_size"], f.get("worker_id")
        if world != self.cfg.workers:
            raise ProtocolError(ErrorCode.BAD_RANK, f"world size {world} != the server's {self.cfg.workers}")
        now = time.monotonic()  # a rank whose holder went silent past its lease is free for a new worker id
        held = [r for r, w in self.workers.items() if w.done or self.liveness.remaining(r, now) > 0]
        rank = self.ranks.choose(worker_id, f.get("rank"), world, held)  # pure; bound below
        if not 0 <= rank < world:
            raise ProtocolError(ErrorCode.BAD_RANK, f"rank {rank} outside [0, {world})")
        shards = f.get("shards", 1)
        if self.cfg.clip_grad_norm and shards != 1:
            raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                f"rank {rank} splits θ over {shards} server shards, but --clip-grad-norm clips the "
                                f"norm of the whole model's gradient, which one shard cannot see: use one server "
                                f"or no --clip-grad-norm")
        specs = {name: (dtype, tuple(shape)) for name, dtype, shape in f["params"]}
        if not specs:
            raise ProtocolError(ErrorCode.SCHEMA_MISMATCH, "a worker must register at least one parameter")
        buffers = frozenset(f.get("buffers", ()))
        role = f.get("role", "data")
        self._check_schema(rank, role, specs, buffers)
        self._check_steps(rank, f.get("steps"))
        aliases = self._aliases(f.get("aliases"), specs)
        keys = tuple(specs)
        buckets = self._buckets(f.get("buckets"), keys)
        old = self.workers.get(rank)
        self._admit(ident, rank)
        if old is not None and old.keys != keys and old.identity == ident:
            raise ProtocolError(ErrorCode.SCHEMA_MISMATCH, f"rank {rank} re-registered with different keys")
        if old is not None:  # a copy of the same registration was answered above, without a word
            log.info("rank %d registered again (%s)", rank,
                     "same connection" if old.identity == ident else "a new connection: the worker restarted or "
                                                                     "rejoined")
        elif self.groups is not None:
            self._joining.add(rank)
            self.regroup_pending = True
        fast = self.fast.register(rank, specs, ident) if f.get("shm") else {}
        reply = {"world_size": self.cfg.workers, "sync": self.cfg.sync, "initialized": self.store.initialized,
                 "rank": rank, "optimizer": self.cfg.optimizer, "lr": self.cfg.lr,
                 "clip_grad_norm": self.cfg.clip_grad_norm, "incarnation": self.incarnation,
                 "lease_s": self.cfg.lease, "hold_s": self.cfg.rejoin_deadline, "buckets": bool(buckets), **fast}
        self.workers[rank] = WorkerInfo(rank=rank, identity=ident, keys=keys, role=role,
                                        endpoint=f.get("endpoint", ""), stage=f.get("stage", -1),
                                        plan=f.get("plan", ""), clock=old.clock if old else 0, buckets=buckets,
                                        request=dict(f), reply=reply)
        self.registered_specs.update(specs)
        self.buffer_keys |= buffers
        self.aliases.update(aliases)
        self._renew(rank)
        self.ranks.bind(worker_id, rank)
        log.info("rank %d registered %d key(s) (%d/%d)%s", rank, len(keys), len(self.workers), self.cfg.workers,
                 f" as worker id {worker_id!r}" if worker_id else "")
        self._reply(ident, msg.id, reply)
        self._try_start()

    def _check_schema(self, rank: int, role: str, specs: Mapping[str, tuple[str, tuple[int, ...]]],
                      buffers: frozenset[str]) -> None:
        """The keys, dtypes, shapes and kinds a worker registers must fit θ and the other workers.

        In data mode every worker holds the whole model, so all must register the same keys: a
        worker whose model names its parameters otherwise would train apart from the others.
        Before θ exists, only workers whose lease runs are compared with: a registration that
        was wrong (a wrong ``--model``, a stranger) and went silent cannot lock out the job.
        """
        if not buffers <= set(specs):
            raise ProtocolError(ErrorCode.SCHEMA_MISMATCH, f"buffers {sorted(buffers - set(specs))[:5]} "
                                                           f"are not among the registered keys")
        now = time.monotonic()
        others = [w for w in self.workers.values() if w.rank != rank and self.liveness.remaining(w.rank, now) > 0]
        if self.store.initialized:
            known = self.store.specs()
            kinds = self.store.buffers
        else:
            known = {k: self.registered_specs[k] for o in others for k in o.keys}
            kinds = frozenset(self.buffer_keys)
        origin = self._theta_origin()
        for k, spec in specs.items():
            if self.store.initialized and k not in known:
                raise ProtocolError(ErrorCode.SCHEMA_MISMATCH, f"rank {rank}: key {k!r} is not in θ{origin}")
            if k in known and known[k] != spec:
                raise ProtocolError(ErrorCode.SCHEMA_MISMATCH, f"rank {rank}: {k!r} registered as "
                                                               f"{spec[0]}{list(spec[1])}, θ has "
                                                               f"{known[k][0]}{list(known[k][1])}{origin}")
            if k in known and (k in kinds) != (k in buffers):
                what = ("a buffer", "a parameter") if k in buffers else ("a parameter", "a buffer")
                raise ProtocolError(ErrorCode.SCHEMA_MISMATCH, f"rank {rank}: {k!r} registered as {what[0]}, "
                                                               f"θ holds it as {what[1]}")
        if role != "data":
            return
        peers = [w for w in others if w.role == "data"]
        want = set(peers[0].keys) if peers else (set(known) if self.store.initialized else None)
        if want is not None and set(specs) != want:
            extra, missing = sorted(set(specs) - want)[:3], sorted(want - set(specs))[:3]
            whose = f"rank {peers[0].rank}" if peers else "θ"
            raise ProtocolError(ErrorCode.SCHEMA_MISMATCH,
                                f"rank {rank} registers other keys than {whose} (data mode: every worker holds the "
                                f"same model): it has {extra} that {whose} lacks, lacks {missing}"
                                f"{origin if not peers else ''}")

    def _theta_origin(self) -> str:
        """For schema errors: where θ came from, when it was resumed (another model in a used folder)."""
        if not (self.store.initialized and self.resumed_from):
            return ""
        keys = sorted(self.store.params)
        shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
        return (f"; θ ({len(keys)} tensors: {shown}) was resumed from {self.resumed_from}, a job of another "
                f"model: start the server with another --checkpoint-dir, or with --resume never to move that "
                f"job aside")

    def _check_steps(self, rank: int, steps: int | None) -> None:
        """Every worker of a job must plan the same number of steps (``--epochs``, batch, data):
        otherwise the ones that finish first wait at DONE for steps that never come, and the job
        fails at the rejoin deadline blaming a worker that was still training."""
        if steps is None:
            return
        now = time.monotonic()
        for w in self.workers.values():
            theirs = w.request.get("steps")
            if w.rank != rank and theirs is not None and theirs != steps and self.liveness.remaining(w.rank, now) > 0:
                raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                    f"rank {rank} plans {steps} steps but rank {w.rank} plans {theirs}: give every "
                                    f"worker the same --epochs, --batch-size and data")

    def _aliases(self, raw: Any, specs: Mapping[str, Any]) -> dict[str, str]:
        """Validate REGISTER's ``aliases``: ``[[alias, key], ...]`` naming registered tensors."""
        if raw is None:
            return {}
        if not isinstance(raw, list) or not all(isinstance(a, list) and len(a) == 2 and
                                                all(isinstance(x, str) and x for x in a) for a in raw):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "aliases must be a list of [alias, key] name pairs")
        if len(raw) > len(specs):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"{len(raw)} aliases for {len(specs)} keys")
        bases = {base_of(k)[0] for k in specs}
        out: dict[str, str] = {}
        for alias, key in raw:
            if key not in bases or alias in bases or base_of(alias)[1] is not None:
                raise ProtocolError(ErrorCode.SCHEMA_MISMATCH, f"alias {alias!r} of {key!r}: it must name a "
                                                               f"registered tensor and not be one")
            if self.aliases.get(alias, key) != key:
                raise ProtocolError(ErrorCode.SCHEMA_MISMATCH, f"alias {alias!r} names {key!r} here but "
                                                               f"{self.aliases[alias]!r} for another worker")
            out[alias] = key
        return out

    def _on_init(self, ident: bytes, msg: Message) -> None:
        w = self._worker(msg)
        if msg.tensors or not self.store.initialized:  # a worker rejoining a running job offers nothing
            self._check_tensors(msg.tensors, w.keys, "init")
        if not self.store.initialized:
            self.offers.add(w.rank, msg.tensors)
        self._park(Waiter(ident, msg.id, Op.INIT, w.rank, w.keys, step=self._join_step(w.rank),
                                   shm=bool(msg.fields.get("shm"))))
        self._try_start()
        self._wake()

    def _try_start(self) -> None:
        """Once all K workers registered: take θ from the lowest rank per key, form groups."""
        if len(self.workers) < self.cfg.workers:
            return
        if not self.store.initialized:
            owner: dict[str, int] = {}
            for rank in sorted(self.workers, reverse=True):
                for k in self.workers[rank].keys:
                    owner[k] = rank
            if not self.offers.complete(owner):
                return
            ranks = self.offers.ranks()
            self.store.initialize(self.offers.take(list(owner)), buffers=self.buffer_keys)
            log.info("θ initialized from rank(s) %s: %d tensors, %d elements", ranks,
                     len(owner), sum(p.numel() for p in self.store.params.values()))
            self._save(0)  # θ_0 survives a crash: a restarted server never needs the workers' offers again
            if self.saved_step < 0:  # no restart point at all: fail now, not hours later
                self._fail(f"cannot write the first checkpoint (θ of step 0) in {self.cfg.checkpoint_dir}; "
                           f"see the error above", ErrorCode.WRITE_FAILED)
                return
            # the message caps tighten now; ZeroMQ's frame cap only binds for a restarted server,
            # which binds knowing θ (a socket's options are copied when it binds)
            self.limits = schema_limits(self.store.specs(), self.limits)
        if self.groups is None:
            self.groups = form_groups(self.workers, self.store.versions, self.store.buffers)
            for g in self.groups:  # accumulate in θ's dtype (gradients may travel narrower)
                g.dtypes = {k: self.store.params[k].dtype for k in g.keys}
            if self.fast.wanted and not self.store.shared:
                try:
                    self.store.move_to(self.fast.alloc_theta)
                except OSError as e:  # /dev/shm too small for θ: θ stays private, replies go as frames
                    log.warning("θ stays out of shared memory (%s): pulls go as frames", e)
            unused = set(self.store.params) - {k for g in self.groups for k in g.keys}
            if unused:
                log.warning("θ keys no worker registered (never updated): %s", sorted(unused)[:5])
            # the offers of θ and θ's private copy (if it moved) are freed once: give them back to
            # the OS once the message being handled (the last offer) is released too
            self._trim_due = True

    def _ready(self, w: Waiter) -> bool:
        if self.groups is None or not self.store.initialized:
            return False
        if w.op is Op.INIT and self._stage_missing(w.rank):
            return False
        return self.sync.ready(w.rank, w.step, w.keys)

    def _stage_missing(self, rank: int) -> bool:
        """Whether a pipeline stage's INIT must wait: another stage was lost and has not registered
        again, so the peer table would name an endpoint nobody listens on. A stage restarted
        after a crash binds a new one; its neighbours get it once it is back."""
        me = self.workers.get(rank)
        if me is None or me.role != "stage":
            return False
        return any(r in self.liveness.lost for r, w in self.workers.items() if w.role == "stage" and r != rank)

    def _wake(self) -> None:
        still = []
        for w in self.waiters:
            if self._ready(w):
                version = self.store.version(w.keys)
                self.sync.on_read(w.rank, version)
                if w.op is Op.INIT:
                    version = self.sync.start_step(w.rank, version)
                fields = {"version": version, "loss": self.last_loss}
                if w.op is Op.INIT:
                    fields["peers"] = self._peer_table()
                    fields.update(self.fast.theta_fields(w.keys))
                    # the steps this shard could go back to ([Note: shards rewind together])
                    fields["restorable"] = sorted({*map(checkpoint.step_of, checkpoint.checkpoints(
                        self.cfg.checkpoint_dir)), self.store.version(self.store.params)})
                self._reply(w.ident, w.req_id, fields, w.keys, shm=w.shm)
                self.metrics.request(w.op.value, time.monotonic() - w.t0)
            else:
                still.append(w)
        self.waiters = still

    def _peer_table(self) -> list[dict[str, Any]]:
        """Every worker's rank, role, stage, peer endpoint and plan: how pipeline stages find neighbours."""
        return [{"rank": w.rank, "role": w.role, "stage": w.stage, "endpoint": w.endpoint, "plan": w.plan}
                for _, w in sorted(self.workers.items())]

    def _on_pull(self, ident: bytes, msg: Message) -> None:
        w = self._worker(msg)
        if self.groups is None:
            raise ProtocolError(ErrorCode.NOT_INITIALIZED, "pull before every worker has called init")
        keys = self._requested_keys(msg, w)
        self._park(Waiter(ident, msg.id, Op.PULL, w.rank, keys, step=msg.fields.get("step", 0),
                                   shm=bool(msg.fields.get("shm"))))
        self._wake()

    def _on_push(self, ident: bytes, msg: Message) -> None:
        w = self._worker(msg)
        if self.groups is None:
            raise ProtocolError(ErrorCode.NOT_INITIALIZED, "push before every worker has called init")
        f = msg.fields
        step = f["step"]
        if not self._groups_of(w):
            raise ProtocolError(ErrorCode.NOT_INITIALIZED, f"rank {w.rank} rejoins between steps: call init first")
        keys = self._requested_keys(msg, w) if msg.op is Op.PUSH_PULL else w.keys
        tensors = self._pushed(w, msg)
        absent = frozenset(f.get("absent", ()))
        groups = self._push_groups(w, tensors, absent)
        self._check_tensors(tensors, tuple(k for g in groups for k in g.keys), msg.op.value, grads=True,
                            absent=absent)
        weight = float(f.get("samples", 1.0))
        if not 0 <= weight <= MAX_SAMPLES:  # a weight of 1e308 would overflow the sum into inf and NaN
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"samples must be a count in [0, {MAX_SAMPLES}], got {weight}")
        total = f.get("total")
        if total is not None:
            total = float(total)
            if not 0 < total <= MAX_SAMPLES or "samples" not in f:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"total must be finite and positive, and come with "
                                                           f"samples; got total {total}")
            if self.sync.on_arrival:
                raise ProtocolError(ErrorCode.BAD_MESSAGE, f"pre-scaled gradients (total) need --sync bsp, "
                                                           f"not {self.cfg.sync}")
        loss = f.get("loss")
        if self.cfg.nonfinite != "apply":
            bad = nonfinite_keys({k: t for k, t in tensors.items() if k not in self.store.buffers})
            if bad:
                what = (f"rank {w.rank} pushed a gradient with NaN or infinity for step {step} "
                        f"({len(bad)} of {len(tensors)} tensors, e.g. {bad[:3]})")
                if self.cfg.nonfinite == "fail":
                    raise ProtocolError(ErrorCode.NONFINITE, f"{what}; nothing applied (--nonfinite fail)")
                log.warning("%s: left out of the step's average (--nonfinite skip)", what)
                self.metrics.nonfinite(w.rank, step)
                absent, tensors = absent | frozenset(tensors), {}  # adds nothing: the others' average
                weight, loss = 0.0, None
        if self.sync.on_arrival:  # async / ssp: ps.consistency applies the push now
            self._push_on_arrival(ident, msg, w, keys, groups, weight, tensors, absent)
            return
        replay = False
        for g in groups:  # validate against every group before touching any
            if step < g.step or (step == g.step and g.has_pushed(w.rank)):
                replay = True
            elif step > self.store.version(g.keys):  # also: its group awaits the rest of its step
                raise ProtocolError(ErrorCode.BAD_STEP,
                                    f"rank {w.rank} pushed step {step} but the server is at step "
                                    f"{self.store.version(g.keys)} (bsp: pull after each push)")
        if replay:
            log.debug("rank %d replayed step %d: acknowledged, not applied", w.rank, step)
        else:
            self.sync.record(w, step, weight, loss)
            for g in groups:
                mine = {k: tensors[k] for k in g.keys if k in tensors}
                if g.add(w.rank, Contribution(mine, weight, loss, total, absent & frozenset(g.keys))):
                    self._complete(g)
            if all(g.step > step or g.has_pushed(w.rank) for g in self._groups_of(w)):
                w.clock = max(w.clock, step + 1)  # every bucket of this step is in
        if msg.op is Op.PUSH:
            self._reply(ident, msg.id, {"applied": not replay, "version": self.store.version(w.keys)})
            self.metrics.request(msg.op.value, 0.0)  # answered on arrival
        else:
            self._park(Waiter(ident, msg.id, Op.PUSH_PULL, w.rank, keys, step=step + 1,
                                       shm=bool(f.get("shm"))))
        self._wake()

    def _push_on_arrival(self, ident: bytes, msg: Message, w: WorkerInfo, keys: tuple[str, ...],
                         groups: list[KeyGroup], weight: float, tensors: Mapping[str, torch.Tensor],
                         absent: frozenset[str]) -> None:
        """A push under async / ssp: applied now by the consistency model, then answered."""
        t0, step = time.monotonic(), msg.fields["step"]
        applied = self.sync.push(w, step, groups, tensors, weight, msg.fields.get("loss"))
        if applied:
            self.last_loss = self.sync.loss if self.sync.loss is not None else self.last_loss
            slowest = self.sync.slowest(w.rank)
            self.metrics.step(w.clock if slowest is None else slowest)
            version = self.store.version(self.store.params)
            every = self.cfg.checkpoint_every
            if every and version % every == 0 and version > self.saved_step:
                self._save(version, background=True)
        else:
            log.debug("rank %d replayed step %d: acknowledged, not applied", w.rank, step)
        if msg.op is Op.PUSH:
            self._reply(ident, msg.id, {"applied": applied, "version": self.store.version(w.keys)})
            self.metrics.request(msg.op.value, time.monotonic() - t0)
        else:
            self._park(Waiter(ident, msg.id, Op.PUSH_PULL, w.rank, keys, step=step + 1, t0=t0))
        self._wake()

    def _complete(self, g: KeyGroup) -> None:
        """Group ``g`` has every contribution of its step; the step is applied once all groups have.

        [Note: atomic steps] A bsp step moves every key of θ at once. Key groups (buckets,
        pipeline stages) are reduced as their pushes arrive, but the optimizer runs once the last
        group of the step is complete, over all of them. So θ is only ever at one version: a
        worker that restarts mid-step (some of its buckets pushed, others not), or a pipeline
        stage that restarts while its neighbours finished the step, gets θ of the step it
        recomputes, never a mix of two; and ``--clip-grad-norm`` sees the whole gradient.
        """
        self._staged.append(g.finish())
        assert self.groups is not None
        if any(other.step < g.step for other in self.groups):
            return
        staged, self._staged = self._staged, []
        grads: dict[str, torch.Tensor] = {}
        values: dict[str, torch.Tensor] = {}
        keys: list[str] = []
        loss = None
        for r in staged:
            grads.update(r.grads)
            values.update(r.values)
            keys += r.keys
            loss = r.loss if r.loss is not None else loss
        if loss is not None:
            self.last_loss = loss
        self.store.apply(grads, values, keys)
        faults.hit("after-apply", g.step - 1)
        version = self.store.version(self.store.params)
        self.metrics.update(version, loss)
        self.metrics.step(g.step)
        log.debug("step %d applied (%d keys, %d without a gradient), loss %s", g.step, len(keys),
                  len(keys) - len(grads) - len(values), loss)
        every = self.cfg.checkpoint_every
        if every and version % every == 0 and version > self.saved_step and self._consistent_cut():
            self._save(version, background=True)
        if self.regroup_pending:
            self._regroup()

    def _save(self, version: int, background: bool = False) -> None:
        """Checkpoint θ, the optimizer and the membership as of now (``version``).

        In the background ([Note: background checkpoints]) the loop goes on at once and
        ``saved_step`` moves when the file is on disk; otherwise this returns once it is.
        A checkpoint still being written is finished first: one at a time, in step order.
        """
        assert self.store.optimizer is not None
        self._settle()
        meta = {"versions": self.store.versions, "loss": self.last_loss,
                "members": {r: list(w.keys) for r, w in self.workers.items()}, "workers": self.cfg.workers,
                "worker_ids": self.ranks.to_meta(), "consistency": self.sync.state(),
                "buffers": sorted(self.store.buffers), "aliases": self.aliases}
        snap = checkpoint_snapshot(version, self.store.params, self.store.optimizer, meta)
        directory = self.cfg.checkpoint_dir
        self.saver.start(version, snap, lambda s: checkpoint.write_checkpoint(directory, version, s.write))
        if not background:
            self._settle()

    def _settle(self) -> Saved | None:
        """Wait for the checkpoint being written, if any, and record its end (returned)."""
        done = self.saver.wait()
        self._saved(done)
        return done

    def _saved(self, done: Saved | None) -> None:
        """Record a finished checkpoint (or log why it failed)."""
        if done is None:
            return
        self.metrics.checkpoint(done.step, done.seconds, done.error is None, done.cloned_bytes)
        if done.error is not None:
            self._ckpt_failures += 1
            now = time.monotonic()
            if self._ckpt_failures == 1 or now - self._ckpt_failure_logged >= 60.0:  # one line a minute, not a step
                self._ckpt_failure_logged = now
                log.error("checkpoint of step %d failed (%d failure(s) in a row), training goes on (the newest on "
                          "disk is step %d): %s: %s", done.step, self._ckpt_failures, self.saved_step,
                          type(done.error).__name__, done.error)
            return
        if self._ckpt_failures:
            log.warning("checkpoints are written again (step %d), after %d failure(s)", done.step, self._ckpt_failures)
            self._ckpt_failures = 0
        self.saved_step = max(self.saved_step, done.step)
        log.info("checkpoint %s%s", done.path,
                 f" ({done.cloned_bytes / 2**20:.1f} MiB kept while θ moved on)" if done.cloned_bytes else "")

    def _on_done(self, ident: bytes, msg: Message) -> None:
        """A barrier: answered once every worker is done and the final files are written."""
        w = self._worker(msg)
        if not w.done:
            log.info("rank %d finished (%d/%d done)", w.rank, sum(x.done for x in self.workers.values()) + 1,
                     self.cfg.workers)
        w.done = True
        self._park(Waiter(ident, msg.id, Op.DONE, w.rank, (), step=0))
        self._finish_if_done()

    def _on_rewind(self, ident: bytes, msg: Message) -> None:
        """[Note: shards rewind together] Shards checkpoint on their own. When one restarts from
        its newest checkpoint, the others are a step or two ahead, and a worker that rejoins finds
        the shards at different steps. It then asks every shard ahead to go back to the oldest
        one's step: a shard that has a checkpoint of that step starts over from it (``ps.cli``
        builds a new server in the same process, on the same endpoint: a new incarnation, so the
        workers register again), dropping its newer checkpoints; the steps in between are
        recomputed, exactly, as after any restart. The step is the newest one every shard can
        restore (each INIT reply lists its checkpoints' steps and its own, ``restorable``); a
        shard without it refuses, naming it.
        """
        self._worker(msg)
        step = msg.fields["step"]
        version = self.store.version(self.store.params) if self.store.initialized else 0
        if not self.store.initialized or step >= version:
            self._reply(ident, msg.id, {"version": version})
            return
        path = checkpoint.checkpoint_path(self.cfg.checkpoint_dir, step)
        if not path.exists():
            newest = checkpoint.latest_checkpoint(self.cfg.checkpoint_dir)
            raise ProtocolError(ErrorCode.BAD_STEP,
                                f"another server shard restarted from step {step}, but this one (at step {version}) "
                                f"has no checkpoint of step {step} to go back to (newest: "
                                f"{newest.name if newest else 'none'}); restart every shard from one step")
        log.warning("rank %d asks this shard to go back from step %d to step %d, where another shard restarted: "
                    "starting over from %s", msg.fields["rank"], version, step, path.name)
        self._reply(ident, msg.id, {"version": step})
        self._settle()
        self.rewind_to = step
        self._finished = True

    def _on_ping(self, ident: bytes, msg: Message) -> None:
        self._heartbeat(ident, msg.fields.get("rank"))
        version = self.store.version(self.store.params) if self.store.initialized else 0
        self._reply(ident, msg.id, {"version": version, "registered": len(self.workers),
                                    "workers": self.cfg.workers, "loss": self.last_loss,
                                    "done": sum(w.done for w in self.workers.values()),
                                    "incarnation": self.incarnation, **self.metrics.ping_fields()})

    def _write_final(self) -> None:
        """Write the last checkpoint and ``final.safetensors``; OSError if either fails (nothing is
        marked written then: [Note: the final write])."""
        if self._final_written:
            return
        if not self.store.initialized:
            log.warning("no θ to write: training never started")
            self._final_written = True
            return
        self._settle()
        version = self.store.version(self.store.params)
        # The last checkpoint (on the saver's thread) and final.safetensors are written at once
        # (each mostly waits on fsync); nothing changes θ meanwhile: the loop waits here.
        if version > self.saved_step:
            self._save(version, background=True)
        path = checkpoint.save_final(self.cfg.checkpoint_dir,
                                     piece_groups(checkpoint.with_aliases(self.store.params, self.aliases)), version)
        last = self._settle()
        if last is not None and last.error is not None:
            raise last.error  # DONE promises both files on disk: the job does not end "done"
        self._final_written = True
        if self._final_failures:
            log.warning("the final files were written after %d failed attempts", self._final_failures)
        loss = "-" if self.last_loss is None else f"{self.last_loss:.6g}"
        peak = status_bytes("VmHWM")
        theta = sum(p.numel() * p.element_size() for p in self.store.params.values())
        log.info("all %d workers done after %d steps, final loss %s; wrote %s (%d copy-on-write clones; "
                 "peak resident set %s)", self.cfg.workers, version, loss, os.path.abspath(path),
                 self.store.cow_clones, "-" if peak is None else f"{peak / 2**20:.0f} MiB, |θ| {theta / 2**20:.1f} MiB")

    _HANDLERS = {
        Op.REGISTER: _on_register,
        Op.INIT: _on_init,
        Op.PULL: _on_pull,
        Op.PUSH: _on_push,
        Op.PUSH_PULL: _on_push,
        Op.DONE: _on_done,
        Op.PING: _on_ping,
        Op.REWIND: _on_rewind,
    }
