"""Consistency models: when a parked request is answered and how a push is applied.

The server asks its policy two questions and tells it one thing:

* :meth:`Consistency.ready` - may worker ``rank`` get θ for computing ``step`` now?
* :meth:`Consistency.push` - apply this push (only models with ``on_arrival``; BSP pushes
  go through :class:`ps.aggregate.KeyGroup`, the rank-ordered reduction).
* :meth:`Consistency.on_read` - θ of this version was just sent to ``rank``.

The models (``--sync``):

``bsp``
    A worker's request for step s is answered once θ has s applied steps: every worker
    computes step s from the same θ, and each step applies g = Σ w_k g_k / Σ w_k.
``async``
    Each push is applied on arrival with the learning rate scaled by 1/K (K = the key's
    contributors), so K pushes move θ as far as one BSP step; nobody ever waits.
``ssp``
    Pushes are applied on arrival as in ``async``; a worker at clock c (about to compute
    step c) waits while the slowest live worker sharing its keys has a clock below c - S.
    With S = 0 and plain SGD this is BSP's math, applied one push at a time.

[Note: 1/K as a learning-rate scale] Scaling the gradient by 1/K and scaling the learning
rate by 1/K are the same for plain SGD; the learning rate is what matches BSP for weight
decay (applied once per K pushes, not K times) and for Adam, whose step does not depend on
the gradient's scale. So the optimizer runs each on-arrival update with ``lr / K``.

Staleness of an applied gradient = updates applied to its keys between the θ the worker
last received and the moment its gradient is applied (0 in BSP; about K-1 in async with
equally fast workers). The lead of a push = its step minus the slowest other live worker's
clock (what SSP bounds by S). Both are recorded for every applied push (:mod:`ps.metrics`).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch

from common.config import ServerConfig
from common.errors import ErrorCode, ProtocolError
from common.names import SyncModel, implementations
from ps.aggregate import KeyGroup
from ps.membership import WorkerInfo
from ps.metrics import ServerMetrics
from ps.store import ParameterStore

log = logging.getLogger(__name__)


@contextmanager
def scaled_lr(optimizer: torch.optim.Optimizer, scale: float) -> Iterator[None]:
    """Run the body with every param group's ``lr`` multiplied by ``scale`` (restored after)."""
    saved = [group["lr"] for group in optimizer.param_groups]
    try:
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * scale
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved):
            group["lr"] = lr


class Consistency:
    """BSP, and the bookkeeping every model shares (clocks, reads, staleness, lead)."""

    name = "bsp"
    on_arrival = False
    """True when :meth:`push` applies pushes itself (async, ssp); False for BSP."""

    def __init__(self, cfg: ServerConfig, store: ParameterStore, workers: Mapping[int, WorkerInfo],
                 metrics: ServerMetrics) -> None:
        self.cfg = cfg
        self.store = store
        self.workers = workers
        self.metrics = metrics
        self.loss: float | None = None
        """Mean of each worker's latest loss (on-arrival models; BSP uses the step's mean)."""
        self._read: dict[int, int] = {}
        self._resumed: dict[int, int] = {}
        self._losses: dict[int, float] = {}
        self._peers: dict[int, tuple[int, ...]] = {}
        self._peers_size = -1

    # ------------------------------------------------------------------ what the server calls
    def on_read(self, rank: int, version: int) -> None:
        """θ at ``version`` (of the rank's keys) has just been sent to ``rank``."""
        self._read[rank] = version

    def ready(self, rank: int, step: int, keys: Sequence[str]) -> bool:
        """Whether ``rank`` may get θ for ``keys`` to compute ``step`` now."""
        return self.store.version(keys) >= step

    def start_step(self, rank: int, version: int) -> int:
        """The step ``rank`` starts (or resumes) at, told in the INIT reply."""
        return version

    def record(self, w: WorkerInfo, step: int, weight: float, loss: float | None) -> None:
        """Record staleness and lead of ``w``'s push of ``step``, just before it is applied."""
        version = self.store.version(w.keys)
        staleness = max(0, version - self._read.get(w.rank, version))
        self.metrics.push(w.rank, step, staleness, self.lead(w.rank, step), weight, loss)

    def push(self, w: WorkerInfo, step: int, groups: Sequence[KeyGroup], grads: Mapping[str, torch.Tensor],
             weight: float, loss: float | None) -> bool:
        """Apply ``w``'s push of ``step`` now; True if applied, False for a replay.

        ``grads`` holds the keys the worker had (gradients, and values of buffers); a key of
        ``groups`` missing from it is absent ([Note: absent gradients] in ``ps.aggregate``).
        """
        raise NotImplementedError("bsp pushes are reduced by ps.aggregate.KeyGroup")

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: every worker's clock."""
        clocks = dict(self._resumed)
        clocks.update({r: w.clock for r, w in self.workers.items()})
        return {"model": self.name, "clocks": {str(r): c for r, c in clocks.items()}}

    def load_state(self, state: Mapping[str, Any] | None) -> None:
        """Restore the clocks saved by :meth:`state` (used by on-arrival models on resume)."""
        if state:
            self._resumed = {int(r): int(c) for r, c in state.get("clocks", {}).items()}

    # ------------------------------------------------------------------ helpers
    def peers(self, rank: int) -> tuple[int, ...]:
        """Registered ranks sharing at least one key with ``rank`` (itself included).

        Cached while the membership's size is unchanged (a rank dropped by ``--on-worker-loss
        shrink`` or a new registration recomputes it).
        """
        if self._peers_size != len(self.workers):
            self._peers.clear()
            self._peers_size = len(self.workers)
        found = self._peers.get(rank)
        if found is None:
            mine = set(self.workers[rank].keys) if rank in self.workers else set()
            found = self._peers[rank] = tuple(sorted(r for r, w in self.workers.items() if mine & set(w.keys)))
        return found

    def slowest(self, rank: int, exclude_self: bool = False) -> int | None:
        """The lowest clock among live (not done) peers of ``rank``; None if there are none."""
        clocks = [w.clock for r in self.peers(rank) if (w := self.workers.get(r)) is not None
                  and not w.done and not (exclude_self and r == rank)]
        return min(clocks, default=None)

    def lead(self, rank: int, step: int) -> int:
        """How many steps ``step`` is ahead of the slowest other live peer (0 if none)."""
        slowest = self.slowest(rank, exclude_self=True)
        return 0 if slowest is None else max(0, step - slowest)


class Async(Consistency):
    """Apply each push on arrival with lr/K; a worker never waits for the others."""

    name = "async"
    on_arrival = True

    def ready(self, rank: int, step: int, keys: Sequence[str]) -> bool:
        return True

    def start_step(self, rank: int, version: int) -> int:
        w = self.workers[rank]
        w.clock = max(w.clock, self._resumed.get(rank, 0))
        return w.clock

    def push(self, w: WorkerInfo, step: int, groups: Sequence[KeyGroup], grads: Mapping[str, torch.Tensor],
             weight: float, loss: float | None) -> bool:
        if step < w.clock:
            return False
        if step > w.clock:
            raise ProtocolError(ErrorCode.BAD_STEP, f"rank {w.rank} pushed step {step} but its clock is "
                                                    f"{w.clock} ({self.name}: push every step, in order)")
        assert self.store.optimizer is not None
        self.record(w, step, weight, loss)
        if weight > 0:  # an empty batch carries no information: nothing to apply
            for g in groups:
                present = {k: grads[k] for k in g.grad_keys if k in grads}
                # buffers: the lowest contributor's values, as in bsp ([Note: buffer values])
                values = {k: grads[k] for k in g.values if k in grads} if w.rank == min(g.contributors) else {}
                with scaled_lr(self.store.optimizer, 1.0 / len(g.contributors)):
                    self.store.apply(present, values, g.keys)
                if loss is not None:
                    self._losses[w.rank] = loss
                    self.loss = sum(self._losses.values()) / len(self._losses)
                self.metrics.update(self.store.version(g.keys), self.loss)
        w.clock = step + 1
        return True


class StaleSynchronous(Async):
    """Apply on arrival (like async); a worker at clock c waits while the slowest is below c - S."""

    name = "ssp"

    def ready(self, rank: int, step: int, keys: Sequence[str]) -> bool:
        slowest = self.slowest(rank)
        return slowest is None or slowest >= step - self.cfg.staleness


MODELS: dict[str, type[Consistency]] = implementations(
    SyncModel, {"bsp": Consistency, "async": Async, "ssp": StaleSynchronous}, __name__)
"""The implementation of every ``--sync`` name (:class:`common.names.SyncModel`), checked at import."""


def make_consistency(cfg: ServerConfig, store: ParameterStore, workers: Mapping[int, WorkerInfo],
                     metrics: ServerMetrics) -> Consistency:
    """The policy for ``cfg.sync``."""
    return MODELS[cfg.sync](cfg, store, workers, metrics)
