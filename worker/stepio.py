"""One training step on the wire: gradients pushed bucket by bucket, θ pulled as buckets complete.

Gradients go out bucket by bucket (:meth:`StepIO.push_bucket`), each as soon as it is ready
(from backward hooks, ``worker.buckets``), and the step ends with :meth:`StepIO.finish`.
Right behind each bucket's PUSH goes a PULL of that bucket's keys at step + 1, so θ of early
buckets streams back while later buckets are still being computed or pushed. The step's last
bucket goes as a PUSH_PULL (one round trip), so a step without buckets is exactly one
PUSH_PULL per shard.

What a push carries, per shard:

* every piece of the bucket, once: as a frame, or (gradient segment) copied into the segment
  with the push naming the segment's token (``segment``);
* the pieces this worker has nothing for this step under ``absent`` (a parameter whose
  gradient is None, a buffer the step left unchanged), never zeros ("No gradient, no update"
  in docs/ARCHITECTURE.md);
* buffers as values: never scaled by ``samples / total``, never narrowed to the wire dtype and
  never compressed;
* with ``--compress`` (a :class:`common.compression.Compressor`), floating gradients go as a
  codec's parts (frames, never the gradient segment: the segment is a same-host path with
  nothing to save), each piece encoded once per step with error feedback, so a resent or
  recomputed push of the same step carries the same bytes ([Note: compressed pushes] in
  ``common/compression/framing.py``).

Every call goes through the shard's :class:`worker.retry.Caller`, so it rides out lost
connections and server restarts, with several calls in flight at once.
"""

from __future__ import annotations

import threading
from typing import Any, Mapping, Sequence

import torch

from common.compression import FIELD, Compressor, pack
from common.errors import PSError
from common.protocol import Op
from common.wire import Message
from worker.pieces import Layout
from worker.replies import Theta, asked_keys, check_theta
from worker.retry import Call
from worker.segments import SharedTheta
from worker.shard import Shard
from worker.staging import Stager

Tensors = Mapping[str, torch.Tensor]


class StepIO:
    """The pushes and pulls of the step in progress, for every shard of one worker.

    Attributes:
        pull_each: pull θ bucket by bucket (False: push without pulling).
        applied: every push of the last finished step was applied (not a replay).
        last_loss: the server's mean loss in the last step's replies, if any.
        last_version: θ's version in the last step's θ replies (the lowest over shards), if any:
            the server's version just after this push under an on-arrival rule.
    """

    def __init__(self, shards: Sequence[Shard], stager: Stager, theta: SharedTheta,
                 wire: torch.dtype | None, compressor: Compressor | None = None) -> None:
        self.shards = shards
        self.compressor = compressor
        self.stager = stager
        self.theta = theta
        self.wire = wire
        self.layout = Layout()
        self.rank: int | None = None
        self._owner_thread = threading.get_ident()  # the thread that may use the sockets
        self._absent: dict[int, set[str]] = {}  # bucket -> its piece keys with nothing to push this step
        self._pending: list[tuple[int, Call]] = []  # (shard, call) of pushes awaiting replies
        self._queued: list[int] = []  # buckets staged from another thread, not yet sent
        self._sent: set[int] = set()
        self._pulls: list[tuple[int, Call]] = []  # (shard, call) of θ pulls in flight
        self._pulled: set[int] = set()  # shards whose θ (shared memory) a PUSH_PULL already asked for
        self.pull_each = True
        self._fields: dict[str, Any] = {}  # the fields of every push of the step
        self._total: float | None = None  # the step's samples over every worker (pre-scaling)
        self.applied = True
        self.last_loss: float | None = None
        self.last_version: int | None = None
        self.sparse_pulls = False  # the caller never writes the tensors θ goes into ([Note: sparse pulls])
        self._holds: int | None = None  # the version θ's frames last went into those tensors

    @property
    def step(self) -> int:
        """The step being pushed (since :meth:`begin`)."""
        return int(self._fields["step"])

    def begin(self, layout: Layout, rank: int | None, step: int, samples: float | None, loss: float | None,
              pull: bool = True, total: float | None = None) -> None:
        """Start pushing ``step`` with ``layout``; with ``pull``, θ after it is pulled as buckets complete.

        ``total``: the step's samples over every worker, when the caller knows it; gradients
        going through shared memory are then scaled by ``samples / total`` as they are copied
        (the same pass), which spares the server two passes over them ([Note: pre-scaled] in
        ``ps/aggregate.py``).
        """
        self.layout, self.rank = layout, rank
        self.pull_each = pull
        self._pulled.clear()
        self._fields = {"rank": rank, "step": step}
        if samples is not None:
            self._fields["samples"] = float(samples)
        if loss is not None:
            self._fields["loss"] = float(loss)
        self._total = float(total) if total and samples is not None and total > 0 else None
        self._sent.clear()

    def push_bucket(self, i: int, grads: Mapping[str, torch.Tensor | None]) -> None:
        """Stage bucket ``i`` now and send it (later, if called from another thread).

        ``grads`` maps each name of the bucket to its gradient (a buffer: its value), or to
        None when this worker has nothing for it this step: the push names it ``absent``
        (``worker.modelstate``). Sparse or non-contiguous gradients are sent dense.
        """
        pieces = self.layout.pieces
        framed: dict[str, torch.Tensor] = {}
        absent: set[str] = set()
        for name in self.layout.buckets[i]:
            g = grads.get(name)
            if g is None:
                absent.update(q.key for q in pieces.pieces[name])
                continue
            if g.layout != torch.strided or not g.is_contiguous():
                g = g.to_dense() if g.layout != torch.strided else g.contiguous()
            for q in pieces.pieces[name]:
                shard = self.shards[pieces.owner[q.key]]
                if self._segment(shard):
                    scale = (None if self._total is None or name in self.layout.buffers
                             else self._fields["samples"] / self._total)
                    self.stager.copy_to(shard.grad_views[q.key], q.of(g), scale)
                else:
                    framed[name] = g
        self._absent[i] = absent
        self.stager.record(i, framed)
        self._queued.append(i)
        if threading.get_ident() == self._owner_thread:
            self.flush()

    def flush(self) -> None:
        """Send every staged bucket (on the thread that owns the sockets)."""
        while self._queued:
            i = self._queued.pop(0)
            grads = self.stager.ready(i)
            self._send_bucket(i, grads)

    def _send_bucket(self, i: int, grads: Tensors) -> None:
        pieces, buffers = self.layout.pieces, self.layout.buffers
        absent = self._absent.pop(i, set())
        per_shard: dict[int, dict[str, torch.Tensor | None]] = {}
        missing: dict[int, list[str]] = {}
        for name in self.layout.buckets[i]:
            for q in pieces.pieces[name]:
                s = pieces.owner[q.key]
                shm = self._segment(self.shards[s])
                if q.key in absent:
                    missing.setdefault(s, []).append(q.key)
                    per_shard.setdefault(s, {})
                else:
                    per_shard.setdefault(s, {})[q.key] = None if shm else q.of(grads[name])
        # The step's last bucket asks for θ in the same message (PUSH_PULL: one round trip)
        # when θ is wanted and would otherwise need a PULL of its own.
        final = self.pull_each and len(self._sent) == len(self.layout.buckets) - 1
        for s, part in per_shard.items():
            shard = self.shards[s]
            shm_theta = shard.theta_seg is not None
            op = Op.PUSH_PULL if final else Op.PUSH
            fields: dict[str, Any] = dict(self._fields)
            keys = [*part, *missing.get(s, ())]
            if s in missing:
                fields["absent"] = missing[s]
            if final:
                if shm_theta:
                    fields["shm"] = True  # θ of all this shard's keys, in shared memory
                    self._pulled.add(s)
                else:
                    fields["keys"] = keys
                    fields.update(self._have())
            if self._segment(shard):
                assert shard.grad_seg is not None
                if self._total is not None:
                    fields["total"] = self._total
                fields["segment"] = shard.grad_seg.token
                call = shard.caller.start(op, {**fields, "grads": list(part)}, step=fields["step"])
            else:
                if self.wire is not None:
                    part = {k: t.to(self.wire) if t.is_floating_point() and t.dtype != self.wire and
                            pieces.by_key[k][0] not in buffers else t for k, t in part.items()}
                if self.compressor is not None:
                    part = self._compress(part, fields)
                call = shard.caller.start(op, fields, part, fields["step"])  # the call keeps part until answered
            if final:
                self._pulls.append((s, call))
                continue
            self._pending.append((s, call))
            if self.pull_each and not shm_theta:
                # θ of this bucket comes back as soon as the bucket's step is applied, while
                # later buckets are still being pushed (or computed).
                f = {"rank": self.rank, "step": self._fields["step"] + 1, "keys": keys, **self._have()}
                self._pulls.append((s, shard.caller.start(Op.PULL, f, step=f["step"] - 1)))
        self._sent.add(i)

    def holds(self, version: int) -> None:
        """The tensors θ goes into were just given θ at ``version`` (by the caller)."""
        self._holds = version

    def _have(self) -> dict[str, int]:
        """``have`` for a pull after this step, when the tensors θ goes into hold θ of the step."""
        step = self._fields["step"]
        return {"have": step} if self.sparse_pulls and self._holds == step else {}

    def _segment(self, shard: Shard) -> bool:
        """Whether this worker's gradients for ``shard`` go through its gradient segment."""
        return shard.grad_seg is not None and self.compressor is None

    def _compress(self, part: Mapping[str, torch.Tensor | None], fields: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``part``'s floating gradients encoded (listed in ``fields``), the rest (buffers) dense."""
        assert self.compressor is not None
        buffers, by_key = self.layout.buffers, self.layout.pieces.by_key
        dense: dict[str, torch.Tensor] = {}
        encoded = {}
        for k, t in part.items():
            assert t is not None
            if by_key[k][0] not in buffers and self.compressor.applies(t):
                encoded[k] = self.compressor.compress(k, t, fields["step"])
            else:
                dense[k] = t
        if not encoded:
            return dense
        fields[FIELD], tensors = pack(dense, encoded)
        return tensors

    def finish(self, want_theta: bool = True, params: Tensors | None = None) -> dict[str, torch.Tensor]:
        """Wait for every push of the step; then θ's pieces after it (none from shared memory).

        Sends one PULL per shard for the state after the step where no PUSH_PULL or bucket
        PULL asked for it already; an unsent bucket is an error. With ``params``, θ goes into
        them instead (each bucket's as soon as it arrives, the rest from the θ segments; bound
        parameters show it already) and nothing is returned.

        [Note: replies in order] Replies are taken in the order the calls were sent (a push's
        acknowledgement, then its bucket's θ), so θ of bucket i goes into the parameters while
        later buckets are still on the wire, not after the last acknowledgement. A push error
        can therefore surface after earlier buckets' θ was loaded; the step fails either way
        and recovery pulls θ again. Each reply is checked whole before any of it is written
        ([Note: checked replies] in ``worker.replies``).

        Raises:
            PSError: a bucket was not pushed, or a server's θ reply is bad (naming the key and
                the server; that reply's θ is not written).
        """
        self.flush()
        missing = [i for i in range(len(self.layout.buckets)) if i not in self._sent]
        if missing:
            raise PSError(f"worker {self.rank}: buckets {missing} of step {self._fields.get('step')} were not pushed")
        step = self._fields["step"]
        pulls, self._pulls = self._pulls, []
        pulled, self._pulled = self._pulled, set()
        if want_theta:
            for s, shard in enumerate(self.shards):
                if s in pulled:
                    continue
                if shard.theta_seg is not None:
                    pulls.append((s, shard.caller.start(Op.PULL, {"rank": self.rank, "step": step + 1, "shm": True},
                                                        step=step)))
                elif not self.pull_each:
                    pulls.append((s, shard.caller.start(Op.PULL, {"rank": self.rank, "step": step + 1}, step=step)))
        self.applied = True
        self.last_loss = None
        self.last_version = None
        theta: dict[str, torch.Tensor] = {}
        calls = sorted([(False, s, c) for s, c in self._pending] + [(True, s, c) for s, c in pulls],
                       key=lambda x: x[2].start)
        try:
            with torch.no_grad():
                for is_pull, s, call in calls:
                    reply = self.shards[s].caller.finish(call)
                    if not is_pull:
                        self.applied = self.applied and bool(reply.fields.get("applied", True))
                        continue
                    self.last_loss = reply.fields.get("loss", self.last_loss)
                    got = self._check(s, call, reply)
                    if (v := reply.fields.get("version")) is not None:
                        self.last_version = int(v) if self.last_version is None else min(self.last_version, int(v))
                    if params is None:
                        if got.changed:
                            key = next(iter(got.changed))
                            raise PSError(f"worker {self.rank}: the server at {self.shards[s].endpoint} sent θ of "
                                          f"{key!r} as changed entries, but there are no tensors to apply them to")
                        theta.update(got.whole)
                        continue
                    self._load(got, params)
        except BaseException:
            self._holds = None
            raise
        finally:
            self._pending.clear()
        self._holds = step + 1 if params is not None and want_theta and not self.theta.any else None
        if params is not None:
            if self.theta.any:
                self.theta.load(params, self.layout.pieces)  # the pieces θ's segments hold
            else:
                self.stager.sync_h2d()
        return theta

    def _check(self, s: int, call: Call, reply: Message) -> Theta:
        """θ of a PULL/PUSH_PULL ``reply`` from shard ``s``, checked whole ([Note: checked replies]
        in ``worker.replies``): the keys ``call`` asked for, changed entries only if it offered ``have``.

        Raises:
            PSError: naming the first bad key and the server.
        """
        pieces = self.layout.pieces
        return check_theta(reply, pieces, asked_keys(pieces, s, call.fields), f"worker {self.rank}",
                           self.shards[s].endpoint, shm=bool(call.fields.get("shm")), have="have" in call.fields)

    def _load(self, got: Theta, params: Tensors) -> None:
        """Put θ of one checked reply into ``params`` (the bound ones show it already).

        ``got`` was checked whole (:meth:`_check`) before this writes any of it, so a bad reply
        leaves ``params`` as they were.
        """
        by_key = self.layout.pieces.by_key
        for key, (idx, vals) in got.changed.items():
            name, q = by_key[key]
            _scatter(q.of(params[name]), idx, vals)
        for key, t in got.whole.items():
            name, q = by_key[key]
            if name not in self.theta.bound:
                q.of(params[name]).copy_(t, non_blocking=True)

    def reset(self) -> None:
        """Forget the step in progress and every call in flight (before rejoining)."""
        self._holds = None
        for shard in self.shards:
            shard.caller.abandon()
        self._pending.clear()
        self._pulls.clear()
        self._pulled.clear()
        self._queued.clear()
        self._sent.clear()
        self._absent.clear()


def _scatter(dst: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor) -> None:
    """``dst.view(-1)[idx] = vals`` in place, also for a non-contiguous ``dst``."""
    vals = vals.to(dst.device, dst.dtype)
    if dst.is_contiguous():
        dst.view(-1)[idx.to(dst.device).long()] = vals
        return
    flat = dst.reshape(-1).clone()
    flat[idx.to(dst.device).long()] = vals
    dst.copy_(flat.view_as(dst))
