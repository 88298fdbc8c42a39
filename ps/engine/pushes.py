"""A PUSH or PUSH_PULL read and checked: its tensors, the keys it names absent, its weight.

Everything a training rule may rely on is checked here, before the rule sees the push: the
tensors are frames or views of the worker's own gradient segment (the one named by
``segment``: [Note: one segment per registration] in ``ps.fastpath``), they and the absent
keys cover whole key groups (buckets) of the worker, each has θ's dtype and shape, ``samples``
and ``total`` are sane row counts, and ``--nonfinite`` has had its say.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from common.compression.framing import FIELD, expand
from common.config import ServerConfig
from common.errors import ErrorCode, ProtocolError
from common.protocol import Op
from common.wire import Message
from ps.aggregate import KeyGroup
from ps.fastpath import FastPath
from ps.finite import nonfinite_keys
from ps.membership import WorkerInfo
from ps.metrics import ServerMetrics
from ps.store import ParameterStore
from ps.tensorcheck import check_tensors

log = logging.getLogger(__name__)

MAX_SAMPLES = float(2**31)
"""The largest row count a push may weigh its gradient with (``samples``, ``total``)."""


@dataclass
class Push:
    """One worker's push of one step, checked."""

    op: Op
    worker: WorkerInfo
    step: int
    tensors: Mapping[str, torch.Tensor]  # the keys it has: gradients, and values of buffers
    absent: frozenset[str]  # keys of its groups it has nothing for ([Note: absent gradients])
    groups: list[KeyGroup]  # the key groups it covers, whole
    weight: float  # its rows (samples), 1 by default
    total: float | None  # the step's rows over every worker, when the tensors are pre-scaled
    loss: float | None
    keys: tuple[str, ...]  # PUSH_PULL: θ of these keys comes back
    shm: bool  # PUSH_PULL: θ in shared memory


def read_push(msg: Message, w: WorkerInfo, groups: Sequence[KeyGroup], cfg: ServerConfig, store: ParameterStore,
              fast: FastPath, metrics: ServerMetrics, prescaled: bool) -> Push:
    """Check ``msg`` from ``w`` against its key ``groups`` (``prescaled``: the rule takes ``total``).

    Raises:
        ProtocolError: anything wrong with it; nothing has changed then.
    """
    f = msg.fields
    step = f["step"]
    mine = [g for g in groups if w.rank in g.contributors]
    if not mine:
        raise ProtocolError(ErrorCode.NOT_INITIALIZED, f"rank {w.rank} rejoins between steps: call init first")
    keys = requested_keys(msg, w, store) if msg.op is Op.PUSH_PULL else w.keys
    tensors = _tensors(w, msg, fast, store)
    absent = frozenset(f.get("absent", ()))
    covered = _covered(w, mine, tensors, absent)
    check_tensors(tensors, (k for g in covered for k in g.keys), msg.op.value, store.specs(), store.buffers, True,
                  grads=True, absent=absent)
    weight = float(f.get("samples", 1.0))
    if not 0 <= weight <= MAX_SAMPLES:  # a weight of 1e308 would overflow the sum into inf and NaN
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"samples must be a count in [0, {MAX_SAMPLES}], got {weight}")
    total = f.get("total")
    if total is not None:
        total = float(total)
        if not 0 < total <= MAX_SAMPLES or "samples" not in f:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"total must be finite and positive, and come with "
                                                       f"samples; got total {total}")
        if not prescaled:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"pre-scaled gradients (total) need --sync bsp, "
                                                       f"not {cfg.sync}")
    if f.get("grads") is None:
        metrics.push_frames(w.rank, sum(t.numel() * t.element_size() for t in msg.tensors.values()),
                            sum(t.numel() * t.element_size() for t in tensors.values()))
    loss = f.get("loss")
    if cfg.nonfinite != "apply":
        bad = nonfinite_keys({k: t for k, t in tensors.items() if k not in store.buffers})
        if bad:
            what = (f"rank {w.rank} pushed a gradient with NaN or infinity for step {step} "
                    f"({len(bad)} of {len(tensors)} tensors, e.g. {bad[:3]})")
            if cfg.nonfinite == "fail":
                raise ProtocolError(ErrorCode.NONFINITE, f"{what}; nothing applied (--nonfinite fail)")
            log.warning("%s: left out of the step's average (--nonfinite skip)", what)
            metrics.nonfinite(w.rank, step)
            absent, tensors = absent | frozenset(tensors), {}  # adds nothing: the others' average
            weight, loss = 0.0, None
    return Push(msg.op, w, step, tensors, absent, covered, weight, total, loss, keys, bool(f.get("shm")))


def requested_keys(msg: Message, w: WorkerInfo, store: ParameterStore) -> tuple[str, ...]:
    """The keys whose θ a PULL or PUSH_PULL asks for (default: all of the worker's)."""
    keys = msg.fields.get("keys")
    if keys is None:
        return w.keys
    unknown = [k for k in keys if k not in store.params]
    if unknown:
        raise ProtocolError(ErrorCode.SCHEMA_MISMATCH, f"unknown keys {unknown[:5]}")
    return tuple(dict.fromkeys(keys))


def _tensors(w: WorkerInfo, msg: Message, fast: FastPath, store: ParameterStore) -> Mapping[str, torch.Tensor]:
    """The pushed tensors: frames (compressed ones decoded to dense), or views of the worker's
    segment (``grads``)."""
    names = msg.fields.get("grads")
    if FIELD in msg.fields:
        if names is not None:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "a push carries compressed frames or names shared-memory "
                                                       "grads, not both")
        tensors = expand(msg.tensors, msg.fields[FIELD], store.specs(), store.buffers)
        store.compressed_pushes = True  # from now on, steps may be sparse ([Note: sparse pulls])
        return tensors
    if names is None:
        return msg.tensors
    if msg.tensors:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a push carries frames or names shared-memory grads, not both")
    if len(set(names)) != len(names):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "grads lists a key twice")
    return fast.grads(w.rank, names, msg.fields.get("segment"))


def _covered(w: WorkerInfo, mine: list[KeyGroup], tensors: Mapping[str, torch.Tensor],
             absent: frozenset[str]) -> list[KeyGroup]:
    """The key groups a push covers; it must carry whole groups (buckets) of ``w``'s keys."""
    pushed = set(tensors) | absent
    groups = [g for g in mine if pushed.intersection(g.keys)]
    covered = {k for g in groups for k in g.keys}
    if not groups or covered != pushed:
        extra = sorted(pushed - set(w.keys))[:5]
        partial = sorted(covered - pushed)[:5]
        raise ProtocolError(ErrorCode.SCHEMA_MISMATCH,
                            f"a push must carry whole buckets of the registered keys; "
                            f"unexpected {extra}, missing {partial}")
    return groups
