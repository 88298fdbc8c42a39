"""DiLoCo's math, replayed in one process, independent of the worker's and the server's code.

Round r: every worker k starts from θ_global, takes the job's inner steps [r·H, (r+1)·H) on its
own rows with its own inner optimizer (whose state it keeps from round to round), and its change
is Δ_k = θ_global − θ_k (None for a parameter that got no gradient in the whole round). The
server sets grad = Σ_k Δ_k / K over the workers that have one (None if none) and takes one step
of SGD with Nesterov momentum; buffers become the lowest rank's. ``asynchronous``: the changes
of a round are applied one by one in rank order (not pre-scaled), each with lr/K, the momentum moving once per K
arrivals (delayed Nesterov, written out here by hand).
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
from torch import nn

from tests.reference import set_buffers, setup, steps_per_epoch, worker_rows


def _inner(params, name: str, lr: float, momentum: float | None, wd: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    m = momentum if momentum is not None else (0.9 if name == "momentum" else 0.0)
    return torch.optim.SGD(params, lr=lr, momentum=m, weight_decay=wd)


def replay_diloco(model_factory: Callable[[], nn.Module], data_factory: Callable[[], object], world: int,
                  inner_steps: int, batch: int = 100, epochs: int = 10, seed: int = 0, shuffle: bool = True,
                  loss: str = "mse", optimizer: str = "adamw", lr: float = 0.01, momentum: float | None = None,
                  weight_decay: float = 0.0, outer_lr: float = 0.7, outer_momentum: float = 0.9,
                  asynchronous: bool = False, delay: int = 0) -> dict[str, torch.Tensor]:
    """Final state_dict of a ``--sync diloco`` (or ``diloco-async`` with equal-speed, rank-ordered
    arrivals) job, computed in one process.

    ``delay=1`` (``--outer-delay 1``): worker k starts round r + 1 from θ_global^r − Δ_k^r (its
    parameters with no change in round r from θ_global^r), its buffers carrying on from its own
    round; round 0 starts from θ_0. The outer steps are those of ``delay=0``.
    """
    model, x_all, y_all, loss_fn, _ = setup(model_factory, data_factory, seed, loss, "sgd", 0.0, None, 0.0)
    workers = [copy.deepcopy(model) for _ in range(world)]
    inner = [_inner([p for p in w.parameters() if p.requires_grad], optimizer, lr, momentum, weight_decay)
             for w in workers]
    n = len(x_all)
    spe = steps_per_epoch(n, world, batch)
    total = spe * epochs
    params = dict(model.named_parameters())
    outer = torch.optim.SGD(params.values(), lr=outer_lr, momentum=outer_momentum, nesterov=outer_momentum > 0)
    acc = {k: torch.zeros_like(p) for k, p in params.items()}
    mom = {k: torch.zeros_like(p) for k, p in params.items()}
    count = {k: 0 for k in params}
    starts: list[dict[str, torch.Tensor] | None] = [None] * world  # delay=1: where round r starts
    for r in range(math.ceil(total / inner_steps)):
        deltas: list[dict[str, torch.Tensor | None]] = []
        after: dict[str, torch.Tensor] | None = None
        base = {name: p.detach().clone() for name, p in params.items()}  # θ_global^r
        for k, (wm, opt) in enumerate(zip(workers, inner)):
            if starts[k] is None:
                wm.load_state_dict(model.state_dict())
            else:
                with torch.no_grad():
                    for name, p in wm.named_parameters():
                        p.copy_(starts[k][name])  # type: ignore[index]
            begin = {name: p.detach().clone() for name, p in wm.named_parameters()}
            got: set[str] = set()
            for s in range(r * inner_steps, min((r + 1) * inner_steps, total)):
                epoch, t = divmod(s, spe)
                rows = worker_rows(n, world, batch, epoch, t, k, shuffle, seed)
                if len(rows) == 0:
                    continue
                opt.zero_grad(set_to_none=True)
                loss_fn(wm(x_all[rows]), y_all[rows]).backward()
                got |= {name for name, p in wm.named_parameters() if p.grad is not None}
                opt.step()
            wp = dict(wm.named_parameters())
            deltas.append({name: (begin[name] - wp[name].detach()) if name in got else None for name in params})
            if delay:
                starts[k] = {name: base[name] - d if (d := deltas[-1][name]) is not None else base[name].clone()
                             for name in params}
            if k == 0:
                after = {name: b.detach().clone() for name, b in wm.named_buffers()}
        if not asynchronous:
            for name, p in params.items():
                parts = [d[name] * (1.0 / world) for d in deltas if d[name] is not None]
                p.grad = None if not parts else sum(parts[1:], parts[0])
            outer.step()
        else:
            with torch.no_grad():
                for d in deltas:  # rank order
                    for name, p in params.items():
                        g = d[name]
                        if g is None:
                            continue
                        lr_k = outer_lr / world
                        acc[name] += g
                        count[name] += 1
                        p.add_(g, alpha=-lr_k)
                        if count[name] % world == 0:
                            mom[name].mul_(outer_momentum).add_(acc[name], alpha=1.0 / world)
                            p.add_(mom[name], alpha=-lr_k * world * outer_momentum)
                            acc[name].zero_()
        if after is not None:
            set_buffers(model, after)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
