"""Factories for the consistency, wrapper and metrics tests (``tests.consistency_jobs:NAME``)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import TensorDataset


def teacher64() -> TensorDataset:
    """800 float64 rows of y = x·w* + 0.1·noise (a regression with a signal to learn)."""
    x = torch.randn(800, 10, dtype=torch.float64)
    w = torch.linspace(-1.0, 1.0, 10, dtype=torch.float64).unsqueeze(1)
    return TensorDataset(x, x @ w + 0.1 * torch.randn(800, 1, dtype=torch.float64))


def linear64() -> nn.Module:
    """nn.Linear(10, 1) in float64."""
    return nn.Linear(10, 1).double()


def full_loss(theta: dict[str, torch.Tensor], seed: int = 0) -> float:
    """MSE of ``theta`` (a linear64) on all of teacher64's rows."""
    torch.manual_seed(seed)
    x, y = teacher64().tensors
    return float(F.mse_loss(x @ theta["weight"].T + theta["bias"], y))


def initial_theta(seed: int = 0) -> dict[str, torch.Tensor]:
    """θ every worker starts from (``torch.manual_seed(seed)`` then the factory)."""
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in linear64().state_dict().items()}


def final_theta(ckpt: Path) -> dict[str, torch.Tensor]:
    """θ the server wrote at the end of a job."""
    return load_file(str(ckpt / "final.safetensors"))
