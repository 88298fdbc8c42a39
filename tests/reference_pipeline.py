"""The pipeline job's math, replayed as plain single-process SGD on the same global batches.

A pipeline job with R replicas takes, at each step, the rows replica r would take as
data-parallel worker r of R (``tests.reference.worker_rows``); the global batch is all of
them. The reference runs the *whole* model on that whole batch at once - no stages, no
microbatches, no per-replica averaging - and applies the optimizer to the gradient of the
mean loss. Microbatch loss scaling and the server's row-weighted average must reproduce it.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tests.reference import make_optimizer, steps_per_epoch, worker_rows


def replay_pipeline(model_factory: Callable[[], nn.Module], data_factory: Callable[[], object], replicas: int = 1,
                    batch: int = 100, epochs: int = 10, seed: int = 0, shuffle: bool = True, loss: str = "mse",
                    optimizer: str = "sgd", lr: float = 0.01, momentum: float | None = None,
                    weight_decay: float = 0.0) -> dict[str, torch.Tensor]:
    """Final θ (by state_dict name) of a pipeline job with ``replicas`` replicas."""
    torch.manual_seed(seed)
    model = model_factory()
    torch.manual_seed(seed)
    data = data_factory()
    x_all, y_all = data.tensors  # type: ignore[attr-defined]
    loss_fn = F.mse_loss if loss == "mse" else F.cross_entropy
    opt = make_optimizer(model.parameters(), optimizer, lr, momentum, weight_decay)
    n = len(x_all)
    for epoch in range(epochs):
        for t in range(steps_per_epoch(n, replicas, batch)):
            rows = torch.cat([worker_rows(n, replicas, batch, epoch, t, r, shuffle, seed) for r in range(replicas)])
            opt.zero_grad()
            if len(rows):
                loss_fn(model(x_all[rows]), y_all[rows]).backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}
