"""Injected jitter: a worker that stalls at random steps (``--stall P:SECONDS``).

Used to show what the consistency models are for: under BSP every step waits for the
slowest worker, under SSP and async the others go on. The draw for a step depends only on
(seed, rank, step), so a run's stalls are reproducible and differ between workers.
"""

from __future__ import annotations

import logging
import random
import time

from common.checks import parse_stall

log = logging.getLogger(__name__)


class Stall:
    """Before step t, sleep ``seconds`` with probability ``prob`` (a fault injector)."""

    def __init__(self, prob: float, seconds: float, seed: int = 0, rank: int = 0) -> None:
        self.prob = prob
        self.seconds = seconds
        self.seed = seed
        self.rank = rank
        self.stalled = 0

    @classmethod
    def from_option(cls, text: str | None, seed: int, rank: int) -> "Stall | None":
        """The injector for ``--stall P:SECONDS``, or None when the option is not set."""
        if not text:
            return None
        prob, seconds = parse_stall(text)
        return cls(prob, seconds, seed, rank)

    def hits(self, step: int) -> bool:
        """Whether this worker stalls before ``step``."""
        draw = random.Random(f"{self.seed}:{self.rank}:{step}").random()
        return draw < self.prob

    def before(self, step: int) -> None:
        """Sleep if this step is one that stalls."""
        if self.seconds > 0 and self.hits(step):
            self.stalled += 1
            time.sleep(self.seconds)
