"""θ on the server: named parameters, their versions, and the optimizer that updates them.

[Note: copy on write] Pull replies hand θ's own memory to ZeroMQ (zero copy). Before the
optimizer writes θ in place, any parameter whose last send ZeroMQ has not yet released gets
fresh storage (``p.data = p.data.clone()``): the send keeps the old bytes, the optimizer
writes the new ones, and no reader ever sees a half-updated tensor. On loopback the send
is almost always done by then, so the clone is rare; the server never blocks on it.

[Note: buffers in θ] θ holds the model's persistent buffers (BatchNorm's running statistics,
``num_batches_tracked``) beside its parameters, so checkpoints and ``final.safetensors`` are
the whole ``state_dict()``. Buffers are not the optimizer's: a step sets them to the values
the reduction chose (``ps.aggregate``, [Note: buffer values]) instead of applying a gradient.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Mapping

import torch
import zmq

from common.compression.codecs import index_dtype
from common.config import ServerConfig
from common.dtypes import dtype_name
from ps.optim import OptimizerFactory, build_optimizer

log = logging.getLogger(__name__)

Spec = tuple[str, tuple[int, ...]]


class ParameterStore:
    """θ by state_dict name, a version (applied steps) per key, and a torch.optim optimizer."""

    def __init__(self, cfg: ServerConfig, optimizer: OptimizerFactory = build_optimizer) -> None:
        self.cfg = cfg
        self.make_optimizer = optimizer  # the training rule's (StepEngine.build_optimizer)
        self.params: dict[str, torch.nn.Parameter] = {}
        self.versions: dict[str, int] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.buffers: frozenset[str] = frozenset()  # θ keys that are buffers ([Note: buffers in θ])
        self.aliases: dict[str, str] = {}  # other state_dict names of θ's tensors (tied weights)
        self._inflight: dict[str, list[zmq.MessageTracker]] = {}
        self.cow_clones = 0
        # [Note: sparse pulls] key -> (version, flat indices of the entries the step to it changed)
        self.support: dict[str, tuple[int, torch.Tensor]] = {}
        # a compressed push arrived: only then can an averaged gradient be sparse, and only then is
        # looking for its nonzero entries (a pass over every gradient) worth a step's time
        self.compressed_pushes = False
        self.shared = False  # θ lives in a shared-memory segment (see ps.fastpath)
        # called with the keys an update is about to write in place (θ and their optimizer
        # slots), before it does: a checkpoint being written keeps its copy (ps.snapshot)
        self.before_update: Callable[[Iterable[str]], None] | None = None

    @property
    def initialized(self) -> bool:
        """True once θ holds values (from rank 0's init or a checkpoint)."""
        return self.optimizer is not None

    def specs(self) -> dict[str, Spec]:
        """``{name: (dtype, shape)}`` of θ."""
        return {k: (dtype_name(p.dtype), tuple(p.shape)) for k, p in self.params.items()}

    def initialize(self, tensors: Mapping[str, torch.Tensor], versions: Mapping[str, int] | None = None,
                   optimizer_state: dict[str, Any] | None = None, owned: bool = False,
                   buffers: Iterable[str] = ()) -> None:
        """Set θ and build the optimizer over its parameters (not ``buffers``).

        θ is copied out of ``tensors`` (views of received frames), unless ``owned``: tensors
        nobody else holds (read from a checkpoint) become θ as they are, with no second copy.
        """
        self.params = {k: torch.nn.Parameter(t.detach() if owned else t.detach().clone(), requires_grad=False)
                       for k, t in tensors.items()}
        self.buffers = frozenset(buffers) & frozenset(self.params)
        self.versions = {k: int((versions or {}).get(k, 0)) for k in self.params}
        self.optimizer = self.make_optimizer([p for k, p in self.params.items() if k not in self.buffers], self.cfg)
        if optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)

    def move_to(self, alloc: Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]) -> None:
        """Re-home θ into storage from ``alloc`` (filled with θ), e.g. a shared-memory segment.

        The parameters (and so the optimizer's state for them) stay the same objects. θ then
        never moves again, and frame replies send copies instead of θ's memory.
        """
        storage = alloc({k: p.detach() for k, p in self.params.items()})
        for k, p in self.params.items():
            p.data = storage[k]
        self.shared = True
        self._inflight.clear()

    def version(self, keys: Iterable[str]) -> int:
        """The oldest version among ``keys``."""
        return min((self.versions[k] for k in keys), default=0)

    def view(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """θ for ``keys``, as the live tensors (for zero-copy sends; see :meth:`track`).

        Shared θ is copied instead: it must stay where the workers map it.
        """
        if self.shared:
            return {k: self.params[k].detach().clone() for k in keys}
        return {k: self.params[k].detach() for k in keys}

    def track(self, keys: Iterable[str], tracker: zmq.MessageTracker | None) -> None:
        """Remember that a send of ``keys`` may still read θ's memory."""
        if tracker is None or self.shared:
            return
        for k in keys:
            lst = self._inflight.setdefault(k, [])
            lst[:] = [t for t in lst if not t.done]
            lst.append(tracker)

    def apply(self, grads: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor] | None = None,
              keys: Iterable[str] | None = None) -> None:
        """One step: the optimizer on the keys in ``grads``, buffers set to ``values``.

        ``keys``: every key the step covers (default: those of ``grads`` and ``values``); each
        one's version moves, whether it had a gradient or not. A parameter without a gradient
        is skipped by the optimizer, as torch.optim skips one whose ``grad`` is None. With
        ``--clip-grad-norm`` the gradients are first clipped as
        ``torch.nn.utils.clip_grad_norm_`` clips a model's (their norm over all of ``grads``).
        """
        assert self.optimizer is not None, "apply before initialize"
        values = values or {}
        written = [*grads, *values]
        if self.before_update is not None:
            self.before_update(written)
        for k in written:
            pending = [t for t in self._inflight.pop(k, ()) if not t.done]
            if pending:
                p = self.params[k]
                p.data = p.data.clone()
                self.cow_clones += 1
        if grads:
            for k, p in self.params.items():
                p.grad = grads.get(k)
            try:
                if self.cfg.clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_([self.params[k] for k in grads], self.cfg.clip_grad_norm)
                self.optimizer.step()
            finally:
                for p in self.params.values():
                    p.grad = None
        with torch.no_grad():
            for k, v in values.items():
                self.params[k].copy_(v)
        covered = written if keys is None else keys
        for k in covered:
            self.versions[k] += 1
        self._record_support(grads, values, covered)

    def _sparse_updates(self) -> bool:
        """Whether an update changes only the entries where the gradient is nonzero: plain SGD
        (no momentum, no weight decay; clipping only scales the gradient)."""
        opt = self.optimizer
        return type(opt) is torch.optim.SGD and all(
            not g["momentum"] and not g["weight_decay"] for g in opt.param_groups)  # type: ignore[union-attr]

    def _record_support(self, grads: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor],
                        covered: Iterable[str]) -> None:
        """Remember which entries this step changed, per key, where that makes a smaller reply."""
        if not self.compressed_pushes or not self._sparse_updates():
            self.support.clear()
            return
        for k in covered:
            p = self.params[k]
            if k in values:
                self.support.pop(k, None)
                continue
            g = grads.get(k)
            if g is None:  # skipped by the optimizer: nothing changed
                self.support[k] = (self.versions[k], torch.empty(0, dtype=torch.int32))
                continue
            nnz = int(torch.count_nonzero(g))
            idx_dtype = index_dtype(p.numel())
            if nnz * (p.element_size() + idx_dtype.itemsize) >= p.numel() * p.element_size():
                self.support.pop(k, None)
                continue
            self.support[k] = (self.versions[k], torch.nonzero(g.reshape(-1)).reshape(-1).to(idx_dtype))

    def sparse_view(self, keys: Iterable[str],
                    have: int) -> tuple[tuple[str, ...], dict[str, dict[str, torch.Tensor]]]:
        """Split ``keys`` for a worker that holds θ at version ``have``: those to send whole, and the
        keys whose step from ``have`` changed few entries, each as top-k parts (``indices``, and
        ``values`` copied from θ) ([Note: sparse pulls])."""
        dense: list[str] = []
        sparse: dict[str, dict[str, torch.Tensor]] = {}
        for k in keys:
            rec = self.support.get(k)
            v = self.versions[k]
            if rec is None or rec[0] != v or v != have + 1:
                dense.append(k)
                continue
            idx = rec[1]
            sparse[k] = {"indices": idx, "values": self.params[k].detach().reshape(-1)[idx.long()].clone()}
        return tuple(dense), sparse
