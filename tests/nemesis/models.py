"""Float64 models that widen the windows the nemesis aims at (``tests.nemesis.models:NAME``).

Both compute exactly what :func:`tests.jobs.mlp64` computes (on ``tests.jobs:class_data64``),
so :func:`tests.reference.replay` is their reference:

* :func:`slow_mlp64` - its backward pauses between the last layer and the first
  (``NEMESIS_SLOW_BACKWARD_S`` seconds, set by the runner in the workers only). Gradients are
  pushed bucket by bucket during backward, so with small buckets the pause is a window in which
  a worker has pushed some buckets of a step and not the others: a kill lands there often.
* :func:`slow_seed_pipe64`, :func:`slow_tuple_pipe64` - the pipeline test models
  (``tests.pipeline_jobs``) with the same pause after their first layer, so that a pipeline
  job trains long enough for a kill or a stop to land in it (``NEMESIS_SLOW_BACKWARD_S`` is
  set shorter for them: it is paid per microbatch).
* :func:`spare_mlp64` - has a head the loss never reaches: its parameters get no gradient, so
  the server's optimizer must leave them alone (DESIGN.md: "a parameter that got no gradient
  on any worker in a step is skipped"); with weight decay that is visible in θ.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

SLOW_ENV = "NEMESIS_SLOW_BACKWARD_S"


class _PauseInBackward(torch.autograd.Function):
    """Identity; its backward sleeps ``NEMESIS_SLOW_BACKWARD_S`` seconds (0 when unset)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        pause = float(os.environ.get(SLOW_ENV, "0") or 0)
        if pause > 0:
            time.sleep(pause)
        return grad


class PauseInBackward(nn.Module):
    """A layer that changes nothing and slows backward down (see :class:`_PauseInBackward`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _PauseInBackward.apply(x)


def slow_mlp64() -> nn.Module:
    """:func:`tests.jobs.mlp64` with a pause in backward between its two linear layers."""
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), PauseInBackward(), nn.Linear(16, 3)).double()


class SpareHead(nn.Module):
    """:func:`tests.jobs.mlp64`'s layers (same initial values) plus a head no loss ever reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(10, 16)
        self.head = nn.Linear(16, 3)
        self.spare = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def spare_mlp64() -> nn.Module:
    """:class:`SpareHead` in float64."""
    return SpareHead().double()


def slow_seed_pipe64() -> nn.Sequential:
    """``tests.pipeline_jobs.seed_pipe64`` with a pause in backward after its first layer (``0:2,2:3``)."""
    return nn.Sequential(nn.Linear(10, 5), PauseInBackward(), nn.Linear(5, 1)).double()


def slow_tuple_pipe64() -> nn.Sequential:
    """``tests.pipeline_jobs.tuple_pipe64`` with a pause in backward after its first layer
    (``0:4,4:6,6:7``)."""
    from tests.pipeline_jobs import Mix, Split

    return nn.Sequential(nn.Linear(10, 8), PauseInBackward(), nn.Tanh(), Split(5), Mix(5, 3, 4), nn.Tanh(),
                         nn.Linear(4, 1)).double()
