"""The server's real torch.optim optimizer, built from the configuration."""

from __future__ import annotations

from typing import Sequence

import torch

from common.config import ServerConfig


def build_optimizer(params: Sequence[torch.Tensor], cfg: ServerConfig) -> torch.optim.Optimizer:
    """``sgd`` (momentum 0 unless given), ``momentum`` (SGD, default 0.9) or ``adam``."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    momentum = cfg.momentum if cfg.momentum is not None else (0.9 if cfg.optimizer == "momentum" else 0.0)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=momentum, weight_decay=cfg.weight_decay)
