"""Synchronous (BSP) reduction of one group of keys, in rank order.

A *group* is the set of keys that share the same contributors (every key in data-parallel
mode; one stage's keys in pipeline mode). A step of the group completes when every
contributor has pushed it. Gradients are reduced into preallocated accumulators strictly
in rank order - a push that arrives early waits (as a view of its received frames) until
the ranks before it are in - so the sum is bitwise the same whatever the arrival order:

    g = Σ_k w_k g_k / Σ_k w_k        (w_k = samples in worker k's batch; all 1 by default)

With equal weights this is the documented g = 1/K Σ g_k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch


@dataclass
class Contribution:
    """One worker's push for the group's current step."""

    grads: Mapping[str, torch.Tensor]
    weight: float
    loss: float | None


@dataclass
class KeyGroup:
    """Keys with the same contributors, their step, and the running rank-ordered sum."""

    keys: tuple[str, ...]
    contributors: tuple[int, ...]  # sorted ranks
    step: int = 0
    _acc: dict[str, torch.Tensor] = field(default_factory=dict)
    _pending: dict[int, Contribution] = field(default_factory=dict)
    _next: int = 0  # index into contributors of the next rank to add
    _weight: float = 0.0
    _loss_sum: float = 0.0
    _loss_weight: float = 0.0
    _seen: set[int] = field(default_factory=set)
    dtypes: Mapping[str, torch.dtype] = field(default_factory=dict)  # accumulator dtypes (θ's)

    def has_pushed(self, rank: int) -> bool:
        """Whether ``rank`` has pushed the current step."""
        return rank in self._seen

    def missing(self) -> list[int]:
        """Contributors that have not pushed the current step."""
        return [r for r in self.contributors if r not in self._seen]

    def add(self, rank: int, contribution: Contribution) -> bool:
        """Take ``rank``'s push for the current step; True when the step is now complete."""
        self._seen.add(rank)
        self._pending[rank] = contribution
        return self._drain()

    def remove(self, rank: int) -> bool:
        """Stop waiting for ``rank`` (it left the job); True when the step is now complete.

        A rank that already pushed the current step stays a contributor until the step
        completes: its push counts. Whoever owns the group drops it between steps.
        """
        if rank in self._seen or rank not in self.contributors:
            return False
        self.contributors = tuple(r for r in self.contributors if r != rank)
        return bool(self._seen) and self._drain()

    def _drain(self) -> bool:
        """Reduce the pending pushes that are next in rank order; True when all are in."""
        while self._next < len(self.contributors) and self.contributors[self._next] in self._pending:
            self._reduce(self._pending.pop(self.contributors[self._next]))
            self._next += 1
        return self._next == len(self.contributors)

    def _reduce(self, c: Contribution) -> None:
        first = self._next == 0
        for k in self.keys:
            g = c.grads[k]
            acc = self._acc.get(k)
            if acc is None:
                acc = self._acc[k] = torch.empty(g.shape, dtype=self.dtypes.get(k, g.dtype))
            if first:  # one pass; the same bits as copy_ then mul_
                if c.weight != 1.0:
                    torch.mul(g, c.weight, out=acc)
                else:
                    acc.copy_(g)
            else:
                acc.add_(g, alpha=c.weight)
        self._weight += c.weight
        if c.loss is not None:
            self._loss_sum += c.loss * c.weight
            self._loss_weight += c.weight

    def finish(self) -> tuple[dict[str, torch.Tensor], float | None]:
        """The averaged gradient and the weighted mean loss of the completed step.

        The returned tensors are the group's accumulators: use them before the next step.
        """
        if self._weight > 0:
            if self._weight != 1.0:  # x / 1 == x exactly: skip the pass
                for acc in self._acc.values():
                    acc.div_(self._weight)
        else:  # every batch was empty: no information, apply a zero gradient
            for acc in self._acc.values():
                acc.zero_()
        loss = self._loss_sum / self._loss_weight if self._loss_weight > 0 else None
        self.step += 1
        self._next = 0
        self._weight = self._loss_sum = self._loss_weight = 0.0
        self._seen.clear()
        self._pending.clear()
        return self._acc, loss
