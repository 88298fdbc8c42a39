"""The bucketed-step half of :class:`worker.client.PSClient`: what the data-parallel runtime calls.

A step is :meth:`BucketedSteps.begin_step`, one :meth:`~BucketedSteps.push_bucket` per bucket
(from backward hooks, ``worker.buckets``, as each bucket's gradients are ready) and
:meth:`~BucketedSteps.end_step`, which waits for the pushes and loads θ after the step into
the parameters. :meth:`~BucketedSteps.bind` and :meth:`~BucketedSteps.load` share θ with a
same-host server, and :meth:`~BucketedSteps.allow_sparse_pulls` lets θ come back as the entries
a step changed ([Note: sparse pulls] in ``common.protocol``). :class:`PSClient` inherits these;
the calls themselves go through its :class:`worker.channel.Channel`, and a call that ends in
registering again returns θ at the server's version ([Note: rewinding] in ``worker.client``).
"""

from __future__ import annotations

from typing import Callable, Mapping, TypeVar

import torch

from common.protocol import Op
from worker.channel import Channel
from worker.rejoin import Rejoined

T = TypeVar("T")


class BucketedSteps:
    """Steps pushed bucket by bucket, θ loaded in place: mixed into :class:`worker.client.PSClient`.

    Attributes:
        step: the next step to compute (the client's).
        last_loss: the server's mean loss in the last step's replies, if any.
        last_version: θ's version in the last step's replies (the server's version just after the
            push under an on-arrival rule; None after a rejoin).
        keys: the names given to ``init``.
    """

    step: int
    last_loss: float | None
    last_version: int | None
    keys: tuple[str, ...]

    def begin_step(self, step: int | None = None, samples: float | None = None, loss: float | None = None,
                   total: float | None = None) -> None:
        """Start step ``step``: buckets pushed until :meth:`end_step` carry these fields.

        ``total``: the samples of this step over every worker, if known (it saves the server
        work; see :meth:`worker.channel.Channel.begin`).
        """
        step = self.step if step is None else step
        self._channel(Op.PUSH).begin(step, samples, loss, total=total)

    def allow_sparse_pulls(self) -> None:
        """Promise that the parameters given to :meth:`end_step` hold θ of :attr:`step` now and are
        never written between two steps: θ may then come back as just the entries a step changed,
        exactly (plain SGD on a sparse gradient, e.g. with ``compress``)."""
        self._channel(Op.PUSH).allow_sparse_pulls(self.step)

    def push_bucket(self, index: int, grads: Mapping[str, torch.Tensor | None]) -> None:
        """Push bucket ``index`` (the names given to ``init``) now; may run in a backward hook."""
        self._channel(Op.PUSH).push_bucket(index, grads)

    def end_step(self, params: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Wait for the step's pushes and θ after it; with ``params``, load θ into them.

        Returns θ as tensors, or nothing when ``params`` were given (they now hold θ). After a
        rewind ([Note: rewinding] in ``worker.client``), θ is at the server's older version,
        :attr:`step`.
        """
        ch = self._channel(Op.PUSH_PULL)
        step = ch.step
        try:
            self._guard(Op.PUSH_PULL, ch.flush)
            self._fault("after-push", step)
            pieces = self._guard(Op.PUSH_PULL, lambda: ch.finish(want_theta=True, params=params))
        except Rejoined as r:
            self.last_version = None
            if params is not None:
                self._channel(Op.PULL).load_whole(r.theta, params)
                return {}
            return r.theta
        self.step = step + 1
        self.last_loss = ch.last_loss
        self.last_version = ch.last_version
        if params is not None:
            return {}
        theta = ch.whole(pieces)
        if len(theta) < len(self.keys):
            theta = {**ch.theta_from_shm(), **theta}
        return theta

    @property
    def buckets(self) -> list[list[str]]:
        """The buckets in use after ``init`` (one of everything when the server takes
        whole steps only, as under async/ssp)."""
        return self._channel(Op.PING).buckets

    def bind(self, params: Mapping[str, torch.Tensor]) -> int:
        """Turn CPU parameters into views of the server's θ where shared memory allows.

        Returns how many were bound. Bound parameters must not be written by the caller.
        """
        return self._channel(Op.INIT).bind(params)

    def load(self, params: Mapping[str, torch.Tensor]) -> None:
        """Copy the shared θ into ``params`` in place (nothing to do for bound ones)."""
        self._channel(Op.PULL).load(params)

    # ------------------------------------------------------------------ the client's
    def _channel(self, op: Op) -> Channel:
        """The client's channel for ``op`` (:class:`worker.client.PSClient` defines it)."""
        raise NotImplementedError

    def _guard(self, op: Op, fn: Callable[[], T]) -> T:
        """Run ``fn``, rejoining when a server forgot this worker (:class:`worker.client.PSClient`)."""
        raise NotImplementedError

    def _fault(self, point: str, step: int) -> None:
        """Fire an armed test fault (:class:`worker.client.PSClient` defines it)."""
        raise NotImplementedError
