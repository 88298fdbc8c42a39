"""The documented math, replayed in one process, independent of the worker's code.

    g_k = mean loss gradient over worker k's rows;  g = Σ n_k g_k / Σ n_k  (= 1/K Σ g_k when
    every n_k is equal);  θ ← optimizer(θ, g)

with torch's and DDP's rules for real models: a parameter without a gradient on worker k adds
nothing to the sum (its n_k still counts), and one without a gradient on every worker gets
``grad = None``, so the optimizer skips it; every worker's forward starts from the buffers of
the step's start, and the buffers after the step are the lowest rank's (DDP broadcasts rank
0's); ``clip`` clips the averaged gradient as ``clip_grad_norm_`` after DDP's allreduce.

Shards, batch split and shuffling follow DESIGN.md and the table in ``worker/data.py``'s
docstring; they are re-derived here so that a bug there cannot hide in both places.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def make_optimizer(params, optimizer: str = "sgd", lr: float = 0.01, momentum: float | None = None,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The same optimizer the server builds for these options."""
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    m = momentum if momentum is not None else (0.9 if optimizer == "momentum" else 0.0)
    return torch.optim.SGD(params, lr=lr, momentum=m, weight_decay=weight_decay)


def setup(model_factory: Callable[[], nn.Module], data_factory: Callable[[], object], seed: int, loss: str,
          optimizer: str, lr: float, momentum: float | None, weight_decay: float):
    """Model, x, y, loss function and optimizer of a replay, seeded exactly as the workers seed."""
    torch.manual_seed(seed)
    model = model_factory()
    torch.manual_seed(seed)
    data = data_factory()
    x_all, y_all = data.tensors  # type: ignore[attr-defined]
    loss_fn = F.mse_loss if loss == "mse" else F.cross_entropy
    return model, x_all, y_all, loss_fn, make_optimizer(model.parameters(), optimizer, lr, momentum, weight_decay)


def worker_rows(n: int, world: int, batch: int, epoch: int, t: int, k: int, shuffle: bool, seed: int) -> torch.Tensor:
    """Rows of worker k at step t of ``epoch``."""
    lo, hi = k * n // world, (k + 1) * n // world
    b = batch // world + (1 if k < batch % world else 0)
    start, stop = min(t * b, hi - lo), min((t + 1) * b, hi - lo)
    if shuffle:
        gen = torch.Generator().manual_seed((seed * 1_000_003 + epoch * 8_191 + k) % (2**63))
        return lo + torch.randperm(hi - lo, generator=gen)[start:stop]
    return torch.arange(lo + start, lo + stop)


def steps_per_epoch(n: int, world: int, batch: int) -> int:
    """S = max_k ⌈|D_k| / b_k⌉."""
    return max(math.ceil(((k + 1) * n // world - k * n // world) / (batch // world + (k < batch % world)))
               for k in range(world))


def replay(model_factory: Callable[[], nn.Module], data_factory: Callable[[], object], world: int,
           batch: int = 100, epochs: int = 10, seed: int = 0, shuffle: bool = True, loss: str = "mse",
           optimizer: str = "sgd", lr: float = 0.01, momentum: float | None = None,
           weight_decay: float = 0.0,
           ranks: Callable[[int], Sequence[int]] | None = None,
           steps: int | None = None, clip: float | None = None) -> dict[str, torch.Tensor]:
    """Final state_dict of the data-parallel job, computed in one process.

    ``ranks(step)`` (default: all of them) names the workers whose gradients step ``step``
    (counted over all epochs) averages, as after ``--on-worker-loss shrink``. ``steps``: θ
    after that many steps instead (counted over all epochs). ``clip``: ``--clip-grad-norm``.
    """
    model, x_all, y_all, loss_fn, opt = setup(model_factory, data_factory, seed, loss, optimizer, lr, momentum,
                                              weight_decay)
    n = len(x_all)
    done = 0
    for epoch in range(epochs):
        for t in range(steps_per_epoch(n, world, batch)):
            if steps is not None and done == steps:
                break
            done += 1
            start = {k: b.clone() for k, b in model.named_buffers()}
            after: dict[str, torch.Tensor] | None = None
            grads, weights = [], []
            for i, k in enumerate(range(world) if ranks is None else ranks(epoch * steps_per_epoch(n, world, batch) + t)):
                rows = worker_rows(n, world, batch, epoch, t, k, shuffle, seed)
                if len(rows) == 0:
                    continue
                set_buffers(model, start)
                model.zero_grad(set_to_none=True)
                loss_fn(model(x_all[rows]), y_all[rows]).backward()
                grads.append({name: None if p.grad is None else p.grad.clone()
                              for name, p in model.named_parameters()})
                weights.append(float(len(rows)))
                if i == 0:  # the lowest rank's buffers
                    after = {k: b.clone() for k, b in model.named_buffers()}
            for name, p in model.named_parameters():
                total = None  # Σ w_k g_k over the workers with a gradient (sparse ones stay sparse)
                for w, g in zip(weights, grads):
                    if g[name] is not None:
                        total = w * g[name] if total is None else total + w * g[name]
                p.grad = None if total is None else total / sum(weights)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            set_buffers(model, after if after is not None else start)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def set_buffers(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Copy ``values`` into the model's buffers (by name)."""
    with torch.no_grad():
        for k, b in model.named_buffers():
            b.copy_(values[k])
