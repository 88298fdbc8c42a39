"""The benchmark jobs of issue 7 as ``MODULE:FACTORY`` callables.

* ``mlp19m``: 1024 → 2048 ×5 → 10 (18.9M parameters), the CPU job.
* ``mlp88m``: 1024 → 4096 ×6 → 10 (88.1M parameters), the GPU job.
* ``data19m`` / ``data88m``: random classification rows (10 classes), enough for
  ``ZMQPS_BENCH_ROWS`` rows (default 64 × 40: 40 steps of a global batch of 64).
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.utils.data import TensorDataset


def mlp(width: int, hidden: int, d_in: int = 1024, d_out: int = 10) -> nn.Sequential:
    """``d_in → width × hidden → d_out`` with ReLU between layers."""
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(hidden - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, d_out))
    return nn.Sequential(*layers)


def mlp19m() -> nn.Sequential:
    """The 18.9M-parameter CPU job."""
    return mlp(2048, 5)


def mlp88m() -> nn.Sequential:
    """The 88.1M-parameter GPU job."""
    return mlp(4096, 6)


def _rows() -> int:
    return int(os.environ.get("ZMQPS_BENCH_ROWS", str(64 * 40)))


def data19m() -> TensorDataset:
    """Random rows of 1024 features with one of 10 classes."""
    n = _rows()
    return TensorDataset(torch.randn(n, 1024), torch.randint(0, 10, (n,)))


data88m = data19m


def n_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())
