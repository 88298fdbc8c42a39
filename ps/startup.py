"""INIT, and the start of training: θ from the workers' offers, its first checkpoint, the key groups.

Every worker builds its model and offers its tensors at INIT; θ takes each key from the lowest
rank that offered it (``ps.offers``), once all K workers registered. θ_0 is checkpointed at
once, before any worker sees it, so a restarted server never needs the offers again. Then the
engine forms its key groups and, where a worker asked for the fast path, θ moves into shared
memory. A worker rejoining a running job offers nothing and gets θ as it is.
"""

from __future__ import annotations

import logging
from typing import Callable

from common.config import ServerConfig
from common.errors import ErrorCode
from common.protocol import Op
from common.wire import Message
from ps.checkpointer import Checkpointer
from ps.engine.base import StepEngine
from ps.fastpath import FastPath
from ps.membership import Membership
from ps.offers import Offers
from ps.parking import Waiter
from ps.store import ParameterStore
from ps.tensorcheck import check_tensors

log = logging.getLogger(__name__)


class Startup:
    """Handles INIT and starts training once it can (see the module doc).

    Args:
        fail: ends the job (``ps.jobend.JobEnd.fail``): a first checkpoint that cannot be written.
    """

    def __init__(self, cfg: ServerConfig, members: Membership, store: ParameterStore, engine: StepEngine,
                 checkpoints: Checkpointer, fast: FastPath, fail: Callable[[str, ErrorCode], None]) -> None:
        self.cfg = cfg
        self.members = members
        self.store = store
        self.engine = engine
        self.checkpoints = checkpoints
        self.fast = fast
        self.fail = fail
        self.offers = Offers()  # θ's first values, the lowest rank's per key
        self.trim_due = False  # freed memory to return to the OS after the current message

    def on_init(self, ident: bytes, msg: Message) -> None:
        """INIT: an offer of θ (or none, when rejoining), answered with θ once training can start."""
        w = self.members.worker(msg)
        if msg.tensors or not self.store.initialized:  # a worker rejoining a running job offers nothing
            of_theta = self.store.initialized
            specs = self.store.specs() if of_theta else self.members.registered_specs
            buffers = self.store.buffers if of_theta else self.members.buffer_keys
            check_tensors(msg.tensors, w.keys, "init", specs, buffers, of_theta)
        if not self.store.initialized:
            self.offers.add(w.rank, msg.tensors)
        self.members.parking.park(Waiter(ident, msg.id, Op.INIT, w.rank, w.keys, step=self.engine.join_step(w.rank),
                                         shm=bool(msg.fields.get("shm"))))
        self.try_start()
        self.engine.wake()

    def try_start(self) -> None:
        """Once all K workers registered: take θ from the lowest rank per key, form the groups."""
        workers = self.members.workers
        if len(workers) < self.cfg.workers:
            return
        if not self.store.initialized:
            owner: dict[str, int] = {}
            for rank in sorted(workers, reverse=True):
                for k in workers[rank].keys:
                    owner[k] = rank
            if not self.offers.complete(owner):
                return
            ranks = self.offers.ranks()
            self.store.initialize(self.offers.take(list(owner)), buffers=self.members.buffer_keys)
            log.info("θ initialized from rank(s) %s: %d tensors, %d elements", ranks,
                     len(owner), sum(p.numel() for p in self.store.params.values()))
            self.checkpoints.save(0)  # θ_0 survives a crash: a restarted server never needs the offers again
            if self.checkpoints.saved_step < 0:  # no restart point at all: fail now, not hours later
                self.fail(f"cannot write the first checkpoint (θ of step 0) in {self.cfg.checkpoint_dir}; "
                          f"see the error above", ErrorCode.WRITE_FAILED)
                return
        if not self.engine.started:
            self.engine.form()
            assert self.engine.groups is not None
            if self.fast.wanted and not self.store.shared:
                try:
                    self.store.move_to(self.fast.alloc_theta)
                except OSError as e:  # /dev/shm too small for θ: θ stays private, replies go as frames
                    log.warning("θ stays out of shared memory (%s): pulls go as frames", e)
            unused = set(self.store.params) - {k for g in self.engine.groups for k in g.keys}
            if unused:
                log.warning("θ keys no worker registered (never updated): %s", sorted(unused)[:5])
            # the offers of θ and θ's private copy (if it moved) are freed once: give them back to
            # the OS once the message being handled (the last offer) is released too
            self.trim_due = True
