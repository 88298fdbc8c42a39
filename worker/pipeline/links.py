"""A stage's peer links: its own inbox, and one outgoing socket per neighbour.

Each stage binds a ROUTER (its inbox, :func:`common.transport.bind_peer`) and tells the
server the endpoint at registration; the server's INIT reply lists every stage's endpoint,
and the stage dials its neighbours with DEALERs (:func:`common.transport.connect_peer`).
Messages are one way: ACTIVATION to the next stage, GRADIENT (δ) to the previous one, and
ABORT to both when a stage fails, so that its neighbours stop at once instead of waiting out
their timeout.

Every message says who sent it (stage, rank) and what it is (step, microbatch, and each
tensor's name, dtype and shape, in the wire header). The inbox checks the sender, keeps
messages that arrive early until their action asks for them, and rejects duplicates, stale
steps and strangers with a :class:`common.errors.StageError` naming the action that was
waiting. A neighbour that stays silent past the timeout is a
:class:`common.errors.StageTimeoutError` naming it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import zmq

from common.errors import ProtocolError, StageError, StageTimeoutError
from common.protocol import Op
from common.transport import bind_peer, connect_peer, send_zero_copy
from common.wire import DEFAULT_LIMITS, WireLimits, decode, encode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Place:
    """Where a stage worker sits: stage s of P, replica r, world rank ``r * P + s``."""

    stage: int
    stages: int
    replica: int
    rank: int

    @property
    def first(self) -> bool:
        """True for stage 0 (it reads the inputs x)."""
        return self.stage == 0

    @property
    def last(self) -> bool:
        """True for stage P-1 (it reads the targets y and computes the loss)."""
        return self.stage == self.stages - 1


@dataclass(frozen=True)
class Neighbour:
    """A neighbour stage: its index, world rank and inbox endpoint."""

    stage: int
    rank: int
    endpoint: str

    def __str__(self) -> str:
        return f"stage {self.stage} (rank {self.rank}, {self.endpoint})"


@dataclass
class Inbound:
    """One received ACTIVATION or GRADIENT message."""

    op: Op
    step: int
    micro: int
    pack: str
    tensors: dict[str, torch.Tensor]


_WHAT = {Op.ACTIVATION: "activation", Op.GRADIENT: "δ"}


class PeerLinks:
    """The inbox and the two outgoing links of one stage.

    Args:
        ctx: the ZeroMQ context.
        me: this stage's place.
        bind: endpoint to bind the inbox on (port 0 lets the OS choose).
        advertise: host name neighbours should dial when ``bind`` is a wildcard.
        timeout: seconds a receive waits for a neighbour before it fails.
        max_micros: the most microbatches a step has (bounds the messages kept early).
    """

    def __init__(self, ctx: zmq.Context, me: Place, bind: str, advertise: str | None, timeout: float,
                 max_micros: int, limits: WireLimits = DEFAULT_LIMITS) -> None:
        self.ctx = ctx
        self.me = me
        self.timeout = timeout
        self.max_micros = max_micros
        self.limits = limits
        self.inbox, self.endpoint = bind_peer(ctx, bind, advertise, limits)
        self.prev: Neighbour | None = None
        self.next: Neighbour | None = None
        self._out: dict[int, zmq.Socket] = {}  # neighbour stage -> DEALER
        self._early: dict[tuple[Op, int, int], Inbound] = {}
        self._taken: set[tuple[Op, int, int]] = set()
        self._step = 0
        self._micros = max_micros
        self.interrupted: Callable[[], str | None] | None = None
        """Asked while waiting: a reason to stop waiting now (the pipeline re-forms), or None."""

    # ------------------------------------------------------------------ set-up
    def connect(self, prev: Neighbour | None, nxt: Neighbour | None) -> None:
        """Dial the neighbours (connecting never blocks; messages queue until the link is up)."""
        self.prev, self.next = prev, nxt
        ident = f"s{self.me.stage}r{self.me.rank}-{os.getpid()}".encode()
        for n in (prev, nxt):
            if n is not None:
                self._out[n.stage] = connect_peer(self.ctx, n.endpoint, ident)
        log.info("peer inbox %s; previous %s; next %s", self.endpoint, prev or "-", nxt or "-")

    def begin_step(self, step: int, micros: int) -> None:
        """Start ``step`` with ``micros`` microbatches: older messages are stale from now on."""
        self._step, self._micros = step, micros
        self._taken.clear()
        stale = [k for k in self._early if k[1] < step]
        if stale:
            raise StageError(self.me.stage, self.me.rank, step, stale[0][2], "-",
                             f"{len(stale)} message(s) of an earlier step were never used, e.g. "
                             f"{_WHAT[stale[0][0]]} of step {stale[0][1]} microbatch {stale[0][2]}")

    # ------------------------------------------------------------------ send
    def send(self, op: Op, step: int, micro: int, pack: str, tensors: Mapping[str, torch.Tensor],
             track: bool = False) -> zmq.MessageTracker | None:
        """Send an ACTIVATION (to the next stage) or a GRADIENT (to the previous one); never blocks."""
        to = self.next if op is Op.ACTIVATION else self.prev
        assert to is not None, f"stage {self.me.stage} has no neighbour for {op.value}"
        fields = {"stage": self.me.stage, "rank": self.me.rank, "step": step, "micro": micro, "pack": pack}
        frames = encode(op, fields, tensors)
        return send_zero_copy(self._out[to.stage], frames, track)

    def abort(self, message: str, step: int = -1, micro: int = -1, action: str = "-") -> None:
        """Tell both neighbours this stage failed (best effort; they stop instead of timing out)."""
        fields = {"stage": self.me.stage, "rank": self.me.rank, "message": message[:1500],
                  "step": step, "micro": micro, "action": action}
        for sock in self._out.values():
            try:
                sock.send_multipart(encode(Op.ABORT, fields), zmq.NOBLOCK)
            except zmq.ZMQError as e:
                log.debug("could not send abort: %s", e)

    # ------------------------------------------------------------------ receive
    def recv(self, op: Op, step: int, micro: int, action: str) -> Inbound:
        """The ACTIVATION or GRADIENT of (``step``, ``micro``), waiting up to the timeout.

        Raises:
            StageTimeoutError: the neighbour sent nothing suitable in time.
            StageError: a neighbour aborted, or a message was malformed, from a stranger,
                a duplicate, or for a step or microbatch that cannot come now.
        """
        key = (op, step, micro)
        frm = self.prev if op is Op.ACTIVATION else self.next
        if frm is None:
            raise self._err(step, micro, action, f"stage {self.me.stage} has no neighbour to send {_WHAT[op]}")
        deadline = time.monotonic() + self.timeout
        while key not in self._early:
            moved = self.interrupted() if self.interrupted is not None else None
            if moved:
                raise self._err(step, micro, action, moved)
            left = deadline - time.monotonic()
            if left <= 0 or not self.inbox.poll(max(1, int(min(left, 0.5) * 1000)), zmq.POLLIN):
                if time.monotonic() >= deadline:
                    raise StageTimeoutError(
                        self.me.stage, self.me.rank, step, micro, action,
                        f"no {_WHAT[op]} from {frm} within {self.timeout:g}s (did it stop or hang?)",
                        peer=str(frm), timeout_s=self.timeout)
                continue
            self._take_one(step, micro, action)
        self._taken.add(key)
        return self._early.pop(key)

    def _take_one(self, step: int, micro: int, action: str) -> None:
        frames = self.inbox.recv_multipart(zmq.NOBLOCK, copy=False)
        if len(frames) < 2:
            return
        try:
            msg = decode(frames[1:], self.limits)
        except ProtocolError as e:
            raise self._err(step, micro, action, f"bad message from a neighbour: {e.code.name}: {e}") from e
        f = msg.fields
        if msg.op is Op.ABORT:
            raise self._err(step, micro, action, f"stage {f['stage']} (rank {f.get('rank', '?')}) failed at "
                                                 f"step {f.get('step', '?')} action {f.get('action', '?')}: "
                                                 f"{f['message']}")
        if msg.op not in _WHAT:
            raise self._err(step, micro, action, f"unexpected {msg.op.value!r} message on the peer inbox")
        frm = self.prev if msg.op is Op.ACTIVATION else self.next
        if frm is None or f["stage"] != frm.stage or f.get("rank", frm.rank) != frm.rank:
            raise self._err(step, micro, action,
                            f"{_WHAT[msg.op]} from stage {f['stage']} (rank {f.get('rank', '?')}), "
                            f"but it may come only from {frm or 'no stage'}")
        key = (msg.op, f["step"], f["micro"])
        what = f"{_WHAT[msg.op]} of step {f['step']} microbatch {f['micro']} from {frm}"
        limit = self._micros if f["step"] == self._step else self.max_micros
        if not (self._step <= f["step"] <= self._step + 1) or not 0 <= f["micro"] < limit:
            raise self._err(step, micro, action, f"{what} cannot come now (this stage is at step {self._step} "
                                                 f"with {self._micros} microbatches)")
        if key in self._early or key in self._taken:
            raise self._err(step, micro, action, f"{what} arrived twice")
        self._early[key] = Inbound(msg.op, f["step"], f["micro"], str(f.get("pack", "tensor")), msg.tensors)

    def _err(self, step: int, micro: int, action: str, message: str) -> StageError:
        return StageError(self.me.stage, self.me.rank, step, micro, action, message)

    # ------------------------------------------------------------------ tear-down
    def close(self, linger_s: float = 0.0) -> None:
        """Close every socket; outgoing ones wait up to ``linger_s`` to deliver what is queued."""
        for sock in self._out.values():
            sock.close(linger=int(linger_s * 1000))
        self._out.clear()
        self.inbox.close(linger=0)

    def __enter__(self) -> "PeerLinks":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
