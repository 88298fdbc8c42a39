"""Synchronous (BSP) reduction of one group of keys, in rank order.

A *group* is the set of keys that share the same contributors (every key in data-parallel
mode; one stage's keys in pipeline mode). A step of the group completes when every
contributor has pushed it. Gradients are reduced into preallocated accumulators strictly
in rank order - a push that arrives early waits (as a view of its received frames) until
the ranks before it are in - so the sum is bitwise the same whatever the arrival order:

    g = Σ_k w_k g_k / Σ_k w_k        (w_k = samples in worker k's batch; all 1 by default)

With equal weights this is the documented g = 1/K Σ g_k.

[Note: absent gradients] A contribution may lack some keys (``absent``): a parameter the
worker's loss did not reach, or a frozen one. It adds nothing to the sum but its weight still
counts in Σ w_k, so a key used by some workers only gets Σ_{k used} w_k g_k / Σ_k w_k - what
DDP with ``find_unused_parameters=True`` computes (the others contribute zeros). A key absent
from every contribution gets *no* gradient: :meth:`KeyGroup.finish` leaves it out, and the
optimizer skips it exactly as torch.optim skips a parameter whose ``grad`` is None (no weight
decay, no momentum, no Adam step), as DDP leaves a globally unused parameter's grad untouched.

[Note: buffer values] The group's ``values`` keys are buffers (BatchNorm's running stats):
their contributions are values, not gradients. The step's value is the first contributor's in
rank order (the lowest rank: DDP broadcasts rank 0's buffers); if that contributor left the
buffer unchanged (absent), θ keeps its value, whatever the other ranks computed.

[Note: pre-scaled] A worker that knows the step's total samples T (its data plan does) may
push w_k / T · g_k instead of g_k (``total`` = T; it scales while it copies the gradient into
shared memory, in the same pass). The group then sums in units of the first contribution's
T (in rank order, so the choice does not depend on arrival order): Σ_k w_k g_k / T, where a
pre-scaled contribution with the same T enters as is, and the first two contributions are
added in one pass (``torch.add(a, b, out=acc)``) - two passes over the gradients fewer than
scaling, summing and dividing here. If the weights do not add up to T after all (a shrink,
or a caller's wrong total), one more pass rescales by T / Σ w_k; the result is the same
average to rounding either way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AbstractSet, Mapping

import torch


@dataclass
class Contribution:
    """One worker's push for the group's current step."""

    grads: Mapping[str, torch.Tensor]  # the keys it has (gradients; values for buffer keys)
    weight: float
    loss: float | None
    total: float | None = None  # the grads are already scaled by weight / total ([Note: pre-scaled])
    absent: AbstractSet[str] = frozenset()  # group keys it has nothing for ([Note: absent gradients])


@dataclass
class Reduced:
    """A completed step of one group: what the optimizer applies."""

    grads: dict[str, torch.Tensor]  # averaged gradients of the keys some contributor had
    values: dict[str, torch.Tensor]  # buffer values (the lowest rank's, where it changed them)
    loss: float | None
    keys: tuple[str, ...]  # every key of the group (their versions move, present or not)


@dataclass
class KeyGroup:
    """Keys with the same contributors, their step, and the running rank-ordered sum."""

    keys: tuple[str, ...]
    contributors: tuple[int, ...]  # sorted ranks
    step: int = 0
    values: frozenset[str] = frozenset()  # buffer keys ([Note: buffer values])
    _acc: dict[str, torch.Tensor] = field(default_factory=dict)
    _live: set[str] = field(default_factory=set)  # accumulators holding this step's sum
    _vals: dict[str, torch.Tensor] = field(default_factory=dict)
    _pending: dict[int, Contribution] = field(default_factory=dict)
    _next: int = 0  # index into contributors of the next rank to add
    _weight: float = 0.0
    _loss_sum: float = 0.0
    _loss_weight: float = 0.0
    _seen: set[int] = field(default_factory=set)
    _base: float | None = None  # the step's sum is Σ w_k g_k / _base (None: Σ w_k g_k)
    _first: Contribution | None = None  # a pre-scaled first contribution, not yet summed
    dtypes: Mapping[str, torch.dtype] = field(default_factory=dict)  # accumulator dtypes (θ's)

    @property
    def grad_keys(self) -> tuple[str, ...]:
        """The keys whose contributions are gradients (not buffer values)."""
        return tuple(k for k in self.keys if k not in self.values)

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
        if self._next == 0:
            self._vals = {k: c.grads[k] for k in self.values if k in c.grads}
            self._base = c.total
            if c.total is not None or c.weight == 1.0:
                self._first = c  # summed with the next contribution in one pass (the same bits)
            else:
                for k in self.grad_keys:  # (weight != 1 here) one pass; the same bits as copy_ then mul_
                    g = c.grads.get(k)
                    if g is not None:
                        torch.mul(g, c.weight, out=self._accumulator(k, g))
                        self._live.add(k)
        else:
            f = self._factor(c)
            first, self._first = self._first, None
            for k in self.grad_keys:
                g = c.grads.get(k)
                g0 = first.grads.get(k) if first is not None else None
                if first is not None and g0 is not None:
                    if g is not None:
                        torch.add(g0, g, alpha=f, out=self._accumulator(k, g))
                    else:
                        self._accumulator(k, g0).copy_(g0)
                    self._live.add(k)
                elif g is None:
                    continue
                elif k in self._live:
                    self._acc[k].add_(g, alpha=f)
                else:  # the first contribution that has this key (0 + f·g)
                    torch.mul(g, f, out=self._accumulator(k, g))
                    self._live.add(k)
        self._weight += c.weight
        if c.loss is not None:
            self._loss_sum += c.loss * c.weight
            self._loss_weight += c.weight

    def _accumulator(self, k: str, g: torch.Tensor) -> torch.Tensor:
        acc = self._acc.get(k)
        if acc is None:
            acc = self._acc[k] = torch.empty(g.shape, dtype=self.dtypes.get(k, g.dtype))
        return acc

    def _factor(self, c: Contribution) -> float:
        """What ``c``'s gradients are multiplied by to enter this step's sum."""
        if self._base is None:  # Σ w_k g_k
            return c.weight if c.total is None else c.total
        return c.weight / self._base if c.total is None else c.total / self._base  # 1.0 when the totals agree

    def finish(self) -> Reduced:
        """The averaged gradients, buffer values and weighted mean loss of the completed step.

        The returned tensors are the group's accumulators, or a lone contribution's own
        tensors: use them, without writing to them, before the next step. A key no
        contributor had is not among the gradients ([Note: absent gradients]).
        """
        first, self._first = self._first, None
        out: dict[str, torch.Tensor] = {}
        if self._weight <= 0:  # every batch was empty: no information, no gradient
            pass
        elif first is not None:  # a lone contribution (one contributor, or the others left)
            f = 1.0 if self._base is None else self._base / self._weight  # raw: its weight is 1
            for k in self.grad_keys:
                g = first.grads.get(k)
                if g is None:
                    continue
                if f == 1.0 and g.dtype == self.dtypes.get(k, g.dtype):
                    out[k] = g  # no pass at all: the optimizer only reads it
                else:
                    out[k] = torch.mul(g, f, out=self._accumulator(k, g))
        else:
            out = {k: self._acc[k] for k in self.grad_keys if k in self._live}
            if self._base is not None:
                if self._weight != self._base:  # the weights did not add up to the declared total
                    for acc in out.values():
                        acc.mul_(self._base / self._weight)
            elif self._weight != 1.0:  # x / 1 == x exactly: skip the pass
                for acc in out.values():
                    acc.div_(self._weight)
        loss = self._loss_sum / self._loss_weight if self._loss_weight > 0 else None
        values, self._vals = self._vals, {}
        self.step += 1
        self._next = 0
        self._weight = self._loss_sum = self._loss_weight = 0.0
        self._base = None
        self._seen.clear()
        self._pending.clear()
        self._live.clear()
        return Reduced(out, values, loss, self.keys)
