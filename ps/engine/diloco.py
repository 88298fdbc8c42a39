"""``--sync diloco`` and ``--sync diloco-async``: workers take H local steps between exchanges.

Each worker runs ``--inner-steps`` H steps of ``--optimizer`` on its own shard (told to it at
REGISTER, [Note: local steps] in ``common.protocol``), then pushes its change
Δ_k = θ_global − θ_local as the step's "gradient". The server's optimizer is the outer one
(:mod:`ps.outer`), so one server step is one round of H local steps on every worker.

``diloco``
    bsp over rounds: the server averages the Δ_k (each pre-scaled by 1/K by its worker, reduced
    in rank order) and applies Nesterov SGD (``--outer-lr``, ``--outer-momentum``); every
    worker continues from the same new θ_global. Equal to a single-process replay of the same
    math (``tests/test_diloco.py``).
``diloco-async``
    on arrival, as ``async``: each Δ_k is applied as it comes with lr/K, and the momentum moves
    once per K arrivals ([Note: delayed Nesterov] in ``ps.outer``); a straggler holds nobody up,
    and its Δ, made from an older θ, is applied as it is.

θ lives in each worker's parameters during the inner steps, so neither rule lends θ's memory
(no shared memory), and a round is one push (no buckets).
"""

from __future__ import annotations

import secrets
from typing import Any, Mapping, Sequence

import torch

from common.config import ServerConfig

from ps.engine import register
from ps.engine.base import Services, StepEngine
from ps.engine.bsp import BSP
from ps.engine.onarrival import Async
from ps.outer import DelayedNesterov, nesterov


class LocalStepsRule(StepEngine):
    """What both local-steps rules tell a worker at REGISTER, and the job's id.

    The id is made when θ starts fresh and kept in every checkpoint, so it names one job across
    server restarts: a worker's round files carry it, and a file of another job (a reused
    ``--state-dir``) is never taken for this one's ([Note: round files] in ``worker.roundstate``).
    """

    def __init__(self, services: Services) -> None:
        super().__init__(services)
        self.job = secrets.token_hex(8)

    def register_fields(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"inner": {"steps": cfg.inner_steps, "optimizer": cfg.optimizer, "lr": cfg.lr,
                          "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
                          "checkpoint_every": cfg.checkpoint_every, "job": self.job, "delay": cfg.outer_delay}}

    def state(self) -> dict[str, Any]:
        return {**super().state(), "job": self.job}

    def load_state(self, state: Mapping[str, Any] | None) -> None:
        super().load_state(state)
        if state and state.get("job"):
            self.job = str(state["job"])


@register("diloco")
class DiLoCo(LocalStepsRule, BSP):
    """Rounds of H local steps, averaged and applied by Nesterov SGD (see the module doc)."""

    buckets = shared_memory = False

    @classmethod
    def build_optimizer(cls, params: Sequence[torch.Tensor], cfg: ServerConfig) -> torch.optim.Optimizer:
        return nesterov(params, cfg.outer_lr, cfg.outer_momentum)


@register("diloco-async")
class DiLoCoAsync(LocalStepsRule, Async):
    """Each worker's round applied on arrival, delayed Nesterov (see the module doc)."""

    @classmethod
    def build_optimizer(cls, params: Sequence[torch.Tensor], cfg: ServerConfig) -> torch.optim.Optimizer:
        assert cfg.workers is not None
        return DelayedNesterov(params, cfg.outer_lr, cfg.outer_momentum, period=cfg.workers)
