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

from typing import Any

from ps.engine import register
from ps.engine.bsp import BSP
from ps.engine.onarrival import Async


def _inner(engine: BSP | Async) -> dict[str, Any]:
    cfg = engine.cfg
    return {"inner": {"steps": cfg.inner_steps, "optimizer": cfg.optimizer, "lr": cfg.lr,
                      "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
                      "checkpoint_every": cfg.checkpoint_every}}


@register("diloco")
class DiLoCo(BSP):
    """Rounds of H local steps, averaged and applied by Nesterov SGD (see the module doc)."""

    buckets = shared_memory = False

    def register_fields(self) -> dict[str, Any]:
        return _inner(self)


@register("diloco-async")
class DiLoCoAsync(Async):
    """Each worker's round applied on arrival, delayed Nesterov (see the module doc)."""

    def register_fields(self) -> dict[str, Any]:
        return _inner(self)
