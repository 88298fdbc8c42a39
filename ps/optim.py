"""The server's real torch.optim optimizer, built from the configuration.

Under the gradient rules (bsp, async, ssp) it is ``--optimizer`` (:mod:`common.optimizers`,
shared with the workers). Under the local-steps rules the workers run ``--optimizer`` for their
inner steps and the server runs the outer optimizer (:mod:`ps.outer`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from common.config import ServerConfig
from common.names import SyncModel
from common.optimizers import make_optimizer
from ps.outer import DelayedNesterov, nesterov


def build_optimizer(params: Sequence[torch.Tensor], cfg: ServerConfig) -> torch.optim.Optimizer:
    """``--optimizer`` over ``params``, or the outer optimizer of ``--sync diloco``/``diloco-async``."""
    if cfg.sync == SyncModel.DILOCO:
        return nesterov(params, cfg.outer_lr, cfg.outer_momentum)
    if cfg.sync == SyncModel.DILOCO_ASYNC:
        assert cfg.workers is not None
        return DelayedNesterov(params, cfg.outer_lr, cfg.outer_momentum, period=cfg.workers)
    return make_optimizer(cfg.optimizer, params, cfg.lr, cfg.momentum, cfg.weight_decay)
