"""REGISTER: who a worker is (its rank), what it holds (keys, dtypes, shapes, buffers, tied
names), and whether it fits θ and the other workers.

[Note: idempotent register] A worker resends REGISTER until it is answered (it may start long
before the server), so one registration can arrive many times. A copy from the same connection
with the same fields is answered with the first answer (only ``initialized`` says what holds
now) and changes nothing; whichever copy's answer the worker acts on, it agrees with the
server on its rank and its shared-memory segment.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Mapping

from common.config import ServerConfig
from common.dtypes import ITEMSIZE
from common.errors import ErrorCode, ProtocolError
from common.partition import base_of
from common.protocol import Op
from common.wire import Message
from ps.engine.base import StepEngine
from ps.fastpath import FastPath
from ps.membership import Membership, WorkerInfo
from ps.outbox import Outbox
from ps.store import ParameterStore

log = logging.getLogger(__name__)

Specs = Mapping[str, tuple[str, tuple[int, ...]]]


class Registrar:
    """Handles REGISTER; ``registered`` is called after each accepted registration (θ may start)."""

    def __init__(self, cfg: ServerConfig, members: Membership, store: ParameterStore, fast: FastPath,
                 engine: StepEngine, outbox: Outbox, origin: Callable[[], str],
                 registered: Callable[[], None]) -> None:
        self.cfg = cfg
        self.members = members
        self.store = store
        self.fast = fast
        self.engine = engine
        self.outbox = outbox
        self.origin = origin  # where θ was resumed from, for errors ([Note: used folders])
        self.registered = registered

    def on_register(self, ident: bytes, msg: Message) -> None:
        """The REGISTER handler (see the module doc)."""
        f = msg.fields
        m = self.members
        same = next((w for w in m.workers.values() if w.identity == ident and w.request == f), None)
        if same is not None:
            m.renew(same.rank)
            log.debug("rank %d: a copy of its registration, answered as before", same.rank)
            self.outbox.reply(ident, Op.REGISTER, msg.id, {**same.reply, "initialized": self.store.initialized})
            return
        world, worker_id = f["world_size"], f.get("worker_id")
        if world != self.cfg.workers:
            raise ProtocolError(ErrorCode.BAD_RANK, f"world size {world} != the server's {self.cfg.workers}")
        rank = m.ranks.choose(worker_id, f.get("rank"), world, m.held(time.monotonic()))  # pure; bound below
        if not 0 <= rank < world:
            raise ProtocolError(ErrorCode.BAD_RANK, f"rank {rank} outside [0, {world})")
        if self.cfg.clip_grad_norm and f.get("shards", 1) != 1:
            raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                f"rank {rank} splits θ over {f.get('shards')} server shards, but --clip-grad-norm "
                                f"clips the norm of the whole model's gradient, which one shard cannot see: use "
                                f"one server or no --clip-grad-norm")
        specs = {name: (dtype, tuple(shape)) for name, dtype, shape in f["params"]}
        if not specs:
            raise ProtocolError(ErrorCode.SCHEMA_MISMATCH, "a worker must register at least one parameter")
        self._check_frames(rank, specs)
        buffers = frozenset(f.get("buffers", ()))
        role = f.get("role", "data")
        self._check_schema(rank, role, specs, buffers)
        self._check_steps(rank, f.get("steps"))
        aliases = self._aliases(f.get("aliases"), specs)
        keys = tuple(specs)
        buckets = self._buckets(f.get("buckets"), keys)
        old = m.workers.get(rank)
        m.admit(ident, rank)
        if old is not None and old.keys != keys and old.identity == ident:
            raise ProtocolError(ErrorCode.SCHEMA_MISMATCH, f"rank {rank} re-registered with different keys")
        if old is not None:  # a copy of the same registration was answered above, without a word
            log.info("rank %d registered again (%s)", rank,
                     "same connection" if old.identity == ident else "a new connection: the worker restarted or "
                                                                     "rejoined")
        else:
            self.engine.joined(rank)
        moved = m.moved(old, ident, role, f.get("endpoint", ""))
        fast = self.fast.register(rank, specs, ident) if f.get("shm") else {}
        reply = {"world_size": self.cfg.workers, "sync": self.cfg.sync, "initialized": self.store.initialized,
                 "rank": rank, "optimizer": self.cfg.optimizer, "lr": self.cfg.lr,
                 "clip_grad_norm": self.cfg.clip_grad_norm, "incarnation": m.incarnation,
                 "lease_s": self.cfg.lease, "hold_s": self.cfg.rejoin_deadline, "buckets": bool(buckets), **fast,
                 **self.engine.register_fields()}
        m.workers[rank] = WorkerInfo(rank=rank, identity=ident, keys=keys, role=role, endpoint=f.get("endpoint", ""),
                                     stage=f.get("stage", -1), plan=f.get("plan", ""), clock=old.clock if old else 0,
                                     buckets=buckets, request=dict(f), reply=reply)
        m.registered_specs.update(specs)
        m.buffer_keys |= buffers
        self.store.aliases.update(aliases)
        m.renew(rank)
        m.ranks.bind(worker_id, rank)
        log.info("rank %d registered %d key(s) (%d/%d)%s", rank, len(keys), len(m.workers), self.cfg.workers,
                 f" as worker id {worker_id!r}" if worker_id else "")
        self.outbox.reply(ident, Op.REGISTER, msg.id, reply)
        self.registered()
        if moved:  # stages of the old formation waiting for θ stop now ([Note: pipeline formations])
            self.engine.wake()

    # ------------------------------------------------------------------ checks
    def _check_schema(self, rank: int, role: str, specs: Specs, buffers: frozenset[str]) -> None:
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
        m = self.members
        others = [w for w in m.workers.values() if w.rank != rank and m.live(w.rank, now)]
        if self.store.initialized:
            known, kinds = self.store.specs(), self.store.buffers
        else:
            known = {k: m.registered_specs[k] for o in others for k in o.keys}
            kinds = frozenset(m.buffer_keys)
        origin = self.origin()
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

    def _check_frames(self, rank: int, specs: Specs) -> None:
        """Every key travels as one frame (INIT, pushes): none may be larger than the frame cap that
        ZeroMQ enforces on every connection ([Note: frame cap]), or its INIT would be dropped unread."""
        cap = self.cfg.max_frame_mb << 20
        for k, (dtype, shape) in specs.items():
            nbytes = ITEMSIZE[dtype] * math.prod(shape)
            if nbytes > cap:
                raise ProtocolError(ErrorCode.TOO_LARGE,
                                    f"rank {rank}: {k!r} is one frame of {nbytes / (1 << 20):.1f} MiB, over the "
                                    f"server's frame cap of {self.cfg.max_frame_mb} MiB: split it into pieces "
                                    f"with the worker's --chunk-mb (at most {self.cfg.max_frame_mb}; a tensor "
                                    f"splits along its first dimension) or raise ps-server --max-frame-mb")

    def _check_steps(self, rank: int, steps: int | None) -> None:
        """Every worker of a job must plan the same number of steps (``--epochs``, batch, data):
        otherwise the ones that finish first wait at DONE for steps that never come, and the job
        fails at the rejoin deadline blaming a worker that was still training."""
        if steps is None:
            return
        now = time.monotonic()
        for w in self.members.workers.values():
            theirs = w.request.get("steps")
            if w.rank != rank and theirs is not None and theirs != steps and self.members.live(w.rank, now):
                raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                    f"rank {rank} plans {steps} steps but rank {w.rank} plans {theirs}: give every "
                                    f"worker the same --epochs, --batch-size and data")

    def _aliases(self, raw: Any, specs: Specs) -> dict[str, str]:
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
            known = self.store.aliases.get(alias, key)
            if known != key:
                raise ProtocolError(ErrorCode.SCHEMA_MISMATCH, f"alias {alias!r} names {key!r} here but "
                                                               f"{known!r} for another worker")
            out[alias] = key
        return out

    def _buckets(self, raw: Any, keys: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
        """Validate REGISTER's ``buckets``: lists partitioning the worker's keys.

        Only an engine that takes a step's pushes bucket by bucket (bsp) keeps them; otherwise
        a push is a whole step, and the reply's ``buckets: false`` tells the worker so.
        """
        if raw is None:
            return ()
        if not isinstance(raw, list) or not all(isinstance(b, list) and b and all(isinstance(k, str) for k in b)
                                                for b in raw):
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "buckets must be a list of non-empty lists of key names")
        flat = [k for b in raw for k in b]
        if len(flat) != len(set(flat)) or set(flat) != set(keys):
            raise ProtocolError(ErrorCode.SCHEMA_MISMATCH, "buckets must list every registered key exactly once")
        return tuple(tuple(b) for b in raw) if self.engine.buckets else ()
