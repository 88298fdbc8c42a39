"""Progress of a worker: a tqdm bar (rank 0 on a terminal) or a log line per epoch."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from common.config import WorkerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProgressView:
    """What :class:`Progress` reads of a worker's configuration (a ``WorkerConfig`` has it all).

    Attributes:
        rank: the worker's rank; rank 0 shows the progress.
        epochs: epochs of the job.
        progress: ``--progress``: auto, on or off.
    """

    rank: int | None
    epochs: int
    progress: str


class Progress:
    """Shows epoch, step, loss, samples/s and the time left (ETA).

    ``--progress auto`` draws a bar on rank 0 when stderr is a terminal; ``on`` forces it
    (rank 0 only); otherwise rank 0 logs one line per epoch.
    """

    def __init__(self, cfg: ProgressView | WorkerConfig, total: int, start: int, steps_per_epoch: int) -> None:
        self.rank = cfg.rank
        self.epochs = cfg.epochs
        self.spe = steps_per_epoch
        want = cfg.progress == "on" or (cfg.progress == "auto" and sys.stderr.isatty())
        self.bar_on = want and self.rank == 0
        self.total = total
        self.start = start
        self._stack = ExitStack()
        self._bar: tqdm | None = None
        self._t_epoch = time.monotonic()
        self._n_epoch = 0
        self._t0 = time.monotonic()
        self._n_all = 0

    def __enter__(self) -> "Progress":
        if self.bar_on:
            self._stack.enter_context(logging_redirect_tqdm())
            self._bar = self._stack.enter_context(
                tqdm(total=self.total, initial=self.start, unit="step", dynamic_ncols=True, file=sys.stderr))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def update(self, step: int, loss: float | None, global_samples: int) -> None:
        """Record that ``step`` finished with the server-side mean ``loss``."""
        epoch, t = divmod(step, self.spe)
        self._n_epoch += global_samples
        self._n_all += global_samples
        if self._bar is not None:
            rate = self._n_all / max(time.monotonic() - self._t0, 1e-9)
            self._bar.set_description(f"epoch {epoch + 1}/{self.epochs}", refresh=False)
            self._bar.set_postfix_str(f"loss={'-' if loss is None else f'{loss:.4g}'}, {rate:.0f} samples/s",
                                      refresh=False)
            self._bar.update(1)
        if t == self.spe - 1:
            now = time.monotonic()
            rate = self._n_epoch / max(now - self._t_epoch, 1e-9)
            if self.rank == 0 and self._bar is None:
                done = step + 1 - self.start
                eta = (self.total - step - 1) * (now - self._t0) / max(done, 1)
                log.info("epoch %d/%d: step %d, loss %s, %.0f samples/s, ETA %.0fs", epoch + 1, self.epochs,
                         step + 1, "-" if loss is None else f"{loss:.6g}", rate, eta)
            self._t_epoch, self._n_epoch = now, 0
