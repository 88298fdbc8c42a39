"""scikit-learn's bundled 8x8 digits (1,797 images, 10 classes, no download) and an MLP.

The split is fixed (its own generator, seed 1234): 1,437 training rows, the last 360 of the
permutation held out for testing. Pixels are scaled from 0..16 to 0..1. Needs scikit-learn
(``pip install 'zmqps[examples]'``; ``make setup`` installs it in a checkout).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.data import TensorDataset

from common.errors import ConfigError

TEST_ROWS = 360
SPLIT_SEED = 1234

PRESETS: dict[str, Any] = {
    "model": "worker.examples.digits:model",
    "data": "worker.examples.digits:train_data",
    "loss": "cross_entropy",
    "optimizer": "momentum",
    "lr": 0.05,
    "epochs": 20,
    "batch_size": 64,
    "eval_data": "worker.examples.digits:test_data",
}
"""Option values ``ps-launch --example digits`` runs with (anything given explicitly wins)."""

TARGET_ACCURACY = 0.95


def _split() -> tuple[TensorDataset, TensorDataset]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        from common.install import install_hint

        raise ConfigError(f"the digits example needs scikit-learn: {install_hint('examples')}") from e
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train, test = order[:-TEST_ROWS], order[-TEST_ROWS:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def model() -> nn.Module:
    """A 64-128-10 MLP with a ReLU."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def train_data() -> TensorDataset:
    """The 1,437 training rows: (x of 64 floats in [0, 1], class index)."""
    return _split()[0]


def test_data() -> TensorDataset:
    """The 360 held-out rows."""
    return _split()[1]


def accuracy(theta: Mapping[str, torch.Tensor], data: TensorDataset | None = None) -> float:
    """Fraction of ``data`` (default: the held-out rows) that θ classifies correctly."""
    net = model()
    net.load_state_dict(dict(theta))
    x, y = (data or test_data()).tensors
    with torch.no_grad():
        return float((net(x).argmax(dim=1) == y).double().mean())


def evaluate(theta: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Held-out accuracy of the final θ."""
    return {"test_accuracy": accuracy(theta)}
