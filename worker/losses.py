"""The losses a worker can compute (``--loss``), one per name of :class:`common.names.Loss`.

The data-parallel runtime and the last pipeline stage look the configured name up in
:data:`LOSSES`; every entry takes ``(output, target)`` and returns the batch's mean loss, as
the ``torch.nn.functional`` losses do by default. The registry is checked against the
declared names at import.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from common.names import Loss, implementations

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LOSSES: dict[str, LossFn] = implementations(Loss, {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}, __name__)
