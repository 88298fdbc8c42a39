"""The server's real torch.optim optimizer, built from the configuration.

:func:`build_optimizer` is ``--optimizer`` (:mod:`common.optimizers`, shared with the workers):
what a training rule applies unless it says otherwise (:meth:`ps.engine.base.StepEngine.build_optimizer`;
the local-steps rules apply an outer optimizer, :mod:`ps.outer`, and run ``--optimizer`` on the
workers).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from common.config import ServerConfig
from common.optimizers import make_optimizer

OptimizerFactory = Callable[[Sequence[torch.Tensor], ServerConfig], torch.optim.Optimizer]


def build_optimizer(params: Sequence[torch.Tensor], cfg: ServerConfig) -> torch.optim.Optimizer:
    """``--optimizer`` over ``params``."""
    return make_optimizer(cfg.optimizer, params, cfg.lr, cfg.momentum, cfg.weight_decay)
