"""``--sync bsp``: every worker computes step t from the same θ_t; θ_{t+1} = optimizer(θ_t, g_t).

A worker's request for step t is answered once θ has t applied steps; each step applies
g = Σ w_k g_k / Σ w_k, reduced in rank order as the pushes arrive (``ps.aggregate``).

[Note: atomic steps] A bsp step moves every key of θ at once. Key groups (buckets, pipeline
stages) are reduced as their pushes arrive, but the optimizer runs once the last group of the
step is complete, over all of them. So θ is only ever at one version: a worker that restarts
mid-step (some of its buckets pushed, others not), or a pipeline stage that restarts while its
neighbours finished the step, gets θ of the step it recomputes, never a mix of two; and
``--clip-grad-norm`` sees the whole gradient.
"""

from __future__ import annotations

import logging

import torch

from common import faults
from common.errors import ErrorCode, ProtocolError
from ps.aggregate import Contribution, KeyGroup, Reduced
from ps.engine import register
from ps.engine.base import Services, StepEngine
from ps.engine.pushes import Push

log = logging.getLogger(__name__)


@register("bsp")
class BSP(StepEngine):
    """Bulk-synchronous steps (see the module doc)."""

    buckets = shared_memory = skip_nonfinite = prescaled = True

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self._staged: list[Reduced] = []  # key groups done with the step being completed

    def accept(self, push: Push) -> bool:
        """A push of a step already pushed or applied is a replay; one ahead of θ is refused."""
        w, step = push.worker, push.step
        replay = False
        for g in push.groups:  # validate against every group before touching any
            if step < g.step or (step == g.step and g.has_pushed(w.rank)):
                replay = True
            elif step > self.store.version(g.keys):  # also: its group awaits the rest of its step
                raise ProtocolError(ErrorCode.BAD_STEP,
                                    f"rank {w.rank} pushed step {step} but the server is at step "
                                    f"{self.store.version(g.keys)} (bsp: pull after each push)")
        if replay:
            return False
        self.record(push)
        for g in push.groups:
            mine = {k: push.tensors[k] for k in g.keys if k in push.tensors}
            if g.add(w.rank, Contribution(mine, push.weight, push.loss, push.total, push.absent & frozenset(g.keys))):
                self.group_complete(g)
        assert self.groups is not None
        if all(g.step > step or g.has_pushed(w.rank) for g in self.groups if w.rank in g.contributors):
            w.clock = max(w.clock, step + 1)  # every bucket of this step is in
        return True

    def group_complete(self, g: KeyGroup) -> None:
        """Stage ``g``'s reduced step; apply the step once every group has it ([Note: atomic steps])."""
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
            self.loss = loss
        self.store.apply(grads, values, keys)
        faults.hit("after-apply", g.step - 1)
        version = self.store.version(self.store.params)
        self.metrics.update(version, loss)
        self.metrics.step(g.step)
        log.debug("step %d applied (%d keys, %d without a gradient), loss %s", g.step, len(keys),
                  len(keys) - len(grads) - len(values), loss)
        self.s.checkpoints.maybe_save(version, self.consistent_cut())
        if self.regroup_pending:
            self.regroup()
