"""The outer optimizers of the local-steps rules (``--sync diloco`` and ``diloco-async``).

Under diloco the server's "gradient" is the workers' mean change Δ = θ_global − θ_local after
their inner steps (a pseudo-gradient), and the server's optimizer is SGD with Nesterov momentum
(``--outer-lr``, ``--outer-momentum``), as in DiLoCo (Douillard et al., 2023).

[Note: delayed Nesterov] ``diloco-async`` applies each worker's Δ_k on arrival, with the
learning rate scaled by 1/K as every on-arrival rule does ([Note: 1/K as a learning-rate scale]),
so the step the optimizer sees has lr' = lr/K. Momentum moved at every arrival would count each
round's change K times; instead (the delayed Nesterov of Liu et al., 2024) the momentum buffer
moves once per K arrivals, with the mean of the K changes it saw:

    arrival i, change g:  acc ← acc + g
      i mod K ≠ 0:        θ ← θ − lr'·g
      i mod K = 0:        m ← μ·m + acc/K;  θ ← θ − lr'·g − lr'·K·μ·m;  acc ← 0

Over K arrivals of changes made from the same θ this is exactly one synchronous Nesterov
step, θ ← θ − lr·(ḡ + μ·m) with m ← μ·m + ḡ; arrivals computed from older θ (stragglers) are
applied as they are, with no other staleness correction. The counter and buffers are
per-parameter optimizer state, so they are checkpointed with θ.
"""

from __future__ import annotations

from typing import Iterable

import torch


def nesterov(params: Iterable[torch.Tensor], lr: float, momentum: float) -> torch.optim.Optimizer:
    """DiLoCo's outer optimizer: ``torch.optim.SGD(nesterov=True)`` (plain SGD when momentum is 0)."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0)


class DelayedNesterov(torch.optim.Optimizer):
    """SGD whose Nesterov momentum moves once every ``period`` steps ([Note: delayed Nesterov]).

    Args:
        params: the parameters.
        lr: the learning rate of one step (the on-arrival rule scales it by 1/K).
        momentum: μ.
        period: K, the number of arrivals that make one round.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float, period: int) -> None:
        if period < 1:
            raise ValueError(f"period must be at least 1, not {period}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "period": period})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """One arrival: every parameter that has a ``grad`` takes it."""
        for group in self.param_groups:
            lr, mu, k = group["lr"], group["momentum"], group["period"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["count"] = torch.zeros((), dtype=torch.int64)
                    state["acc"] = torch.zeros_like(p)
                    state["momentum_buffer"] = torch.zeros_like(p)
                g = p.grad
                state["acc"].add_(g)
                state["count"] += 1
                p.add_(g, alpha=-lr)
                if int(state["count"]) % k == 0:
                    m = state["momentum_buffer"]
                    m.mul_(mu).add_(state["acc"], alpha=1.0 / k)
                    p.add_(m, alpha=-lr * k * mu)
                    state["acc"].zero_()
