"""The torch.optim optimizers a job can name (``--optimizer``), built from plain hyper-parameters.

The server applies one to the averaged gradient (``ps.optim``); under ``--sync diloco`` each
worker applies it locally for its inner steps (``worker.diloco``). Both build it here, so the
same name means the same optimizer on both sides. :data:`OPTIMIZERS` implements every name of
:class:`common.names.Optimizer`, checked at import.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from common.names import Optimizer, implementations

Factory = Callable[[Iterable[torch.Tensor], float, "float | None", float], torch.optim.Optimizer]


def _sgd(params: Iterable[torch.Tensor], lr: float, momentum: float | None, wd: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum or 0.0, weight_decay=wd)


def _momentum(params: Iterable[torch.Tensor], lr: float, momentum: float | None, wd: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=0.9 if momentum is None else momentum, weight_decay=wd)


def _adam(params: Iterable[torch.Tensor], lr: float, momentum: float | None, wd: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, weight_decay=wd)


def _adamw(params: Iterable[torch.Tensor], lr: float, momentum: float | None, wd: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd)


OPTIMIZERS: dict[str, Factory] = implementations(
    Optimizer, {"sgd": _sgd, "momentum": _momentum, "adam": _adam, "adamw": _adamw}, __name__)


def make_optimizer(name: str, params: Iterable[torch.Tensor], lr: float, momentum: float | None = None,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``params``: ``sgd`` (momentum 0 unless given), ``momentum``
    (SGD, 0.9 unless given), ``adam`` or ``adamw`` (torch's default weight decay is not used:
    ``weight_decay`` is always the job's ``--weight-decay``)."""
    return OPTIMIZERS[name](params, lr, momentum, weight_decay)
