"""The server's real torch.optim optimizer, built from the configuration.

:data:`OPTIMIZERS` implements every name of :class:`common.names.Optimizer` (``--optimizer``),
checked at import.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from common.config import ServerConfig
from common.names import Optimizer, implementations

OptimizerFactory = Callable[[Sequence[torch.Tensor], ServerConfig], torch.optim.Optimizer]


def _sgd(params: Sequence[torch.Tensor], cfg: ServerConfig, default_momentum: float = 0.0) -> torch.optim.Optimizer:
    momentum = cfg.momentum if cfg.momentum is not None else default_momentum
    return torch.optim.SGD(params, lr=cfg.lr, momentum=momentum, weight_decay=cfg.weight_decay)


def _momentum(params: Sequence[torch.Tensor], cfg: ServerConfig) -> torch.optim.Optimizer:
    return _sgd(params, cfg, default_momentum=0.9)


def _adam(params: Sequence[torch.Tensor], cfg: ServerConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


OPTIMIZERS: dict[str, OptimizerFactory] = implementations(
    Optimizer, {"sgd": _sgd, "momentum": _momentum, "adam": _adam}, __name__)


def build_optimizer(params: Sequence[torch.Tensor], cfg: ServerConfig) -> torch.optim.Optimizer:
    """``sgd`` (momentum 0 unless given), ``momentum`` (SGD, default 0.9) or ``adam``."""
    return OPTIMIZERS[cfg.optimizer](params, cfg)
