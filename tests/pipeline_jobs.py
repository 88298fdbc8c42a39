"""Pipeline models and data for the tests (importable as ``tests.pipeline_jobs:NAME``).

The fault models inject their fault as an object (a layer that fails on its n-th call), not
by timing: :class:`KillAt` kills its own process, :class:`NarrowAt` returns a wrong shape.
"""

from __future__ import annotations

import os
import signal

import torch
from torch import nn
from torch.utils.data import TensorDataset


def seed_pipe64() -> nn.Sequential:
    """The seed's model-parallel example, Linear(10, 5) then Linear(5, 1), in float64."""
    return nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 1)).double()


def data246() -> TensorDataset:
    """246 float64 samples: batches of 60 leave a short last batch, so shapes change."""
    return TensorDataset(torch.randn(246, 10, dtype=torch.float64), torch.randn(246, 1, dtype=torch.float64))


class Split(nn.Module):
    """Splits features into a tuple of two tensors of different widths (two tensors cross a boundary)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return h[:, :self.at], h[:, self.at:] * 2.0


class Mix(nn.Module):
    """Takes the tuple from :class:`Split` and mixes both parts with their own weights."""

    def __init__(self, a: int, b: int, out: int) -> None:
        super().__init__()
        self.fa = nn.Linear(a, out)
        self.fb = nn.Linear(b, out, bias=False)

    def forward(self, parts: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a, b = parts
        return self.fa(a) * torch.sigmoid(self.fb(b))


def tuple_pipe64() -> nn.Sequential:
    """Six layers for three stages (``0:3,3:5,5:6``): a tuple of two tensors crosses 0 → 1."""
    return nn.Sequential(nn.Linear(10, 8), nn.Tanh(), Split(5), Mix(5, 3, 4), nn.Tanh(), nn.Linear(4, 1)).double()


class KillAt(nn.Module):
    """Identity that SIGKILLs its own process on its ``n``-th forward (a stage dying mid-batch)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.n:
            os.kill(os.getpid(), signal.SIGKILL)
        return x


class NarrowAt(nn.Module):
    """Identity that drops the last feature on its ``n``-th forward (a wrong shape sent on)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x[:, :-1] if self.calls == self.n else x


def kill_pipe64() -> nn.Sequential:
    """Stage 1 (``0:1,1:3``) dies on its third forward: microbatch 2 of step 0 with M = 4."""
    return nn.Sequential(nn.Linear(10, 5), KillAt(3), nn.Linear(5, 1)).double()


def narrow_pipe64() -> nn.Sequential:
    """Stage 0 (``0:2,2:3``) sends a [rows, 4] activation instead of [rows, 5] for microbatch 2."""
    return nn.Sequential(nn.Linear(10, 5), NarrowAt(3), nn.Linear(5, 1)).double()
