"""``--sync async`` and ``--sync ssp``: each push is applied on arrival.

``async``
    Each push is applied on arrival with the learning rate scaled by 1/K (K = the key's
    contributors), so K pushes move θ as far as one bsp step; nobody ever waits.
``ssp``
    Pushes are applied on arrival as in ``async``; a worker at clock c (about to compute step
    c) waits while the slowest live worker sharing its keys has a clock below c - S. With S = 0
    and plain SGD this is bsp's math, applied one push at a time.

[Note: 1/K as a learning-rate scale] Scaling the gradient by 1/K and scaling the learning rate
by 1/K are the same for plain SGD; the learning rate is what matches bsp for weight decay
(applied once per K pushes, not K times) and for Adam, whose step does not depend on the
gradient's scale. So the optimizer runs each on-arrival update with ``lr / K``.

[Note: one start] Pushes are applied on arrival, so a worker whose INIT was answered could push
step 0 before another worker's INIT is answered; that worker would then start from θ after
the first one's update, not from θ_0 (with S = 0, no longer bsp's math: seen once in about a
hundred loaded runs of the exactness test). So, until this server has applied a push, an INIT is
answered only once every registered worker has its INIT parked, and all start from one θ.

A push carries a whole step (no buckets), gradients as frames (no shared memory). Buffers
take the lowest contributing rank's values, as in bsp ([Note: buffer values] in ``ps.aggregate``).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from common.errors import ErrorCode, ProtocolError
from ps.engine import register
from ps.engine.base import Services, StepEngine
from ps.engine.pushes import Push


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


@register("async")
class Async(StepEngine):
    """Apply each push on arrival with lr/K; a worker never waits for the others."""

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self._losses: dict[int, float] = {}
        self._applied_any = False  # a push was applied by this server process ([Note: one start])

    def start_barrier(self, rank: int) -> bool:
        """Before this server applied a push: wait until every registered worker's INIT is parked."""
        return not self._applied_any and self.members.init_missing(self.members.workers)

    def ready(self, rank: int, step: int, keys: tuple[str, ...]) -> bool:
        return True

    def start_step(self, rank: int, version: int) -> int:
        w = self.members.workers[rank]
        w.clock = max(w.clock, self._resumed.get(rank, 0))
        return w.clock

    def accept(self, push: Push) -> bool:
        """A push below the worker's clock is a replay; one above it is refused (pushes come in order)."""
        w, step = push.worker, push.step
        if step < w.clock:
            return False
        if step > w.clock:
            raise ProtocolError(ErrorCode.BAD_STEP, f"rank {w.rank} pushed step {step} but its clock is "
                                                    f"{w.clock} ({self.name}: push every step, in order)")
        self.apply(push)
        self._applied_any = True
        w.clock = step + 1
        slowest = self.slowest(w.rank)
        self.metrics.step(w.clock if slowest is None else slowest)
        self.s.checkpoints.maybe_save(self.step_now(), cut=True)
        return True

    def apply(self, push: Push) -> None:
        """Apply ``push`` now, group by group, with lr / (the group's contributors)."""
        assert self.store.optimizer is not None
        self.record(push)
        if push.weight <= 0:  # an empty batch carries no information: nothing to apply
            return
        w = push.worker
        for g in push.groups:
            present = {k: push.tensors[k] for k in g.grad_keys if k in push.tensors}
            values = ({k: push.tensors[k] for k in g.values if k in push.tensors}
                      if w.rank == min(g.contributors) else {})
            with scaled_lr(self.store.optimizer, 1.0 / len(g.contributors)):
                self.store.apply(present, values, g.keys)
            if push.loss is not None:
                self._losses[w.rank] = push.loss
                self.loss = sum(self._losses.values()) / len(self._losses)
            self.metrics.update(self.store.version(g.keys), self.loss)


@register("ssp")
class StaleSynchronous(Async):
    """Apply on arrival (like async); a worker at clock c waits while the slowest is below c - S."""

    def ready(self, rank: int, step: int, keys: tuple[str, ...]) -> bool:
        slowest = self.slowest(rank)
        return slowest is None or slowest >= step - self.cfg.staleness
