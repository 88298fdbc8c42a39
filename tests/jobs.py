"""Model and data factories used by the tests (importable as ``tests.jobs:NAME``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


def linear64() -> nn.Module:
    """The seed's nn.Linear(10, 1) in float64."""
    return nn.Linear(10, 1).double()


def data64() -> TensorDataset:
    """The seed's 1000 random samples, in float64."""
    return TensorDataset(torch.randn(1000, 10, dtype=torch.float64), torch.randn(1000, 1, dtype=torch.float64))


def mlp64() -> nn.Module:
    """A small float64 MLP with a classification head."""
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def class_data64() -> TensorDataset:
    """600 float64 samples with 3 classes."""
    x = torch.randn(600, 10, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


def wide64() -> nn.Module:
    """A float64 linear layer of 64 x 256 weights (131 KB): its θ dwarfs a reply's header."""
    return nn.Linear(256, 64).double()


def wide_data64() -> TensorDataset:
    """512 float64 samples of 256 features, 64 targets."""
    return TensorDataset(torch.randn(512, 256, dtype=torch.float64), torch.randn(512, 64, dtype=torch.float64))
