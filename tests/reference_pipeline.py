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
from torch import nn

from tests.reference import set_buffers, setup, steps_per_epoch, worker_rows


def replay_pipeline(model_factory: Callable[[], nn.Module], data_factory: Callable[[], object], replicas: int = 1,
                    batch: int = 100, epochs: int = 10, seed: int = 0, shuffle: bool = True, loss: str = "mse",
                    optimizer: str = "sgd", lr: float = 0.01, momentum: float | None = None,
                    weight_decay: float = 0.0, microbatches: int | None = None) -> dict[str, torch.Tensor]:
    """Final state_dict (by state_dict name) of a pipeline job with ``replicas`` replicas.

    ``microbatches``: run each replica's rows as that many microbatches, one after another,
    each loss scaled by its share of the global batch (what the stages compute: the rule for
    layers with batch statistics, [Note: BatchNorm in a pipeline]); every replica starts from
    the step's buffers and replica 0's are kept. None: the whole batch at once.
    """
    model, x_all, y_all, loss_fn, opt = setup(model_factory, data_factory, seed, loss, optimizer, lr, momentum,
                                              weight_decay)
    n = len(x_all)
    for epoch in range(epochs):
        for t in range(steps_per_epoch(n, replicas, batch)):
            per = [worker_rows(n, replicas, batch, epoch, t, r, shuffle, seed) for r in range(replicas)]
            rows = torch.cat(per)
            opt.zero_grad()
            if microbatches is None:
                if len(rows):
                    loss_fn(model(x_all[rows]), y_all[rows]).backward()
                opt.step()
                continue
            start = {k: b.clone() for k, b in model.named_buffers()}
            after = None
            for r, mine in enumerate(per):
                set_buffers(model, start)
                for part in torch.tensor_split(mine, min(microbatches, len(mine))) if len(mine) else ():
                    (loss_fn(model(x_all[part]), y_all[part]) * (len(part) / len(rows))).backward()
                if r == 0:
                    after = {k: b.clone() for k, b in model.named_buffers()}
            opt.step()
            set_buffers(model, after if after is not None else start)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}

